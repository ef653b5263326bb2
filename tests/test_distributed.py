"""Multi-process training for real: several ``rankjax.main`` processes on 127.0.0.1.

Each test starts real processes (``python -m rankjax.launch`` or ``rankjax.main`` directly) that
join through ``jax.distributed`` with CPU devices of their own; the CPU collectives between them
go through gloo. The pytest process's own 8 fake devices (conftest's ``XLA_FLAGS``) are kept out of
their environment. All of them train tests/multiprocess_digits.py (the digits config at test size,
two data shards), so the job is the same whatever the number of processes.
"""

import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sklearn.datasets

from rankjax import checkpoint
from rankjax import configs
from rankjax import train
from rankjax import run_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "multiprocess_digits.py")
STEPS = 24  # multiprocess_digits.py: 24 steps, logged every 4, checkpointed every 8.
TIMEOUT = 420  # Seconds for one job (the CI machine may be loaded).


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
  return env


def _launch_command(workdir, num_processes, cpu_devices, *flags, timeout=TIMEOUT):
  return [sys.executable, "-m", "rankjax.launch", f"--num_processes={num_processes}",
          f"--cpu_devices={cpu_devices}", f"--timeout={timeout}", "--",
          f"--config={CONFIG}", f"--workdir={workdir}", *flags]


def _main_command(workdir, *flags):
  return [sys.executable, "-m", "rankjax.main", f"--config={CONFIG}", f"--workdir={workdir}",
          *flags]


def _run(command):
  out = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT + 60)
  return out.returncode, out.stdout + out.stderr


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(") ")[-1][0] != "Z"


def _pids(log):
  return [int(m) for m in re.findall(r"^\[launch\] process \d+ started: pid (\d+)$", log, re.M)]


