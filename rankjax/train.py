r"""Training and evaluation of an embedding model with a ranking loss, data-parallel.

:func:`train_and_evaluate` is the whole experiment; ``python -m rankjax.main`` only parses flags
and calls it, so a notebook can run exactly the same thing::

  from experiments.configs import omniglot
  metrics = train_and_evaluate(omniglot.get_config("triplet_semihard"), "/tmp/omniglot")

The update step is one ``jax.jit`` over a 1-D ``"data"`` mesh of all devices: parameters and
optimizer state replicated, the batch split along its leading axis, the state donated. The loss
is computed on the *global* batch, so every anchor meets negatives from every device, and
BatchNorm statistics are global (synchronised BatchNorm, by construction). One step on 8 devices
therefore equals one step on 1 device with the same global batch.

A loss's own parameters (class proxies; ``LossSpec.params`` in :mod:`rankjax.losses.catalogue`)
live in the train state beside the model's, trained in their own optimizer groups; with
``config.xbm.enabled`` the state also holds a cross-batch memory of past global batches
(:mod:`rankjax.cross_batch`). Both are
checkpointed with the optimizer state, so a resumed run continues exactly.

A fresh run evaluates the validation split before its first step too (``step0/val/`` in
``metrics.json``: where each curve starts; it never chooses the checkpoint). With
``config.model.head_init="pca"`` the head starts on the principal axes of the training images'
pooled features (:mod:`rankjax.head_init`); with ``config.frozen_cache.enabled`` training and
evaluation read the frozen prefix's output from a cache built once (:mod:`rankjax.frozen_cache`).

Protocol: every ``config.eval.every`` steps the *validation* split (classes carved from the
training classes, :class:`rankjax.data.Protocol`) is evaluated and ``best/`` keeps the
checkpoint with the best ``config.eval.best_metric``; at the end the test split
(``config.eval.split``) is evaluated once, on that best checkpoint (or on the last state when
there were no validation evaluations). The test split never chooses anything.

Outputs in ``workdir``: ``config.json``; ``checkpoints/`` (latest, to resume) and ``best/``, see
:mod:`rankjax.checkpoint`; TensorBoard scalars in ``tensorboard/`` (``train/``, ``val/``,
``test/``, or ``final/val/`` when ``config.eval.split="val"``, so that the final evaluation
leaves the validation curve as it was); ``metrics.json`` with the final evaluation and which
checkpoint it is of (``checkpoint``: ``"best"`` or ``"final"``, ``checkpoint_step``, and the
best's ``val/`` metrics);
``evaluations.json`` (the completed validation evaluations), ``model.json`` and ``run.lock``
(resuming and its checks: :mod:`rankjax.resume`, :mod:`rankjax.workdir_lock`,
:mod:`rankjax.health`).
:func:`rankjax.load_embedder` turns the directory into
an embedding function.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankjax import build
from rankjax import checkpoint
from rankjax import configs
from rankjax import cross_batch
from rankjax import faults
from rankjax import frozen_cache
from rankjax import head_init
from rankjax import health
from rankjax import optim
from rankjax import parallel
from rankjax import resume
from rankjax import run_log
from rankjax import seeding
from rankjax import train_state
from rankjax import workdir_lock
from rankjax.evaluation import embed as embed_lib
from rankjax.evaluation import shift_average

METRICS_FILE = "metrics.json"
CONFIG_FILE = resume.CONFIG_FILE
# The encoder of a config (rankjax.build), here too for the code that builds it with the trainer.
build_model = build.build_model
# The validation metrics of a fresh run before its first step (the start of its curves).
INITIAL_EVAL_FILE = "initial_eval.json"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config``'s model in ``workdir`` (resuming what is there); returns the final metrics.

  Args:
    config: a config built from :func:`rankjax.configs.base_config` (see experiments/configs/).
    workdir: where checkpoints, TensorBoard scalars and ``metrics.json`` go. Running again on the
      same directory resumes from its latest checkpoint.

  Returns:
    The final evaluation on ``config.eval.split``: each of ``config.eval.metrics`` (by default
    ``recall@1/2/4/8``, ``map@r``, ``r_precision``, ``nmi``); also in ``workdir/metrics.json``.

  Raises:
    rankjax.workdir_lock.WorkdirInUseError: another run holds ``workdir``.
    rankjax.resume.ConfigChangedError: ``workdir`` holds a run of another config.
    rankjax.health.NonFiniteError: training diverged (the last good checkpoint is kept).
  """
  with contextlib.ExitStack() as held:  # Releases the workdir's lock however the run ends.
    return _train_and_evaluate(config, workdir, held)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        held: contextlib.ExitStack) -> dict[str, float]:
  """The body of :func:`train_and_evaluate`; process 0 takes the workdir's lock into ``held``."""
  from rankjax import data, evaluation, losses, models  # pylint: disable=g-import-not-at-top

  # --- Config and logging (the evaluator first: a bad metric name fails before any work). ---
  configs.check_config(config)
  evaluator = evaluation.Evaluator(config.eval.metrics, distance=config.eval.distance,
                                   chunk_size=config.eval.chunk_size,
                                   nmi_seed=seeding.stream_seed(config.seed, "nmi"))
  run_log.quiet_orbax_info_logs()
  if config.distributed:
    parallel.initialize_distributed()
  parallel.check_same_config(config, workdir)  # Every process of a job runs the same experiment.
  is_chief = jax.process_index() == 0
  total_steps = config.train.steps

  # --- Mesh. ---
  mesh = parallel.make_mesh()
  global_batch_size = config.classes_per_batch * config.samples_per_class
  parallel.check_global_batch_size(global_batch_size, mesh)
  parallel.check_global_batch_size(config.eval.batch_size, mesh, what="config.eval.batch_size")
  logging.info("Mesh: %d devices (%d per host, %d hosts); global batch %d = %d classes x %d.",
               mesh.devices.size, jax.local_device_count(), jax.process_count(),
               global_batch_size, config.classes_per_batch, config.samples_per_class)

  # --- Model and loss (names and sizes are checked before any data is read). ---
  loss_fn = losses.get_loss(config.loss.name, **configs.loss_kwargs(config))
  models.check_image_size(config.model.name, config.image_size)
  protocol = data.Protocol.from_config(config.protocol)
  info = data.get_dataset_info(config.dataset, data_dir=config.data_dir, protocol=protocol)
  if config.eval.every and not info.val_classes:
    raise ValueError(
        f"config.eval.every={config.eval.every} evaluates the validation split to choose the best "
        f"checkpoint, but {config.dataset!r} has none under this protocol: set "
        "config.protocol.val_fraction > 0 (choosing by the test split would leak it), or "
        "config.eval.every=0.")
  model = build_model(config, info)
  cache = (frozen_cache.open_or_build(config, model, mesh=mesh)
           if config.frozen_cache.enabled else None)
  train_graphdef, eval_graphdef, params, model_state = train_state.split_model(model)
  embedding_dim = model.head.embedding_dim
  loss_params = init_loss_params(config, info, embedding_dim=embedding_dim)
  logging.info("Model %s: %s parameters, %d-d embeddings (%s); loss %s %s%s.", config.model.name,
               f"{sum(x.size for x in jax.tree.leaves(params)):,}", embedding_dim,
               "L2-normalised" if configs.normalize_embeddings(config) else "unnormalised",
               config.loss.name, configs.loss_kwargs(config),
               "".join(f", its {k} {tuple(v.shape)}" for k, v in loss_params.items()))

  # --- Workdir and TensorBoard. ---
  os.makedirs(workdir, exist_ok=True)
  if is_chief:
    held.enter_context(workdir_lock.hold(workdir))  # One run (one job) per workdir.
  resume.check_config(workdir, config)  # A different config is an error, before any change.
  writer = run_log.SummaryWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief)

  # --- Optimizer, shardings and the update step. ---
  tx, schedules = optim.make_optimizer(
      config.optimizer, train_state.trainable_params(params, loss_params), total_steps,
      loss_learning_rates=configs.loss_spec(config.loss.name).learning_rates(config))
  memory = cross_batch.settings(config)
  state = train_state.init_state(
      params, model_state, tx, loss_params=loss_params,
      xbm=None if memory is None else cross_batch.init_memory(memory.size, embedding_dim))
  if memory is not None:
    logging.info("Cross-batch memory of %d embeddings from step %d on, weight %g.", memory.size,
                 memory.start_step, memory.weight)
  batch_transform = train_state.make_batch_transform(config)
  train_step, state_sharding = parallel.jit_data_parallel(
      train_state.make_train_step(
          train_graphdef, loss_fn, tx, schedules, None, batch_outputs=True,
          batch_transform=batch_transform, memory=memory,
          loss_key=(seeding.stream_key(config.seed, "loss")
                    if configs.loss_spec(config.loss.name).takes_key else None)),
      state, mesh, batch_outputs=True)
  # The batch diagnostics, of the steps that log only (inside the step every step would pay
  # for them; benchmarks/diagnostics.py measures the share).
  batch_diagnostics = jax.jit(
      train_state.make_diagnostics_fn(train_state.diagnostics_kwargs(config)),
      out_shardings=parallel.replicated(mesh))
  state = jax.device_put(state, state_sharding)

  # --- Checkpoints: resume where the last run stopped. ---
  ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                 best_metric=config.eval.best_metric)
  start_step = 0
  restored = ckpts.restore_latest(train_state.model_variables(state),
                                  train_state.training_variables(state))
  if restored is not None:
    variables, training, progress = restored
    start_step = progress["data_position"]
    resume.check_restored_step(progress["step"], total_steps, workdir)
    state = {**variables, **training,
             "step": jax.device_put(jnp.int32(progress["step"]), state_sharding["step"])}
    logging.info("Resumed from %s at step %d.", os.path.join(workdir, checkpoint.LATEST_DIR),
                 start_step)

  if is_chief:
    resume.write_config(workdir, config, num_channels=info.num_channels)  # Once restored.

  # --- Input: this host's part of each global batch, from the resumed position on. ---
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if cache is None:
    batches = data.train_batches(
        config.dataset, classes_per_batch=config.classes_per_batch,
        samples_per_class=config.samples_per_class, image_size=config.image_size,
        seed=seeding.stream_seed(config.seed, "data"), data_dir=config.data_dir,
        augment=configs.augment_setting(config), start_step=start_step,
        num_shards=config.data_shards, protocol=protocol, **hosts)
  else:
    batches = frozen_cache.train_batches(cache, config, start_step=start_step, **hosts)

  # --- Evaluators. ---
  embed = embed_lib.make_eval_embed_fn(eval_graphdef, config, mesh)

  def evaluate(variables: dict, split: str) -> dict[str, float]:
    views = len(shift_average.shift_offsets(config.eval.test_time_shift))
    logging.info("Evaluating on the %s split: embedding every image%s%s, then %s.", split,
                 f" in {views} shifted views" if views > 1 else "",
                 " from the frozen cache" if cache is not None else "",
                 ", ".join(config.eval.metrics))
    start = time.perf_counter()
    embeddings, labels = embed_lib.embed_split(embed, variables, mesh, config, split=split,
                                               cache=cache)
    logging.info("Embedded %d images in %.1f s.", len(labels), time.perf_counter() - start)
    return {name: float(value) for name, value in evaluator.run(embeddings, labels)}

  # --- A fresh run: the head's start, and the validation split where training starts. ---
  if restored is None:
    if config.model.head_init == "pca":
      state["params"]["head"]["projection"] = jax.device_put(
          head_init.pca_head_params(config, eval_graphdef, train_state.model_variables(state),
                                    mesh, cache), parallel.replicated(mesh))
      logging.info("Head initialised on the principal axes of the training images' features.")
    if config.eval.every:
      initial = evaluate(train_state.model_variables(state), "val")
      logging.info("step 0 eval on val: %s", " ".join(f"{k} {v:.4f}" for k, v in initial.items()))
      writer.scalars(0, {f"val/{k}": v for k, v in initial.items()})
      if is_chief:
        run_log.write_json_atomically(os.path.join(workdir, INITIAL_EVAL_FILE), initial)

  def validate(step: int) -> None:
    """Evaluates the state of ``step`` on the validation split and keeps it if it is the best;
    skipped when the run before a restart completed that evaluation (the same state)."""
    if ckpts.evaluation(step) is not None:
      logging.info("step %d: validation evaluation completed before the restart.", step)
      return
    guard.check(state["params"])  # A diverged state is not evaluated either.
    with progress.paused(state["step"]):  # Evaluation time is not training throughput.
      ckpts.wait()  # Let a checkpoint finish writing before evaluation reads the disk.
      val_metrics = evaluate(train_state.model_variables(state), "val")
      faults.point("val", step)
      logging.info("step %d eval on val: %s", step,
                   " ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()))
      writer.scalars(step, {f"val/{k}": v for k, v in val_metrics.items()})
      ckpts.save_best(step, train_state.model_variables(state), val_metrics)

  def validates(step: int) -> bool:
    return bool(config.eval.every) and (step % config.eval.every == 0 or step == total_steps)

  # --- Loop. ---
  progress = run_log.Progress(total_steps, start_step, global_batch_size)
  guard = health.FiniteGuard(describe_kept=ckpts.latest_description)
  if restored is not None and validates(start_step):
    validate(start_step)  # A kill during this evaluation left its checkpoint, not its result.
  window = []
  for step in range(start_step + 1, total_steps + 1):
    batch = parallel.global_batch(next(batches), mesh)
    state, step_metrics, outputs = train_step(state, batch)
    faults.point("train", step)
    guard.add(step, step_metrics)
    window.append(step_metrics)
    if step == start_step + 1:
      progress.compiled(state["step"])
    if step % config.train.log_every == 0 or step == total_steps:
      means = {k: float(np.mean(v)) for k, v in run_log.stack_metrics(window).items()}
      diagnosed = batch_diagnostics(outputs["embeddings"], outputs["label"])
      means.update({k: float(v) for k, v in jax.device_get(diagnosed).items()})
      window = []
      guard.check()
      logging.info("%s | %s", progress(step),
                   " ".join(f"{k} {v:.4g}" for k, v in means.items() if "/" not in k))
      writer.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                            **progress.rates(prefix="perf/")})
    if step % config.train.checkpoint_every == 0 or step == total_steps:
      guard.check(state["params"])  # A diverged state is never saved.
      ckpts.save(step, train_state.model_variables(state), train_state.training_variables(state),
                 force=True)
      faults.point("save", step)
    if validates(step):
      validate(step)

  # --- The final evaluation, once: the best checkpoint by validation, else the last state. ---
  ckpts.wait()
  report = {"checkpoint": "final", "checkpoint_step": int(state["step"])}
  variables = train_state.model_variables(state)
  if config.eval.every and ckpts.best_step is not None:
    variables, best = checkpoint.restore_model(workdir, variables, which="best")
    report = {"checkpoint": "best", "checkpoint_step": int(best["step"]),
              "selected_by": f"val/{config.eval.best_metric}",
              **{f"val/{k}": v for k, v in best["metrics"].items()}}
  initial_path = os.path.join(workdir, INITIAL_EVAL_FILE)
  if config.eval.every and os.path.exists(initial_path):
    with open(initial_path) as f:
      report.update({f"step0/val/{k}": v for k, v in json.load(f).items()})
  logging.info("Final evaluation on the %s split of the %s checkpoint (step %d).",
               config.eval.split, report["checkpoint"], report["checkpoint_step"])
  metrics = evaluate(variables, config.eval.split)
  faults.point("test", total_steps)
  logging.info("%s: %s", config.eval.split, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  # A final evaluation of the val split must not write over the last step's validation point.
  tag = "final/val" if config.eval.split == "val" else config.eval.split
  writer.scalars(int(state["step"]), {f"{tag}/{k}": v for k, v in metrics.items()})
  ckpts.close()
  writer.close()
  if is_chief:
    run_log.write_json_atomically(os.path.join(workdir, METRICS_FILE), {**metrics, **report})
  return metrics


# ---------------------------------------------------------------------------------------------
# Building blocks (importable: tests and notebooks use them directly).
# ---------------------------------------------------------------------------------------------


def init_loss_params(config: ml_collections.ConfigDict, info: Any, *,
                     embedding_dim: int | None = None) -> dict[str, jax.Array]:
  """The loss's own parameters at their start (``LossSpec.params``); ``{}`` for most.

  Sized by the training labels (``info.train_classes``, x4 with ``config.rotate_classes``) and
  ``embedding_dim`` (default ``config.model.embedding_dim``; the model's ``head.embedding_dim``
  when that is ``None``); drawn from their own stream of ``config.seed`` (:mod:`rankjax.seeding`).
  """
  spec = configs.loss_spec(config.loss.name)
  if not spec.params:
    return {}
  embedding_dim = embedding_dim or config.model.embedding_dim
  if embedding_dim is None:
    raise ValueError(f"loss {config.loss.name!r} has parameters sized by the embedding: pass "
                     "embedding_dim (the model's head.embedding_dim).")
  return spec.init_params(seeding.stream_key(config.seed, "loss_params"),
                          configs.num_train_labels(config, info.train_classes), embedding_dim,
                          **configs.loss_kwargs(config))
