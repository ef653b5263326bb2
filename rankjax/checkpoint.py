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

**Resuming is checked.** Once a checkpoint is committed, process 0 writes ``checksums.json`` into
its directory (the SHA-256 of each of its files); a restore verifies them and every restored array
is checked to be finite. A checkpoint that fails either check (or that orbax cannot read) is
moved to ``WORKDIR/corrupt/`` with a warning naming it and the one restored instead, the
previous kept checkpoint; when none is left the error names the directory, in one message.

**Validation evaluations are recorded.** ``WORKDIR/evaluations.json`` lists the steps whose
validation evaluation completed (metrics computed, best checkpoint chosen and committed), written
atomically after each. A resumed run repeats training from its checkpoint; it skips the
evaluations the record holds (their state and metrics are the same) and redoes any it lacks, so
a kill at any moment leaves the same best checkpoint as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from rankjax import health
from rankjax import run_log

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
CHECKSUMS_FILE = "checksums.json"
EVALUATIONS_FILE = "evaluations.json"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (unreadable, failed checksum or non-finite values)."""


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
    if ckpts.evaluation(step) is None:                      # not evaluated before a restart
      ckpts.save_best(step, model_vars, {"recall@1": 0.9})  # after each evaluation
    ckpts.close()
  """

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str = "recall@1"):
    self.best_metric = best_metric
    self._workdir = os.path.abspath(workdir)
    self._latest = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=keep)
    self._best = _manager(os.path.join(workdir, BEST_DIR), max_to_keep=1,
                          best_fn=self._best_value, best_mode="max",
                          keep_checkpoints_without_metrics=False)
    self._evaluations_path = os.path.join(self._workdir, EVALUATIONS_FILE)
    self._evaluations = read_evaluations(self._workdir)

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

  def latest_description(self) -> str:
    """Where the latest checkpoint is (for messages), or that there is none; waits for a save
    in progress to commit first, so that the message names a checkpoint on disk."""
    self._latest.wait_until_finished()
    step = self._latest.latest_step()
    if step is None:
      return f"no checkpoint in {self._latest.directory} yet"
    return str(self._latest.directory / str(step))

  def save(self, step: int, model: Any, training: Any, *, force: bool = False) -> None:
    """Saves the state after ``step`` training steps (the next batch has index ``step``).

    ``model`` is what an embedder needs, ``training`` the rest of the train state. The previous
    save is finished (and its checksums written) first.
    """
    self._latest.wait_until_finished()
    self._write_checksums()
    self._latest.save(step, force=force, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        training=ocp.args.StandardSave(training),
        progress=ocp.args.JsonSave({"step": int(step), "data_position": int(step)})))

  def evaluation(self, step: int) -> dict[str, float] | None:
    """The validation metrics of ``step`` if its evaluation completed (in this run or before a
    restart, :meth:`save_best`), else None."""
    return self._evaluations.get(int(step))

  def save_best(self, step: int, model: Any, metrics: dict[str, float]) -> None:
    """Keeps ``model`` if ``metrics[best_metric]`` beats every earlier evaluation, then records
    the evaluation of ``step`` as complete (``evaluations.json``).

    Idempotent: a step whose best checkpoint exists already (a resumed run repeating an
    evaluation a killed one had finished) is not saved again. Waits for the save to commit, so
    that the record never names an evaluation whose best checkpoint is not on disk.
    """
    metrics = {k: float(v) for k, v in metrics.items()}
    if step not in self._best.all_steps():
      self._best.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model),
          progress=ocp.args.JsonSave({"step": int(step), "metrics": metrics})))
    self._best.wait_until_finished()
    self._evaluations[int(step)] = metrics
    if jax.process_index() == 0:
      run_log.write_json_atomically(
          self._evaluations_path,
          {"val": {str(s): m for s, m in sorted(self._evaluations.items())}})

  def restore_latest(self, model: Any, training: Any) -> tuple[Any, Any, dict] | None:
    """``(model, training, progress)`` from the latest sound checkpoint, or None when there is none.

    ``model`` and ``training`` are the state trees to restore into (arrays or
    ``jax.ShapeDtypeStruct`` with shardings): the restored arrays take their shardings. A
    checkpoint that cannot be read, fails its checksums or holds a non-finite value is moved to
    ``WORKDIR/corrupt/`` with a warning, and the previous one is tried.

    Raises:
      CorruptCheckpointError: every kept checkpoint is corrupt.
    """
    failures = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      path = os.path.join(self._latest.directory, str(step))
      try:
        verify_checksums(path)
        out = self._latest.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(model)),
            training=ocp.args.StandardRestore(_abstract(training)),
            progress=ocp.args.JsonRestore()))
        for name, tree in (("model", out.model), ("training", out.training)):
          bad = health.non_finite_leaves(tree)
          if bad:
            raise CorruptCheckpointError(f"non-finite values in {name}: {', '.join(bad[:3])}")
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{path}: {_one_line(e)}")
        self._set_aside(step)
        continue
      if failures:
        logging.warning("Corrupt checkpoint(s) set aside in %s: %s. Resuming from %s instead.",
                        os.path.join(self._workdir, CORRUPT_DIR), "; ".join(failures), path)
      return out.model, out.training, dict(out.progress)
    if failures:
      raise CorruptCheckpointError(
          f"No checkpoint in {self._latest.directory} can be restored: {'; '.join(failures)}. "
          f"They are set aside in {os.path.join(self._workdir, CORRUPT_DIR)}; delete the workdir "
          "(or those checkpoints) to start the run afresh.") from None
    return None

  def _set_aside(self, step: int) -> None:
    """Moves ``checkpoints/<step>`` to ``corrupt/`` (process 0; the others wait for it)."""
    if jax.process_index() == 0:
      target = os.path.join(self._workdir, CORRUPT_DIR, f"{LATEST_DIR}-{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self._latest.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"rankjax_checkpoint_set_aside:{step}")
    self._latest.reload()

  def _write_checksums(self) -> None:
    """Process 0 writes ``checksums.json`` into each committed checkpoint that lacks one."""
    if jax.process_index() != 0:
      return
    for step in self._latest.all_steps():
      path = os.path.join(self._latest.directory, str(step))
      if not os.path.exists(os.path.join(path, CHECKSUMS_FILE)):
        run_log.write_json_atomically(os.path.join(path, CHECKSUMS_FILE), file_checksums(path))

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()
    self._write_checksums()

  def close(self) -> None:
    self.wait()
    self._latest.close()
    self._best.close()


def read_evaluations(workdir: str) -> dict[int, dict[str, float]]:
  """``{step: validation metrics}`` of the evaluations a run in ``workdir`` completed."""
  path = os.path.join(workdir, EVALUATIONS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {int(step): metrics for step, metrics in json.load(f)["val"].items()}


def file_checksums(directory: str) -> dict[str, str]:
  """``{relative path: SHA-256}`` of every file under ``directory`` but ``checksums.json``."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != CHECKSUMS_FILE and not name.endswith(".tmp"):
        with open(path, "rb") as f:
          out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
  return out


def verify_checksums(directory: str) -> None:
  """Raises :class:`CorruptCheckpointError` unless the files match ``checksums.json``.

  A checkpoint without the file (killed between its commit and the checksums) is not checked.
  """
  path = os.path.join(directory, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    want = json.load(f)
  got = file_checksums(directory)
  changed = sorted(rel for rel in want if got.get(rel) != want[rel])
  if changed:
    raise CorruptCheckpointError(f"files differ from their checksums: {', '.join(changed[:3])}")


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def restore_model(workdir: str, model: Any, *, which: str = "latest") -> tuple[Any, dict]:
  """``(model state, progress)`` from a run's ``"latest"`` or ``"best"`` checkpoint.

  Raises:
    FileNotFoundError: there is no such checkpoint.
    CorruptCheckpointError: it cannot be read (damaged files, or a model of another shape);
      the message names the checkpoint's directory.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best'; got {which!r}.")
  directory = os.path.abspath(os.path.join(workdir, LATEST_DIR if which == "latest" else BEST_DIR))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No {which} checkpoint in {directory}: train there first "
                              f"(python -m rankjax.main --workdir=...).")
    path = os.path.join(directory, str(step))
    try:
      verify_checksums(path)
      out = manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(_abstract(model)), progress=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"Cannot restore the checkpoint {path}: {_one_line(e)}") from None
    return out.model, dict(out.progress)
  finally:
    manager.close()


def _abstract(tree: Any) -> Any:
  def to_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(to_struct, tree)
