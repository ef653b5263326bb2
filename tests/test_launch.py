"""The one-machine launcher (rankjax.launch) on plain Python children: fast, no JAX in them."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rankjax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
  return [sys.executable, "-c", textwrap.dedent(code)]


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # A zombie is dead too (only its exit status is left).
    return f.read().split(") ")[-1][0] != "Z"


def _pids(output):
  return [int(line.rsplit(" ", 1)[1]) for line in output.splitlines()
          if line.startswith("[launch] process ") and " started: pid " in line]


def test_every_process_succeeds_and_its_lines_are_prefixed():
  out = io.StringIO()
  code = launch.run([_python("print('hello'); print('two', flush=True)"),
                     _python("import sys; print('from one', file=sys.stderr)")], out=out)
  assert code == 0
  lines = out.getvalue().splitlines()
  assert "[p0] hello" in lines and "[p0] two" in lines and "[p1] from one" in lines
  assert len(_pids(out.getvalue())) == 2


def test_a_failing_process_stops_the_others_and_its_code_is_returned():
  out = io.StringIO()
  start = time.monotonic()
  # Process 1 also starts a grandchild in its process group: stopping the job kills it too.
  code = launch.run([
      _python("import time; time.sleep(60)"),
      _python("""
          import subprocess, sys, time
          child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
          print("grandchild", child.pid, flush=True)
          time.sleep(60)"""),
      _python("import time, sys; time.sleep(1); sys.exit(3)"),
  ], out=out, grace=2)
  assert code == 3
  assert time.monotonic() - start < 20
  text = out.getvalue()
  assert "[launch] process 2 exited with code 3; stopping the others." in text
  grandchild = int(next(x for x in text.splitlines() if "grandchild" in x).split()[-1])
  for pid in _pids(text) + [grandchild]:
    assert not _alive(pid), pid


def test_a_process_killed_by_a_signal_fails_the_job():
  code = launch.run([_python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
                     _python("import time; time.sleep(60)")], out=io.StringIO(), grace=1)
  assert code == 128 + signal.SIGKILL


def test_timeout_stops_every_process():
  out = io.StringIO()
  start = time.monotonic()
  # Process 0 ignores SIGTERM: SIGKILL follows after the grace period.
  code = launch.run([_python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " print('ready', flush=True); time.sleep(60)"),
                     _python("import time; time.sleep(60)")], out=out, timeout=2, grace=1)
  assert code == launch.TIMEOUT_EXIT_CODE
  assert time.monotonic() - start < 15
  assert "[launch] timeout: the job ran past 2 s; stopping every process." in out.getvalue()
  assert not any(_alive(pid) for pid in _pids(out.getvalue()))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_launcher_stops_every_process(tmp_path, sig):
  sleeper = "import time; print('ready', flush=True); time.sleep(60)"
  proc = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys
          from rankjax import launch
          sys.exit(launch.run([[sys.executable, "-c", {sleeper!r}]] * 2, grace=1))""")],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  lines = []
  while sum("ready" in x for x in lines) < 2:
    lines.append(proc.stdout.readline())
    assert lines[-1], "the launcher ended early:\n" + "".join(lines)
  proc.send_signal(sig)
  rest, _ = proc.communicate(timeout=30)
  assert proc.returncode == 128 + sig
  assert f"[launch] {signal.Signals(sig).name}: stopping every process." in rest
  assert not any(_alive(pid) for pid in _pids("".join(lines)))


def test_killing_the_launcher_outright_takes_the_processes_with_it():
  sleeper = "import time; print('ready', flush=True); time.sleep(60)"
  proc = subprocess.Popen(
      [sys.executable, "-c", "import sys; from rankjax import launch; "
       f"launch.run([[sys.executable, '-c', {sleeper!r}]])"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  lines = []
  while not any("ready" in x for x in lines):
    lines.append(proc.stdout.readline())
    assert lines[-1], "the launcher ended early:\n" + "".join(lines)
  (pid,) = _pids("".join(lines))
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 10
  while _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _alive(pid)


def test_process_commands_and_environment():
  commands = launch.process_commands(2, ["--config=c.py", "--workdir=/w"], port=1234,
                                     cpu_devices=3)
  assert [c[3:] for c in commands] == [
      ["rankjax.main", "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
       "--process_id=0", "--cpu_devices=3", "--config=c.py", "--workdir=/w"],
      ["rankjax.main", "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
       "--process_id=1", "--cpu_devices=3", "--config=c.py", "--workdir=/w"]]
  env = launch.process_environment(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                                    "--xla_cpu_enable_fast_math=false", "A": "1"})
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  assert env["JAX_PLATFORMS"] == "cpu" and env["A"] == "1"
  assert "XLA_FLAGS" not in launch.process_environment(
      2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  # Without --cpu_devices the processes keep the platform and flags they were given.
  assert launch.process_environment(None, {"XLA_FLAGS": "--x=1"})["XLA_FLAGS"] == "--x=1"
  assert 0 < launch.free_port() < 65536


def test_flags_the_launcher_owns_are_refused():
  out = subprocess.run([sys.executable, "-m", "rankjax.launch", "--num_processes=2", "--",
                        "--config=c.py", "--process_id=1"], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode != 0
  assert "--process_id=1: the launcher sets these itself" in out.stderr
