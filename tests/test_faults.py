"""Fault injection: runs killed at chosen points and resumed end as an uninterrupted run does.

Each killed run is the real entry point (``python -m rankjax.main``) in a subprocess that sends
itself ``SIGKILL`` at a named point of its loop (``RANKJAX_FAULT``, :mod:`rankjax.faults`), so
the kill lands at the same place every time. The resumed run must write the same
``metrics.json`` (test metrics, the chosen best step and its validation metrics) and the same
validation curve as the uninterrupted run of the same command.

The runs: small digits (8 steps, a checkpoint every 4, a validation evaluation every 2: digits
3-4 validate, 0-2 train, 5-9 test), one CPU device each.
"""

import json
import os
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
             "--config.train.checkpoint_every=4", "--config.train.log_every=2",
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
  assert sorted(curve) == [2, 4, 6, 8] and report["checkpoint"] == "best"
  return report, curve


def _assert_same_outcome(workdir, uninterrupted):
  report, curve = _outcome(workdir)
  want_report, want_curve = uninterrupted
  assert report == want_report
  assert curve == want_curve


# --- One kill, at each point of the loop. ---


def test_kill_between_checkpoints_after_a_validation_evaluation(tmp_path, uninterrupted):
  """Step 2 was evaluated (best/2 saved) and no checkpoint covers it: the resumed run repeats it."""
  _killed(tmp_path, "train@3")
  assert os.listdir(tmp_path / checkpoint.BEST_DIR) and not (
      tmp_path / checkpoint.LATEST_DIR / "4").exists()
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_a_checkpoint_save(tmp_path, uninterrupted):
  _killed(tmp_path, "save@4")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_a_validation_evaluation_redoes_it(tmp_path, uninterrupted):
  """Step 4's checkpoint is written, its evaluation is not: the resumed run evaluates step 4."""
  _killed(tmp_path, "val@4")
  assert (tmp_path / checkpoint.LATEST_DIR / "4").exists()
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_kill_during_the_final_evaluation(tmp_path, uninterrupted):
  _killed(tmp_path, f"test@{STEPS}")
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)


def test_repeated_kills_of_one_run(tmp_path, uninterrupted):
  for fault in ("train@3", "val@4", "save@8", f"test@{STEPS}"):
    _killed(tmp_path, fault)
  _finished(tmp_path)
  _assert_same_outcome(tmp_path, uninterrupted)
