"""Orbax checkpoints of a training run: resume after any kill, and keep the best model.

A run's working directory holds two orbax checkpoint managers:

* ``WORKDIR/checkpoints/<step>/``: the latest ``keep`` checkpoints, each with three items:
  ``model`` (parameters and the rest of the model state, e.g. BatchNorm statistics),
  ``training`` (what only training needs: the optax state, the loss's own parameters such as
  class proxies, a cross-batch memory) and ``progress`` (JSON: ``step`` and ``data_position``, the
  index of the next training batch, which :func:`rankjax.data.train_batches` takes as
  ``start_step``). An embedder reads ``model`` alone.
* ``WORKDIR/best/<step>/``: the single checkpoint with the highest validation metric seen so far
  (``model`` and ``progress``, the metrics included).

Orbax writes each checkpoint under a temporary name and renames it once complete, so a process
killed at any moment (SIGKILL included) leaves either a complete checkpoint or a temporary
directory that the next start deletes; running the same command again resumes from the last
complete one. Saving is asynchronous: the arrays are copied to host memory before :meth:`save`
returns and are written while training continues.

**Several processes** (a ``jax.distributed`` job) open the same ``WORKDIR`` (a file system they all
share) and save and restore together: orbax's primary process (process 0) creates and commits each
step directory, every array is written once for the job (the processes share the writing of
replicated arrays), and there is one ``checkpoints/<step>`` for the whole job. Only process 0
deletes unfinished saves, and the others wait for it. A checkpoint restores on any number of
processes and devices: the restored arrays take the shardings of the state they restore into.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  directory = os.path.abspath(directory)
  _remove_unfinished(directory)
  return ocp.CheckpointManager(directory,
                               options=ocp.CheckpointManagerOptions(create=True, **options))


def _remove_unfinished(directory: str) -> None:
  """Deletes the temporary directories of saves a killed process left behind.

  Synchronously, before anything else runs (orbax's own ``cleanup_tmp_directories`` does it in
  a background thread, which races with whatever the process does next).
  """
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in ocp.path.step.tmp_checkpoints(directory):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"rankjax_checkpoint_cleanup:{directory}")


class Checkpoints:
  """The checkpoints of one run.

  Example::

    ckpts = Checkpoints(workdir, keep=2, best_metric="recall@1")
    restored = ckpts.restore_latest(abstract_model, abstract_training)    # None on a fresh run
    ...
    ckpts.save(step, model_vars, training_vars)             # every N steps
    ckpts.save_best(step, model_vars, {"recall@1": 0.9})    # after each evaluation
    ckpts.close()
  """

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str = "recall@1"):
    self.best_metric = best_metric
    self._latest = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=keep)
    self._best = _manager(os.path.join(workdir, BEST_DIR), max_to_keep=1,
                          best_fn=self._best_value, best_mode="max",
                          keep_checkpoints_without_metrics=False)

  def _best_value(self, metrics: dict) -> float:
    if self.best_metric not in metrics:
      raise ValueError(f"config.eval.best_metric={self.best_metric!r} is not among the evaluation "
                       f"metrics {sorted(metrics)}.")
    return float(metrics[self.best_metric])

  @property
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  @property
  def best_step(self) -> int | None:
    """The step of the kept best checkpoint, or None before any evaluation."""
    return self._best.latest_step()

  def save(self, step: int, model: Any, training: Any, *, force: bool = False) -> None:
    """Saves the state after ``step`` training steps (the next batch has index ``step``).

    ``model`` is what an embedder needs, ``training`` the rest of the train state.
    """
    self._latest.save(step, force=force, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        training=ocp.args.StandardSave(training),
        progress=ocp.args.JsonSave({"step": int(step), "data_position": int(step)})))

  def save_best(self, step: int, model: Any, metrics: dict[str, float]) -> None:
    """Keeps ``model`` if ``metrics[best_metric]`` beats every earlier evaluation."""
    metrics = {k: float(v) for k, v in metrics.items()}
    self._best.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        progress=ocp.args.JsonSave({"step": int(step), "metrics": metrics})))

  def restore_latest(self, model: Any, training: Any) -> tuple[Any, Any, dict] | None:
    """``(model, training, progress)`` from the latest checkpoint, or None when there is none.

    ``model`` and ``training`` are the state trees to restore into (arrays or
    ``jax.ShapeDtypeStruct`` with shardings): the restored arrays take their shardings.
    """
    step = self._latest.latest_step()
    if step is None:
      return None
    out = self._latest.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(model)),
        training=ocp.args.StandardRestore(_abstract(training)),
        progress=ocp.args.JsonRestore()))
    return out.model, out.training, dict(out.progress)

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def restore_model(workdir: str, model: Any, *, which: str = "latest") -> tuple[Any, dict]:
  """``(model state, progress)`` from a run's ``"latest"`` or ``"best"`` checkpoint."""
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best'; got {which!r}.")
  directory = os.path.abspath(os.path.join(workdir, LATEST_DIR if which == "latest" else BEST_DIR))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No {which} checkpoint in {directory}: train there first "
                              f"(python -m rankjax.main --workdir=...).")
    out = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(model)), progress=ocp.args.JsonRestore()))
    return out.model, dict(out.progress)
  finally:
    manager.close()


def _abstract(tree: Any) -> Any:
  def to_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(to_struct, tree)
