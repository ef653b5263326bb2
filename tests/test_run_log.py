"""rankjax.run_log: the progress line's rates leave evaluation time out, and only that."""

import jax.numpy as jnp
import pytest

from rankjax import run_log


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(run_log.time, "perf_counter", fake)
  return fake


def test_steps_before_an_evaluation_keep_their_time(clock):
  progress = run_log.Progress(total_steps=100, start_step=0, global_batch_size=10)
  clock.now = 5.0  # The first step, with its compilation: not counted.
  progress.compiled(jnp.int32(1))
  clock.now = 7.0  # Steps 2 and 3 took 2 s ...
  with progress.paused(jnp.int32(3)):
    clock.now = 57.0  # ... then 50 s of evaluation ...
  clock.now = 59.0  # ... and steps 4 and 5 2 s more.
  progress(5)
  assert progress.steps_per_s == pytest.approx(4 / 4.0)
  assert progress.rates() == {"steps_per_s": pytest.approx(1.0),
                              "images_per_s": pytest.approx(10.0)}
  clock.now = 61.0  # Without a pause, the time between lines is all training.
  progress(7)
  assert progress.steps_per_s == pytest.approx(1.0)


def test_time_inside_a_failed_evaluation_is_left_out_too(clock):
  progress = run_log.Progress(total_steps=10, start_step=0, global_batch_size=1)
  with pytest.raises(RuntimeError):
    with progress.paused():
      clock.now = 30.0
      raise RuntimeError("evaluation failed")
  clock.now = 32.0
  progress(2)
  assert progress.steps_per_s == pytest.approx(1.0)
