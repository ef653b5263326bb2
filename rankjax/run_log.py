r"""What a training run tells its user and leaves on disk besides checkpoints.

A progress line (bar, steps/s, images/s, ETA), TensorBoard scalars (written through
``tf.summary``; TensorFlow is already there for tf.data) and :func:`read_scalars` to read them
back, Orbax's INFO logs kept out of the way, and JSON files written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np


class Progress:
  """A progress line: bar, step, steps/s and images/s since the last line, and the ETA."""

  def __init__(self, total_steps: int, start_step: int, global_batch_size: int):
    self.total = total_steps
    self.batch = global_batch_size
    self.last_step = start_step
    self.last_time = time.perf_counter()
    self.steps_per_s = float("nan")

  def compiled(self, step_array: jax.Array) -> None:
    """Called after the first step: its compile time is not throughput."""
    step_array.block_until_ready()
    logging.info("First step (compilation included) took %.1f s.",
                 time.perf_counter() - self.last_time)
    self.last_step += 1
    self.last_time = time.perf_counter()

  @contextlib.contextmanager
  def paused(self, wait_for: Any = None):
    """Time spent inside the block (an evaluation) is not training throughput.

    The steps since the last line keep the time they took before the block: ``wait_for`` (e.g.
    the state's step counter) is waited on first, so that steps still running on the device
    count as training.
    """
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    start = time.perf_counter()
    try:
      yield
    finally:
      self.last_time += time.perf_counter() - start

  def __call__(self, step: int) -> str:
    now = time.perf_counter()
    if step > self.last_step:
      self.steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    frac = step / self.total
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    eta = (self.total - step) / self.steps_per_s if self.steps_per_s > 0 else float("nan")
    return (f"[{bar}] {step}/{self.total} | {self.steps_per_s:.2f} steps/s "
            f"{self.steps_per_s * self.batch:.0f} img/s | ETA {_format_seconds(eta)}")

  def rates(self, prefix: str = "") -> dict[str, float]:
    if math.isnan(self.steps_per_s):
      return {}
    return {f"{prefix}steps_per_s": self.steps_per_s,
            f"{prefix}images_per_s": self.steps_per_s * self.batch}


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


class SummaryWriter:
  """TensorBoard scalars through ``tf.summary`` (TensorFlow is already there for tf.data)."""

  def __init__(self, logdir: str, *, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      for name, value in values.items():
        self._tf.summary.scalar(name, value)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
  """``{step: value}`` of the TensorBoard scalar ``tag`` (e.g. ``"train/loss"``) a run wrote."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logdir = os.path.join(workdir, "tensorboard")
  values = {}
  for name in sorted(os.listdir(logdir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def quiet_orbax_info_logs() -> None:
  """Orbax logs every file operation at INFO; keep its warnings, drop the rest."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


class _DropOrbaxInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def stack_metrics(window: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  fetched = jax.device_get(window)
  return {k: np.stack([m[k] for m in fetched]) for k in fetched[0]}


def write_json_atomically(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