def _wait_for(predicate, proc, what, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"the job ended before {what}"
    assert time.monotonic() < deadline, f"no {what} after {timeout} s"
    time.sleep(0.05)


def _final_variables(workdir):
  """The model variables of the last checkpoint, restored onto this process's first device."""
  path = os.path.join(os.path.abspath(workdir), checkpoint.LATEST_DIR, str(STEPS), "model")
  ckptr = ocp.StandardCheckpointer()
  metadata = ckptr.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return jax.tree_util.tree_flatten_with_path(ckptr.restore(path, target))[0]


def _metrics(workdir):
  """The metrics of ``workdir/metrics.json`` (without its note of which checkpoint they are of)."""
  report = json.loads(open(os.path.join(workdir, train.METRICS_FILE)).read())
  assert report.pop("checkpoint") == "final"
  return report


def _process_lines(log, i):
  return [line[len(f"[p{i}] "):] for line in log.splitlines() if line.startswith(f"[p{i}] ")]


def test_data_shards_config_field_is_checked():
  config = configs.base_config()
  config.classes_per_batch = 6
  for good in (None, 1, 2, 3, 6):
    config.data_shards = good
    configs.check_config(config)
  for bad in (0, -2, 4):
    config.data_shards = bad
    with pytest.raises(ValueError, match="config.data_shards must be None or a positive integer "
                       "that divides config.classes_per_batch=6"):
      configs.check_config(config)


def test_main_refuses_a_process_id_outside_the_job():
  code, log = _run(_main_command("/nonexistent", "--num_processes=2", "--process_id=2"))
  assert code != 0 and "--process_id must be smaller than --num_processes" in log, log[-2000:]


def _job_once(tmp_path_factory, name, command):
  """Runs ``command(workdir)`` once per test session, even across pytest-xdist workers."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The session's directory, shared by its workers.
  workdir, result = root / name, root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result.exists():
      code, log = _run(command(str(workdir)))
      result.write_text(json.dumps({"code": code, "log": log}))
  job = json.loads(result.read_text())
  assert job["code"] == 0, job["log"][-5000:]
  return str(workdir), job["log"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The reference job: 2 processes x 2 CPU devices, uninterrupted. ``(workdir, log)``."""
  return _job_once(tmp_path_factory, "two_processes", lambda w: _launch_command(w, 2, 2))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The same job in 1 process x 4 CPU devices (plain ``rankjax.main``). ``(workdir, log)``."""
  return _job_once(tmp_path_factory, "one_process",
                   lambda w: _main_command(w, "--cpu_devices=4"))


def test_two_processes_train_as_one_process_with_as_many_devices(two_processes, one_process):
  (two, two_log), (one, one_log) = two_processes, one_process
  assert "Mesh: 4 devices (2 per host, 2 hosts); global batch 8 = 4 classes x 2." in two_log
  # The same global batches, the same step: the logged losses agree to float rounding.
  want, got = (run_log.read_scalars(w, "train/loss") for w in (one, two))
  assert sorted(got) == sorted(want) == list(range(4, STEPS + 1, 4))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  # The final parameters too, to float rounding, not bit for bit: the two layouts sum gradients
  # in different orders (XLA's in-process all-reduce vs gloo's ring), and XLA's CPU convolution
  # gradients round differently with 2 and with 4 devices in a process. Each variable is compared
  # at 1e-4 of its own scale (measured: at most 3e-7 apart, variables of scale ~1).
  one_vars, two_vars = _final_variables(one), _final_variables(two)
  assert [p for p, _ in one_vars] == [p for p, _ in two_vars]
  for (path, a), (_, b) in zip(one_vars, two_vars):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(a)), 1e-2), (
        jax.tree_util.keystr(path))
  # Retrieval metrics of two trainings a rounding apart: equal but for near-ties, where a
  # last-bit difference flips a query's nearest neighbour. Every metric but NMI is a mean over the
  # N test queries, so one flipped query moves it by at most 1/N; two are allowed (measured: none
  # on one machine, one recall@1 query of 896 on another). Evaluation itself is exact: next test.
  queries = int(re.findall(r"Embedded (\d+) images", one_log)[-1])
  want, got = _metrics(one), _metrics(two)
  assert set(got) == set(want)
  for key in want:
    assert abs(got[key] - want[key]) <= 2 / queries, (key, got[key], want[key], queries)
  # Orbax wrote each array once for the job, not once per process (which would double it). Each
  # process keeps its own OCDBT tree of compressed chunks, so the job's files are somewhat larger
  # than one process's (measured 1.15x at this tiny size) but far from twice.
  def array_bytes(workdir):
    root = os.path.join(workdir, checkpoint.LATEST_DIR, str(STEPS))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root)
               for f in files if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep)
  assert array_bytes(two) <= 1.5 * array_bytes(one)


def test_evaluation_across_processes_equals_one_process_exactly(two_processes, tmp_path):
  two, _ = two_processes
  # One process x 4 devices evaluates the two-process job's final checkpoint (the workdir is at
  # its last step, so main only restores and evaluates): the very same metrics, bit for bit.
  copy = str(tmp_path / "copy")
  shutil.copytree(two, copy)
  os.remove(os.path.join(copy, train.METRICS_FILE))
  code, log = _run(_main_command(copy, "--cpu_devices=4"))
  assert code == 0, log[-5000:]
  assert f"Resumed from {os.path.join(copy, checkpoint.LATEST_DIR)} at step {STEPS}" in log
  assert "First step" not in log
  assert _metrics(copy) == _metrics(two)


def test_each_process_reads_only_its_classes(two_processes):
  _, log = two_processes
  digits = sklearn.datasets.load_digits()
  counts = np.bincount(digits.target)
  seen = []
  for i in range(2):
    lines = _process_lines(log, i)
    (plan,) = [x for x in lines if "Training input of process" in x]
    match = re.search(rf"process {i} of 2: data shard {i} of 2, (\d+) images of (\d+) classes "
                      r"\(([\d, ]+)\)\.", plan)
    assert match, plan
    classes = [int(c) for c in match[3].split(", ")]
    assert classes == list(range(i, 5, 2))  # Shard i of 2 owns every other training class.
    # What the process decoded: its classes' training images, then its half of the test images.
    decoded = [int(n) for n in re.findall(r"Reading (\d+) decoded images of digits", "\n".join(
        lines))]
    assert decoded == [int(counts[classes].sum()), int(counts[5:].sum()) // 2], lines
    assert int(match[1]) == counts[classes].sum()
    seen.append(set(classes))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))


def test_killing_every_process_and_launching_again_resumes(two_processes, tmp_path):
  two, _ = two_processes
  workdir = str(tmp_path / "killed")
  logfile = open(tmp_path / "first.log", "w+")
  proc = subprocess.Popen(_launch_command(workdir, 2, 2), cwd=REPO, env=_env(), stdout=logfile,
                          stderr=subprocess.STDOUT, text=True)
  try:
    log = lambda: open(logfile.name).read()
    _wait_for(lambda: len(_pids(log())) == 2, proc, "process ids")
    # Mid-run: once the checkpoint of step 8 (of 24) is complete, SIGKILL both processes at once.
    done = os.path.join(workdir, checkpoint.LATEST_DIR, "8", "commit_success.txt")
    _wait_for(lambda: os.path.exists(done), proc, "checkpoint at step 8")
    for pid in _pids(log()):
      os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not any(_alive(pid) for pid in _pids(log()))
  assert not os.path.exists(os.path.join(workdir, train.METRICS_FILE))

  code, again = _run(_launch_command(workdir, 2, 2))
  assert code == 0, again[-5000:]
  assert re.search(r"\[p0\] .*Resumed from .* at step (8|16)\.", again), again[-5000:]
  assert _metrics(workdir) == _metrics(two)


def test_a_killed_process_fails_the_job_within_the_timeout_and_leaves_nothing(tmp_path):
  logfile = open(tmp_path / "job.log", "w+")
  proc = subprocess.Popen(_launch_command(str(tmp_path / "job"), 2, 2), cwd=REPO, env=_env(),
                          stdout=logfile, stderr=subprocess.STDOUT, text=True)
  try:
    log = lambda: open(logfile.name).read()
    _wait_for(lambda: "[p1] " in log() and "Training input" in log(), proc, "training input")
    pids = _pids(log())
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(timeout=60)
    assert time.monotonic() - killed < 30  # The launcher's grace period is 5 s.
  finally:
    if proc.poll() is None:
      proc.kill()
  assert code != 0
  assert "[launch] process 1 exited with code -9; stopping the others." in log()
  assert not any(_alive(pid) for pid in pids)


def test_the_runtime_stops_the_others_when_a_process_dies(tmp_path):
  # Without the launcher (as under a cluster scheduler): JAX's coordination service notices the
  # dead process within the heartbeat timeout and terminates the others with an error.
  port = __import__("rankjax.launch", fromlist=["free_port"]).free_port()
  flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--cpu_devices=2",
           "--heartbeat_timeout=5"]
  logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(_main_command(str(tmp_path / "job"), *flags, f"--process_id={i}"),
                            cwd=REPO, env=_env(), stdout=logs[i], stderr=subprocess.STDOUT,
                            start_new_session=True) for i in range(2)]
  try:
    _wait_for(lambda: "Training input" in open(logs[0].name).read(), procs[0], "training input")
    procs[1].kill()
    killed = time.monotonic()
    code = procs[0].wait(timeout=120)
    elapsed = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  out = open(logs[0].name).read()
  assert code != 0
  assert elapsed < 60, elapsed
  assert "JAX distributed service detected fatal errors" in out or "Gloo" in out, out[-3000:]


def test_processes_with_different_configs_stop_before_training(tmp_path):
  port = __import__("rankjax.launch", fromlist=["free_port"]).free_port()
  flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--cpu_devices=1"]
  procs = [subprocess.Popen(
      _main_command(str(tmp_path / "job"), *flags, f"--process_id={i}", f"--config.seed={i}"),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode != 0
    assert ("The processes of this job were started with different configs: process(es) [1] "
            "differ from process 0") in out, out[-3000:]
    assert "First step" not in out


def test_a_global_batch_not_divisible_by_the_global_devices_is_an_error(tmp_path):
  code, log = _run(_launch_command(str(tmp_path / "job"), 2, 3))  # 4 x 2 = 8 on 6 devices.
  assert code != 0
  assert "batch of 8 is not divisible by 6 devices" in log, log[-3000:]
  assert "First step" not in log


# --- The documented one-machine command, and the coordinator's address. ---


def _documented_launch_commands():
  """Each ``python -m rankjax.launch ...`` command of the README, docs/ and the launcher's
  docstring, as argument lists (continuation lines joined)."""
  paths = [os.path.join(REPO, "README.md"), os.path.join(REPO, "rankjax", "launch.py")]
  paths += [os.path.join(REPO, "docs", n) for n in sorted(os.listdir(os.path.join(REPO, "docs")))
            if n.endswith(".md")]
  commands = set()
  for path in paths:
    with open(path) as f:
      text = f.read()
    for match in re.finditer(r"python -m rankjax\.launch --num_processes=\d(?:[^\n]*\\\n)*[^\n]*",
                             text):
      commands.add(" ".join(match.group(0).replace("\\\n", " ").split()))
  return sorted(commands)


def _listening_addresses(pid, port):
  """The local addresses on which ``pid`` or a process below it listens on TCP ``port``."""
  import psutil  # pylint: disable=g-import-not-at-top
  try:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
  except psutil.NoSuchProcess:
    return set()
  found = set()
  for proc in procs:
    try:
      found.update(c.laddr.ip.removeprefix("::ffff:")  # IPv4 on an IPv6 socket.
                   for c in proc.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
    except psutil.NoSuchProcess:
      pass
  return found


def test_the_documented_launch_command_runs_and_listens_on_127_0_0_1_only(tmp_path):
  commands = _documented_launch_commands()
  assert len(commands) == 1, commands  # One command, the same in every document.
  args = commands[0].split()[3:]  # After "python -m rankjax.launch".
  split = args.index("--")
  args = [*args[:split], f"--timeout={TIMEOUT}", "--",
          *(f"--workdir={tmp_path}" if a.startswith("--workdir=") else a
            for a in args[split + 1:]),
          "--config.train.steps=2"]
  proc = subprocess.Popen([sys.executable, "-m", "rankjax.launch", *args], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first = proc.stdout.readline()
  port = int(re.search(r"coordinator 127\.0\.0\.1:(\d+)", first).group(1))
  addresses = set()
  deadline = time.monotonic() + TIMEOUT
  while proc.poll() is None and not addresses and time.monotonic() < deadline:
    addresses = _listening_addresses(proc.pid, port)
    time.sleep(0.2)
  log = first + proc.communicate(timeout=TIMEOUT)[0]
  assert proc.returncode == 0, log[-3000:]
  assert addresses == {"127.0.0.1"}, (addresses, log[-2000:])
  assert os.path.exists(tmp_path / train.METRICS_FILE)


def test_a_coordinator_port_in_use_is_a_clear_error_that_stops_the_job(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  from rankjax import launch  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    commands = launch.process_commands(2, [f"--config={CONFIG}", f"--workdir={tmp_path}"],
                                       port=port, cpu_devices=1)
    out = io.StringIO()
    start = time.monotonic()
    code = launch.run(commands, env=dict(launch.process_environment(1, _env())), out=out,
                      timeout=TIMEOUT)
  log = out.getvalue()
  assert code != 0
  assert f"cannot listen on the coordinator address 127.0.0.1:{port}" in log, log[-3000:]
  assert time.monotonic() - start < 120


VALIDATED = ("--config.classes_per_batch=2", "--config.eval.every=8",
             "--config.protocol.val_fraction=0.4")  # Digits 3-4 validate, 0-2 train.


def test_a_job_killed_during_a_validation_evaluation_resumes_to_the_same_best(tmp_path):
  """Both processes die (SIGKILL, rankjax.faults) in the validation evaluation of step 16, whose
  checkpoint is written: the relaunched job redoes it and reports what an uninterrupted job does."""
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  code, log = _run(_launch_command(reference, 2, 2, *VALIDATED))
  assert code == 0, log[-5000:]
  env = dict(_env(), RANKJAX_FAULT="val@16")
  first = subprocess.run(_launch_command(killed, 2, 2, *VALIDATED), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT + 60)
  assert first.returncode != 0 and os.path.exists(
      os.path.join(killed, checkpoint.LATEST_DIR, "16")), first.stdout[-3000:]
  assert not os.path.exists(os.path.join(killed, train.METRICS_FILE))
  code, log = _run(_launch_command(killed, 2, 2, *VALIDATED))
  assert code == 0, log[-5000:]
  for name in (train.METRICS_FILE, checkpoint.EVALUATIONS_FILE):
    with open(os.path.join(killed, name)) as got, open(os.path.join(reference, name)) as want:
      assert json.load(got) == json.load(want), name
