"""Fault injection: runs killed at chosen points and resumed end as an uninterrupted run does.

Each killed run is the real entry point (``python -m rankjax.main``) in a subprocess that sends
itself ``SIGKILL`` at a named point of its loop (``RANKJAX_FAULT``, :mod:`rankjax.faults`), so
the kill lands at the same place every time. The resumed run must write the same
``metrics.json`` (test metrics, the chosen best step and its validation metrics) and the same
validation curve as the uninterrupted run of the same command.

The runs: small digits (8 steps, checkpoints at 6 and 8, a validation evaluation every 2: digits
3-4 validate, 0-2 train, 5-9 test), one CPU device each.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import pytest

from rankjax import checkpoint
from rankjax import faults
from rankjax import run_log
from rankjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "digits.py")
STEPS = 8
RUN_FLAGS = (f"--config={CONFIG}:triplet_semihard,runlocal", f"--config.train.steps={STEPS}",
             "--config.train.checkpoint_every=6", "--config.train.log_every=2",
             "--config.eval.every=2", "--config.protocol.val_fraction=0.4",
             "--config.classes_per_batch=3")
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def _run(workdir, *flags, fault=None, timeout=300):
  """``python -m rankjax.main`` on ``workdir`` with :data:`RUN_FLAGS`, killed at ``fault``."""
  env = dict(ENV)
  env.pop(faults.ENV_VAR, None)
  if fault:
    env[faults.ENV_VAR] = fault
  return subprocess.run([sys.executable, "-m", "rankjax.main", *RUN_FLAGS, f"--workdir={workdir}",
                         *flags], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def _killed(workdir, fault):
  result = _run(workdir, fault=fault)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert not (workdir / train.METRICS_FILE).exists()


def _finished(workdir, *flags):
  result = _run(workdir, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _outcome(workdir):
  """What a run reports: its metrics.json and its validation curve ``{step: recall@1}``."""
  return (json.loads((workdir / train.METRICS_FILE).read_text()),
          run_log.read_scalars(str(workdir), "val/recall@1"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _finished(workdir)
  report, curve = _outcome(workdir)
  assert sorted(curve) == [0, 2, 4, 6, 8] and report["checkpoint"] == "best"  # 0: the start.
  return report, curve


def _assert_same_outcome(workdir, uninterrupted):
  report, curve = _outcome(workdir)
  want_report, want_curve = uninterrupted
  assert report == want_report
  assert curve == want_curve


# --- One kill, at each point of the loop. ---


def test_kill_before_the_first_checkpoint_after_validation_evaluations(tmp_path, uninterrupted):
  """Steps 2 and 4 were evaluated (a best checkpoint saved) and no checkpoint covers them: the
  resumed run trains from the start and must not fail on the best checkpoint it meets again."""
  _killed(tmp_path, "val@4")
  assert os.listdir(tmp_path / checkpoint.BEST_DIR)
  assert not os.path.exists(tmp_path / checkpoint.LATEST_DIR / "6")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_training_after_a_checkpoint(tmp_path, uninterrupted):
  _killed(tmp_path, "train@7")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_a_checkpoint_save(tmp_path, uninterrupted):
  _killed(tmp_path, "save@6")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_a_validation_evaluation_redoes_it(tmp_path, uninterrupted):
  """Step 6's checkpoint is written, its evaluation is not: the resumed run evaluates step 6."""
  _killed(tmp_path, "val@6")
  assert (tmp_path / checkpoint.LATEST_DIR / "6").exists()
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_the_final_evaluation(tmp_path, uninterrupted):
  _killed(tmp_path, f"test@{STEPS}")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_repeated_kills_of_one_run(tmp_path, uninterrupted):
  for fault in ("val@4", "train@7", "save@8", f"test@{STEPS}"):
    _killed(tmp_path, fault)
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


# --- A corrupt checkpoint falls back to the previous one. ---


def _flip_bytes(directory, count=4096):
  """Inverts ``count`` bytes in the middle of the largest file under ``directory``."""
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)
  return path


@pytest.fixture(scope="module")
def killed_in_the_final_evaluation(tmp_path_factory):
  """A run killed during its final evaluation: checkpoints 6 and 8 kept, no metrics.json."""
  workdir = tmp_path_factory.mktemp("killed_in_the_final_evaluation")
  _killed(workdir, f"test@{STEPS}")
  return workdir


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    killed_in_the_final_evaluation, tmp_path, uninterrupted):
  shutil.copytree(killed_in_the_final_evaluation, tmp_path, dirs_exist_ok=True)
  _flip_bytes(tmp_path / checkpoint.LATEST_DIR / str(STEPS) / "model")
  result = _finished(tmp_path)
  corrupt = os.path.join(str(tmp_path), checkpoint.LATEST_DIR, str(STEPS))
  previous = os.path.join(str(tmp_path), checkpoint.LATEST_DIR, "6")
  assert "Corrupt checkpoint" in result.stderr and corrupt in result.stderr
  assert f"Resuming from {previous}" in result.stderr
  _assert_same_outcome(tmp_path, uninterrupted)


def test_a_truncated_checkpoint_is_one_clear_error_naming_it(killed_in_the_final_evaluation,
                                                             tmp_path):
  shutil.copytree(killed_in_the_final_evaluation, tmp_path, dirs_exist_ok=True)
  step_dir = tmp_path / checkpoint.LATEST_DIR / str(STEPS)
  manifest = step_dir / "model" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:10])
  import rankjax  # pylint: disable=g-import-not-at-top
  with pytest.raises(Exception, match=re.escape(str(step_dir))) as error:
    rankjax.load_embedder(str(tmp_path))
  assert error.value.__cause__ is None and error.value.__suppress_context__
  assert len(str(error.value).splitlines()) == 1


