r"""Runs a multi-process ``rankjax.main`` job on this machine: N processes on 127.0.0.1.

``python -m rankjax.launch --num_processes=N [--cpu_devices=D] [--timeout=S] -- <main flags>``
starts N processes of ``python -m rankjax.main <main flags>``, each with
``--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`` (a free port) and, with
``--cpu_devices=D``, ``D`` CPU devices of its own; together they form one mesh of ``N x D``
devices, exactly as the hosts of a cluster do. Example (two processes x two CPU devices train
digits data-parallel over four devices)::

  python -m rankjax.launch --num_processes=2 --cpu_devices=2 -- \
      --config=experiments/configs/digits.py:triplet_semihard --workdir=/tmp/digits_2x2 \
      --config.classes_per_batch=4

Each line a process prints is streamed with its prefix (``[p0] ...``). The launcher returns 0
when every process does; as soon as one fails, on ``--timeout`` and on SIGINT / SIGTERM it stops
every process (each runs in its own process group, killed whole: SIGTERM, then SIGKILL after
``--grace`` seconds) and returns non-zero: the failed process's exit code, 124 for the timeout,
128 + the signal for an interrupt. Running the same command again resumes from the job's last
checkpoint.

With ``--cpu_devices`` the processes run on the CPU (``JAX_PLATFORMS=cpu``, and any
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` removed: the flag sets the count).
This is for testing and debugging a distributed job on one machine; on a cluster, start one
``rankjax.main`` per host with the cluster's own launcher (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

TIMEOUT_EXIT_CODE = 124
_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_commands(num_processes: int, main_args: Sequence[str], *, port: int,
                     cpu_devices: int | None = None) -> list[list[str]]:
  """The command line of each process: ``python -m rankjax.main`` with the job's flags."""
  devices = [f"--cpu_devices={cpu_devices}"] if cpu_devices else []
  return [[sys.executable, "-u", "-m", "rankjax.main", f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}", *devices, *main_args]
          for i in range(num_processes)]


def process_environment(cpu_devices: int | None, env: dict[str, str] | None = None
                        ) -> dict[str, str]:
  """The environment of the processes: this one's, set up for CPU devices when asked for."""
  env = dict(os.environ if env is None else env)
  env["PYTHONUNBUFFERED"] = "1"
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    xla_flags = _FORCED_DEVICES.sub("", env.get("XLA_FLAGS", "")).strip()
    if xla_flags:
      env["XLA_FLAGS"] = xla_flags
    else:
      env.pop("XLA_FLAGS", None)
  return env


try:  # Resolved here: the child, forked from a threaded process, should only call it.
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # Not Linux.
  _PRCTL = None


def _die_with_launcher() -> None:
  """In the child: a SIGKILL when the launcher dies, so even ``kill -9`` leaves nothing behind."""
  if _PRCTL is not None:
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG.


