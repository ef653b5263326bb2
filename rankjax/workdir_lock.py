r"""One run (one job) per working directory: an OS lock held for the run's life.

Two runs on one ``--workdir`` would resume each other's checkpoints and delete each other's
unfinished saves. :func:`hold` takes an exclusive ``fcntl.flock`` on ``WORKDIR/run.lock`` and
writes the holder into it (pid, host, start time); a second run is refused with a message that
names the holder. The operating system releases the lock when the holding process ends in any
way (``SIGKILL`` included), so a killed run never leaves a stale lock. In a multi-process job only
process 0 takes it (the job's other processes share the directory by design). The lock file
stays; it names the last holder.

``flock`` works on local file systems and on NFSv4 (where Linux maps it to a byte-range lock);
on a file system without locks (some FUSE mounts), taking the lock fails with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"


class WorkdirInUseError(RuntimeError):
  """Another run holds the working directory."""


@contextlib.contextmanager
def hold(workdir: str):
  """Holds ``workdir``'s lock inside the block; raises :class:`WorkdirInUseError` if taken."""
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirInUseError(
          f"{os.path.abspath(workdir)} is in use by another run ({_holder(fd)}, lock {path}): "
          "one run (one job) per --workdir. Wait for it to finish or stop it, or use another "
          "--workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }).encode())
    os.fsync(fd)
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _holder(fd: int) -> str:
  """The holder a lock file names, in words."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
  except (OSError, ValueError, KeyError):
    return "a process that has not yet written its name"