# --- One run per workdir. ---


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
  env = dict(ENV)
  env.pop(faults.ENV_VAR, None)
  first = subprocess.Popen(
      [sys.executable, "-m", "rankjax.main", *RUN_FLAGS, f"--workdir={tmp_path}",
       "--config.train.steps=100000", "--config.eval.every=0"], env=env, cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (tmp_path / checkpoint.LATEST_DIR).exists() and time.time() < deadline:
      assert first.poll() is None
      time.sleep(0.1)
    second = _run(tmp_path, "--config.train.steps=100000", "--config.eval.every=0", timeout=120)
    assert second.returncode != 0
    assert "is in use by another run" in second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert first.poll() is None  # The first run goes on.
  finally:
    first.kill()
    first.wait()
  from rankjax import workdir_lock  # pylint: disable=g-import-not-at-top
  with workdir_lock.hold(str(tmp_path)):  # A killed holder leaves no stale lock.
    pass


# --- In-process: divergence and changed configs stop the run with a clear error. ---


def _config(**changes):
  spec = importlib.util.spec_from_file_location("digits_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("triplet_semihard,runlocal")
  config.update_from_flattened_dict({
      "train.steps": STEPS, "train.checkpoint_every": 6, "train.log_every": 2, "eval.every": 2,
      "protocol.val_fraction": 0.4, "classes_per_batch": 3, **changes})
  return config


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  # The learning rate jumps from 1e-3 to 1e27 after step 3: the run diverges after it.
  config = _config(**{"optimizer.schedule": "step", "optimizer.decay_steps": (3,),
                      "optimizer.decay_factor": 1e30, "train.checkpoint_every": 2,
                      "eval.every": 0})
  with pytest.raises(Exception, match=r"[Dd]iverged.* step (\d+)") as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / train.METRICS_FILE).exists()
  step = int(re.search(r"step (\d+)", str(error.value)).group(1))
  kept = sorted(int(s) for s in os.listdir(tmp_path / checkpoint.LATEST_DIR) if s.isdigit())
  assert kept and max(kept) < step, (kept, str(error.value))
  assert os.path.join(checkpoint.LATEST_DIR, str(max(kept))) in str(error.value)


def test_a_learning_rate_of_1e30_is_stopped_before_any_metrics(tmp_path):
  with pytest.raises(Exception, match=r"[Dd]iverged.* step \d+"):
    train.train_and_evaluate(_config(**{"optimizer.learning_rate": 1e30}), str(tmp_path))
  assert not (tmp_path / train.METRICS_FILE).exists()


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
  """A finished in-process run (8 steps); tests copy it before changing anything."""
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(_config(), str(workdir))
  return workdir


def _copy(workdir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


@pytest.mark.parametrize("changes, listed", [
    ({"optimizer.learning_rate": 2e-3}, "optimizer.learning_rate: 0.001 -> 0.002"),
    ({"loss.name": "contrastive"}, "loss.name: 'triplet_semihard' -> 'contrastive'"),
    ({"seed": 1}, "seed: 0 -> 1"),
    ({"optimizer.name": "sgd"}, "optimizer.name: 'adam' -> 'sgd'"),
])
def test_resuming_with_another_config_is_an_error_listing_the_fields(finished_workdir, tmp_path,
                                                                     changes, listed):
  workdir = _copy(finished_workdir, tmp_path)
  before = (workdir / train.CONFIG_FILE).read_text()
  with pytest.raises(ValueError, match=re.escape(listed)):
    train.train_and_evaluate(_config(**changes), str(workdir))
  assert (workdir / train.CONFIG_FILE).read_text() == before


def test_a_changed_embedding_leaves_the_record_loadable(finished_workdir, tmp_path):
  workdir = _copy(finished_workdir, tmp_path)
  before = (workdir / train.CONFIG_FILE).read_text()
  with pytest.raises(ValueError, match=re.escape("model.embedding_dim: 64 -> 32")):
    train.train_and_evaluate(_config(**{"model.embedding_dim": 32}), str(workdir))
  assert (workdir / train.CONFIG_FILE).read_text() == before
  import rankjax  # pylint: disable=g-import-not-at-top
  assert rankjax.load_embedder(str(workdir))(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 64)


def test_fewer_steps_than_the_checkpoint_is_an_error(finished_workdir, tmp_path):
  workdir = _copy(finished_workdir, tmp_path)
  before = (workdir / train.METRICS_FILE).read_text()
  with pytest.raises(ValueError, match=f"train.steps: {STEPS} -> 4.*train.steps only upwards"):
    train.train_and_evaluate(_config(**{"train.steps": 4, "train.allow_config_changes": True}),
                             str(workdir))
  assert (workdir / train.METRICS_FILE).read_text() == before


def test_the_opt_in_allows_more_steps_and_another_cadence_only(finished_workdir, tmp_path):
  workdir = _copy(finished_workdir, tmp_path)
  safe = {"train.steps": 10, "eval.every": 5, "train.log_every": 5,
          "train.allow_config_changes": True}
  with pytest.raises(ValueError, match="train.steps: 8 -> 10"):
    train.train_and_evaluate(_config(**{k: v for k, v in safe.items()
                                        if k != "train.allow_config_changes"}), str(workdir))
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    train.train_and_evaluate(_config(**safe, **{"optimizer.learning_rate": 2e-3}), str(workdir))
  train.train_and_evaluate(_config(**safe), str(workdir))
  report = json.loads((workdir / train.METRICS_FILE).read_text())
  assert report["checkpoint"] == "best" and report["checkpoint_step"] in (2, 4, 6, 8, 10)
  assert json.loads((workdir / train.CONFIG_FILE).read_text())["train"]["steps"] == 10