class _Interrupted(Exception):

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def run(commands: Sequence[Sequence[str]], *, env: dict[str, str] | None = None,
        timeout: float | None = None, grace: float = 5.0, out: TextIO | None = None) -> int:
  """Runs ``commands`` as a job: one process each, logs prefixed ``[pI]`` and streamed to ``out``.

  Returns 0 when every process exits with 0. When one fails, on ``timeout`` or on SIGINT /
  SIGTERM (in the main thread) it stops all of them (process groups: SIGTERM, SIGKILL after
  ``grace`` s) and returns the failed process's code, :data:`TIMEOUT_EXIT_CODE`, or 128 + the
  signal.
  """
  out = sys.stdout if out is None else out
  lock = threading.Lock()

  def say(line: str) -> None:
    with lock:
      out.write(line)
      out.flush()

  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []

  def pump(i: int, stream) -> None:
    for line in iter(stream.readline, ""):
      say(f"[p{i}] {line}" if line.endswith("\n") else f"[p{i}] {line}\n")
    stream.close()

  restore = {}
  if threading.current_thread() is threading.main_thread():
    def interrupt(signum, frame):
      del frame
      raise _Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
      restore[sig] = signal.signal(sig, interrupt)
  start = time.monotonic()
  try:
    for i, command in enumerate(commands):
      proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                              errors="replace", start_new_session=True,
                              preexec_fn=_die_with_launcher)
      procs.append(proc)
      say(f"[launch] process {i} started: pid {proc.pid}\n")
      pumps.append(threading.Thread(target=pump, args=(i, proc.stdout), daemon=True))
      pumps[-1].start()
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        say(f"[launch] process {i} exited with code {code}; stopping the others.\n")
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      if timeout is not None and time.monotonic() - start > timeout:
        say(f"[launch] timeout: the job ran past {timeout:g} s; stopping every process.\n")
        return TIMEOUT_EXIT_CODE
      time.sleep(0.1)
  except (_Interrupted, KeyboardInterrupt) as e:
    signum = e.signum if isinstance(e, _Interrupted) else signal.SIGINT
    say(f"[launch] {signal.Signals(signum).name}: stopping every process.\n")
    return 128 + signum
  finally:
    for sig in restore:  # A second signal must not interrupt the clean-up.
      signal.signal(sig, signal.SIG_IGN)
    stop(procs, grace=grace)
    for sig, handler in restore.items():
      signal.signal(sig, handler)
    for thread in pumps:
      thread.join(timeout=5)


def stop(procs: Sequence[subprocess.Popen], *, grace: float) -> None:
  """SIGTERM to the process group of every process still running, then SIGKILL after ``grace``."""
  def signal_groups(sig):
    for p in procs:
      if p.poll() is None:  # Only groups whose leader is alive (not reaped): no pid reuse.
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass

  signal_groups(signal.SIGTERM)
  deadline = time.monotonic() + grace
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.05)
  signal_groups(signal.SIGKILL)
  for p in procs:
    p.wait()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """``(launcher options, rankjax.main flags)`` from ``LAUNCHER FLAGS -- MAIN FLAGS``."""
  parser = argparse.ArgumentParser(
      prog="python -m rankjax.launch", description=__doc__.splitlines()[0],
      usage="%(prog)s --num_processes=N [--cpu_devices=D] [--timeout=S] -- <rankjax.main flags>")
  parser.add_argument("--num_processes", type=int, required=True, help="processes to start")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="CPU devices per process (default: JAX's default platform and devices)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop every process and fail after this many seconds")
  parser.add_argument("--grace", type=float, default=5.0,
                      help="seconds between SIGTERM and SIGKILL when stopping the processes")
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  main_args = argv[split + 1:]
  if args.num_processes < 1 or (args.cpu_devices is not None and args.cpu_devices < 1):
    parser.error("--num_processes and --cpu_devices must be at least 1.")
  if (args.timeout is not None and args.timeout <= 0) or args.grace < 0:
    parser.error("--timeout must be positive and --grace not negative.")
  if not main_args:
    parser.error("give the flags of rankjax.main after `--`, e.g. `python -m rankjax.launch "
                 "--num_processes=2 -- --config=... --workdir=...`.")
  reserved = [a for a in main_args if a.split("=")[0].lstrip("-") in
              ("coordinator_address", "num_processes", "process_id", "cpu_devices")]
  if reserved:
    parser.error(f"{' '.join(reserved)}: the launcher sets these itself; pass --num_processes "
                 "and --cpu_devices before `--`.")
  return args, main_args


def main(argv: Sequence[str] | None = None) -> int:
  args, main_args = parse_args(sys.argv[1:] if argv is None else argv)
  port = free_port()
  commands = process_commands(args.num_processes, main_args, port=port,
                              cpu_devices=args.cpu_devices)
  print(f"[launch] {args.num_processes} processes, coordinator 127.0.0.1:{port}: "
        f"{' '.join(commands[0][2:])}", flush=True)
  code = run(commands, env=process_environment(args.cpu_devices), timeout=args.timeout,
             grace=args.grace)
  print(f"[launch] {'done' if code == 0 else f'failed (exit code {code})'}.", flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
