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

A loss's own parameters (class proxies, :mod:`rankjax.loss_params`) live in the train state beside
the model's, trained in their own optimizer groups; with ``config.xbm.enabled`` the state also
holds a cross-batch memory of past global batches (:mod:`rankjax.cross_batch`). Both are
checkpointed with the optimizer state, so a resumed run continues exactly.

Protocol: every ``config.eval.every`` steps the *validation* split (classes carved from the
training classes, :class:`rankjax.data.Protocol`) is evaluated and ``best/`` keeps the
checkpoint with the best ``config.eval.best_metric``; at the end the test split
(``config.eval.split``) is evaluated once, on that best checkpoint (or on the last state when
there were no validation evaluations). The test split never chooses anything.

Outputs in ``workdir``: ``config.json``; ``checkpoints/`` (latest, to resume) and ``best/``, see
:mod:`rankjax.checkpoint`; TensorBoard scalars in ``tensorboard/`` (``train/``, ``val/``,
``test/``); ``metrics.json`` with the final evaluation and which checkpoint it is of
(``checkpoint``: ``"best"`` or ``"final"``, ``checkpoint_step``, and the best's ``val/`` metrics).
:func:`rankjax.load_embedder` turns the directory into
an embedding function.
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from rankjax import checkpoint
from rankjax import configs
from rankjax import cross_batch
from rankjax import diagnostics
from rankjax import loss_params as loss_params_lib
from rankjax import parallel
from rankjax import seeding
from rankjax import augment as device_augment
from rankjax.evaluation import test_time

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
# Where the loss's own parameters sit in the tree the optimizer updates (beside the model's
# "backbone" and "head"); see trainable_params.
LOSS_PARAMS = "loss"

# A training state: plain nested dicts of arrays, so checkpoints do not depend on NNX internals.
#   {"step": i32[], "params": {...}, "model_state": {...}, "opt_state": optax state,
#    "loss_params": {keyword: array} (the loss's own parameters, e.g. class proxies),
#    "xbm": the cross-batch memory, with config.xbm.enabled (rankjax.cross_batch)}
TrainState = dict[str, Any]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config``'s model in ``workdir`` (resuming what is there); returns the final metrics.

  Args:
    config: a config built from :func:`rankjax.configs.base_config` (see experiments/configs/).
    workdir: where checkpoints, TensorBoard scalars and ``metrics.json`` go. Running again on the
      same directory resumes from its latest checkpoint.

  Returns:
    The final evaluation on ``config.eval.split``: each of ``config.eval.metrics`` (by default
    ``recall@1/2/4/8``, ``map@r``, ``r_precision``, ``nmi``); also in ``workdir/metrics.json``.
  """
  from rankjax import data, evaluation, losses, models  # pylint: disable=g-import-not-at-top

  # --- Config and logging (the evaluator first: a bad metric name fails before any work). ---
  configs.check_config(config)
  evaluator = evaluation.Evaluator(config.eval.metrics, distance=config.eval.distance,
                                   chunk_size=config.eval.chunk_size,
                                   nmi_seed=seeding.stream_seed(config.seed, "nmi"))
  _quiet_orbax_info_logs()
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
  train_graphdef, eval_graphdef, params, model_state = split_model(model)
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
    _log_config_changes(os.path.join(workdir, CONFIG_FILE), config)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = _SummaryWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief)

  # --- Optimizer, shardings and the update step. ---
  tx, schedules = make_optimizer(
      config.optimizer, trainable_params(params, loss_params), total_steps,
      loss_learning_rates=loss_params_lib.learning_rates(config.loss.name, config))
  memory = cross_batch.settings(config)
  state = init_state(params, model_state, tx, loss_params=loss_params, xbm=None if memory is None
                     else cross_batch.init_memory(memory.size, embedding_dim))
  if memory is not None:
    logging.info("Cross-batch memory of %d embeddings from step %d on, weight %g.", memory.size,
                 memory.start_step, memory.weight)
  batch_transform = make_batch_transform(config)
  train_step, state_sharding = parallel.jit_data_parallel(
      make_train_step(train_graphdef, loss_fn, tx, schedules, diagnostics_kwargs(config),
                      batch_transform=batch_transform, memory=memory,
                      loss_key=(seeding.stream_key(config.seed, "loss")
                                if config.loss.name in losses.LOSSES_NEEDING_KEY else None)),
      state, mesh)
  state = jax.device_put(state, state_sharding)

  # --- Checkpoints: resume where the last run stopped. ---
  ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                 best_metric=config.eval.best_metric)
  start_step = 0
  restored = ckpts.restore_latest(model_variables(state), training_variables(state))
  if restored is not None:
    variables, training, progress = restored
    start_step = progress["data_position"]
    state = {**variables, **training,
             "step": jax.device_put(jnp.int32(progress["step"]), state_sharding["step"])}
    logging.info("Resumed from %s at step %d.", os.path.join(workdir, checkpoint.LATEST_DIR),
                 start_step)

  # --- Input: this host's part of each global batch, from the resumed position on. ---
  batches = data.train_batches(
      config.dataset, classes_per_batch=config.classes_per_batch,
      samples_per_class=config.samples_per_class, image_size=config.image_size,
      seed=seeding.stream_seed(config.seed, "data"), data_dir=config.data_dir,
      augment=config.augment, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=config.data_shards, protocol=protocol)

  # --- Evaluators. ---
  embed = make_eval_embed_fn(eval_graphdef, config, mesh)

  def evaluate(variables: dict, split: str) -> dict[str, float]:
    views = len(test_time.shift_offsets(config.eval.test_time_shift))
    logging.info("Evaluating on the %s split: embedding every image%s, then %s.", split,
                 f" in {views} shifted views" if views > 1 else "",
                 ", ".join(config.eval.metrics))
    start = time.perf_counter()
    embeddings, labels = embed_split(embed, variables, mesh, config, split=split)
    logging.info("Embedded %d images in %.1f s.", len(labels), time.perf_counter() - start)
    return {name: float(value) for name, value in evaluator.run(embeddings, labels)}

  # --- Loop. ---
  progress = _Progress(total_steps, start_step, global_batch_size)
  window = []
  for step in range(start_step + 1, total_steps + 1):
    batch = parallel.global_batch(next(batches), mesh)
    state, step_metrics = train_step(state, batch)
    window.append(step_metrics)
    if step == start_step + 1:
      progress.compiled(state["step"])
    if step % config.train.log_every == 0 or step == total_steps:
      means = {k: float(np.mean(v)) for k, v in _stack(window).items()}
      window = []
      logging.info("%s | %s", progress(step),
                   " ".join(f"{k} {v:.4g}" for k, v in means.items() if "/" not in k))
      writer.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                            **progress.rates(prefix="perf/")})
    if step % config.train.checkpoint_every == 0 or step == total_steps:
      ckpts.save(step, model_variables(state), training_variables(state), force=True)
    if config.eval.every and (step % config.eval.every == 0 or step == total_steps):
      ckpts.wait()  # Let a checkpoint finish writing before evaluation reads the disk.
      val_metrics = evaluate(model_variables(state), "val")
      logging.info("step %d eval on val: %s", step,
                   " ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()))
      writer.scalars(step, {f"val/{k}": v for k, v in val_metrics.items()})
      ckpts.save_best(step, model_variables(state), val_metrics)
      progress.pause()  # Evaluation time is not training throughput.

  # --- The final evaluation, once: the best checkpoint by validation, else the last state. ---
  ckpts.wait()
  report = {"checkpoint": "final", "checkpoint_step": int(state["step"])}
  variables = model_variables(state)
  if config.eval.every and ckpts.best_step is not None:
    variables, best = checkpoint.restore_model(workdir, variables, which="best")
    report = {"checkpoint": "best", "checkpoint_step": int(best["step"]),
              "selected_by": f"val/{config.eval.best_metric}",
              **{f"val/{k}": v for k, v in best["metrics"].items()}}
  logging.info("Final evaluation on the %s split of the %s checkpoint (step %d).",
               config.eval.split, report["checkpoint"], report["checkpoint_step"])
  metrics = evaluate(variables, config.eval.split)
  logging.info("%s: %s", config.eval.split, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  writer.scalars(int(state["step"]), {f"{config.eval.split}/{k}": v for k, v in metrics.items()})
  ckpts.close()
  writer.close()
  if is_chief:
    _write_json_atomically(os.path.join(workdir, METRICS_FILE), {**metrics, **report})
  return metrics


# ---------------------------------------------------------------------------------------------
# Building blocks (importable: tests and notebooks use them directly).
# ---------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, info: Any) -> nnx.Module:
  """The encoder + head of ``config.model`` for a dataset with ``info.num_channels`` channels.

  ``info`` is a :class:`rankjax.data.DatasetInfo` or anything with ``num_channels`` (the dataset's
  spec: the model needs nothing else of the data, nor of the loss).
  """
  from rankjax import models  # pylint: disable=g-import-not-at-top
  return models.get_model(
      config.model.name, embedding_dim=config.model.embedding_dim,
      num_channels=info.num_channels, pooling=config.model.pooling,
      normalize=configs.normalize_embeddings(config),
      freeze_batchnorm=config.model.freeze_batchnorm, dtype=jnp.dtype(config.model.dtype),
      pretrained=config.model.pretrained,
      backbone_options=config.model.backbone_options.to_dict() or None,
      rngs=nnx.Rngs(seeding.stream_key(config.seed, "init")))


def init_loss_params(config: ml_collections.ConfigDict, info: Any, *,
                     embedding_dim: int | None = None) -> dict[str, jax.Array]:
  """The loss's own parameters at their start (:mod:`rankjax.loss_params`); ``{}`` for most.

  Sized by the training labels (``info.train_classes``, x4 with ``config.rotate_classes``) and
  ``embedding_dim`` (default ``config.model.embedding_dim``; the model's ``head.embedding_dim``
  when that is ``None``); drawn from their own stream of ``config.seed`` (:mod:`rankjax.seeding`).
  """
  if not loss_params_lib.has_params(config.loss.name):
    return {}
  embedding_dim = embedding_dim or config.model.embedding_dim
  if embedding_dim is None:
    raise ValueError(f"loss {config.loss.name!r} has parameters sized by the embedding: pass "
                     "embedding_dim (the model's head.embedding_dim).")
  return loss_params_lib.init_loss_params(
      config.loss.name, configs.num_train_labels(config, info.train_classes),
      embedding_dim, seeding.stream_key(config.seed, "loss_params"),
      **configs.loss_kwargs(config))


def split_model(model: nnx.Module):
  """``(train graphdef, eval graphdef, params, model_state)``; the states as plain dicts.

  ``model_state`` is every variable that is not a trainable ``nnx.Param`` (BatchNorm statistics).
  Train and eval modes differ only in static attributes, hence two graph definitions over the
  same variables.
  """
  model.train()
  train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return (train_graphdef, eval_graphdef, nnx.to_pure_dict(params),
          nnx.to_pure_dict(model_state))


def init_state(params: Any, model_state: Any, tx: optax.GradientTransformation, *,
               loss_params: dict[str, jax.Array] | None = None,
               xbm: dict[str, jax.Array] | None = None) -> TrainState:
  """The train state before the first step.

  ``loss_params``: the loss's own parameters, if it has any; ``xbm``: an empty cross-batch
  memory (:func:`rankjax.cross_batch.init_memory`) when training with one.
  """
  loss_params = dict(loss_params or {})
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": tx.init(trainable_params(params, loss_params)), "loss_params": loss_params}
  if xbm is not None:
    state["xbm"] = xbm
  return state


def trainable_params(params: Any, loss_params: dict[str, jax.Array]) -> dict[str, Any]:
  """The tree the optimizer updates: the model's parameters and, under ``"loss"``, the loss's.

  Without loss parameters it is the model's parameters alone.
  """
  if LOSS_PARAMS in params:
    raise ValueError(f"The model has a top-level parameter {LOSS_PARAMS!r}, the name reserved for "
                     "the loss's own parameters.")
  return {**params, LOSS_PARAMS: loss_params} if loss_params else params


def model_variables(state: TrainState) -> dict[str, Any]:
  """What an embedder needs from a train state: ``{"params", "model_state"}``."""
  return {"params": state["params"], "model_state": state["model_state"]}


def training_variables(state: TrainState) -> dict[str, Any]:
  """What only training needs (checkpointed to resume): optimizer state, the loss's parameters,
  the cross-batch memory."""
  return {k: v for k, v in state.items() if k not in ("step", "params", "model_state")}


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int, *,
                   loss_learning_rates: dict[str, float] | None = None
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """The optax optimizer of ``config.optimizer`` and its learning-rate schedules by group.

  ``params`` is the tree to optimise: the model's parameters, and the loss's own under ``"loss"``
  (:func:`trainable_params`). Parameters under the model's ``head`` get ``head_learning_rate``
  (when set), each parameter of the loss its own group at ``loss_learning_rates[keyword]`` (e.g.
  ``proxies`` at :func:`rankjax.configs.proxy_learning_rate`; see
  :func:`rankjax.loss_params.learning_rates`), and the backbone ``learning_rate``, each with the
  same warm-up and schedule (``optax.multi_transform`` by path). Weight decay applies to kernels
  and proxies only (rank >= 2), not to biases, BatchNorm scales or a scalar margin. The global
  gradient norm is clipped first when ``grad_clip_norm > 0``.

  Returns:
    ``(tx, {"backbone": schedule, "head": schedule[, keyword: schedule per loss parameter]})``.
  """
  loss_learning_rates = dict(loss_learning_rates or {})
  missing = sorted(set(params.get(LOSS_PARAMS, {})) - set(loss_learning_rates))
  if missing:
    raise ValueError(f"The loss's parameters {missing} have no learning rate "
                     "(loss_learning_rates).")
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)

  def schedule(peak: float) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
      main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
      main = optax.cosine_decay_schedule(peak, rest)
    elif cfg.schedule == "linear":
      main = optax.linear_schedule(peak, 0.0, rest)
    elif cfg.schedule == "step":
      main = optax.piecewise_constant_schedule(
          peak, {int(s) - warmup: cfg.decay_factor for s in cfg.decay_steps if s > warmup})
    else:
      raise ValueError(f"Unknown schedule {cfg.schedule!r} (config.optimizer.schedule); choose "
                       f"one of {', '.join(configs.SCHEDULES)}.")
    if not warmup:
      return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])

  def optimizer(lr: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "adamw":
      return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         mask=decay_mask)
    if cfg.name == "sgd":
      base = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    elif cfg.name == "adam":
      base = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "rmsprop":
      base = optax.rmsprop(lr, decay=cfg.rmsprop_decay, eps=cfg.eps,
                           momentum=cfg.momentum or None)
    else:
      raise ValueError(f"Unknown optimizer {cfg.name!r} (config.optimizer.name); choose one of "
                       f"{', '.join(configs.OPTIMIZERS)}.")
    if cfg.weight_decay:  # L2 regularisation, as PyTorch's weight_decay for these optimizers.
      base = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), base)
    return base

  schedules = {"backbone": schedule(cfg.learning_rate)}
  schedules["head"] = (schedules["backbone"] if cfg.head_learning_rate is None
                       else schedule(cfg.head_learning_rate))
  for name in sorted(params.get(LOSS_PARAMS, {})):
    schedules[name] = schedule(loss_learning_rates[name])
  if not params.get(LOSS_PARAMS) and cfg.head_learning_rate is None:
    tx = optimizer(schedules["backbone"])
  else:
    tx = optax.multi_transform({group: optimizer(lr) for group, lr in schedules.items()},
                               param_groups(params))
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedules


def param_groups(params: Any) -> Any:
  """``"head"`` under the model's ``head``, its keyword for a loss parameter, else
  ``"backbone"``."""

  def group(path, _):
    top = getattr(path[0], "key", None)
    if top == LOSS_PARAMS:
      return path[1].key
    return "head" if top == "head" else "backbone"

  return jax.tree_util.tree_map_with_path(group, params)


def diagnostics_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of :func:`rankjax.diagnostics.batch_diagnostics` matching the loss."""
  kwargs = configs.loss_kwargs(config)
  out = {"distance": kwargs.get("distance", "euclidean")}
  if config.loss.name == "contrastive":
    out.update(pos_margin=kwargs["pos_margin"], neg_margin=kwargs["neg_margin"])
  elif config.loss.name.startswith("triplet"):
    out["margin"] = kwargs["margin"]
  return out


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule], diagnostic_kwargs: dict[str, Any], *,
                    batch_transform: Callable[[dict, jax.Array], dict] | None = None,
                    memory: cross_batch.MemorySettings | None = None,
                    loss_key: jax.Array | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``: one optimizer step on the global batch.

  ``batch`` is ``{"image": f32[B, H, W, C], "label": int[B]}``; jit it with the shardings of
  :mod:`rankjax.parallel` (train_and_evaluate does). ``metrics`` holds the loss, the gradient norm,
  the learning rates and :func:`rankjax.diagnostics.batch_diagnostics` of the batch.
  ``batch_transform(batch, step)``, if given, augments the batch on the device first (e.g.
  :func:`make_batch_transform`). With ``memory``, the loss adds its term against the cross-batch
  memory ``state["xbm"]`` (:func:`rankjax.cross_batch.loss_with_memory`), which the step updates,
  and ``metrics["xbm_loss"]`` is that term. A loss that samples (``losses.LOSSES_NEEDING_KEY``)
  gets ``key=fold_in(loss_key, step)``.
  """

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    if batch_transform is not None:
      batch = batch_transform(batch, state["step"])
    def compute_loss(trainable):
      params = {k: v for k, v in trainable.items() if k != LOSS_PARAMS}
      model = nnx.merge(graphdef, params, state["model_state"])
      embeddings = model(batch["image"]).astype(jnp.float32)
      new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
      options = dict(trainable.get(LOSS_PARAMS, {}))
      if loss_key is not None:
        options["key"] = jax.random.fold_in(loss_key, state["step"])
      if memory is None:
        return loss_fn(embeddings, batch["label"], **options), (embeddings, new_model_state, {})
      loss, xbm, memory_loss = cross_batch.loss_with_memory(
          loss_fn, embeddings, batch["label"], state["xbm"], state["step"], memory, **options)
      return loss, (embeddings, new_model_state, {"xbm": xbm, "xbm_loss": memory_loss})

    trainable = trainable_params(state["params"], state["loss_params"])
    (loss, (embeddings, model_state, with_memory)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    loss_params = trainable.pop(LOSS_PARAMS, {})
    metrics = {"loss": loss, **({"xbm_loss": with_memory["xbm_loss"]} if memory else {}),
               "grad_norm": optax.tree.norm(grads),
               **{f"lr/{k}": s(state["step"]) for k, s in schedules.items()},
               **diagnostics.batch_diagnostics(embeddings, batch["label"], **diagnostic_kwargs)}
    new_state = {"step": state["step"] + 1, "params": trainable, "model_state": model_state,
                 "opt_state": opt_state, "loss_params": loss_params}
    if memory is not None:
      new_state["xbm"] = with_memory["xbm"]
    return new_state, metrics

  return step


def make_batch_transform(config: ml_collections.ConfigDict
                         ) -> Callable[[dict, jax.Array], dict] | None:
  """The on-device augmentations the config asks for, as ``transform(batch, step)`` (or None).

  ``config.affine`` (a random rotation, scale and shift per image,
  :func:`rankjax.augment.random_affine`) comes first, then ``config.rotate_classes``
  (:func:`rankjax.augment.rotate_classes`); each draws from its own stream of ``config.seed``
  (:mod:`rankjax.seeding`).
  """
  affine = dict(config.affine)
  transforms = []
  if not device_augment.is_identity(**affine):
    transforms.append(functools.partial(device_augment.random_affine,
                                        key=seeding.stream_key(config.seed, "device_augment"),
                                        **affine))
  if config.rotate_classes:
    transforms.append(functools.partial(device_augment.rotate_classes,
                                        key=seeding.stream_key(config.seed, "rotate_classes")))
  if not transforms:
    return None

  def transform(batch, step):
    for fn in transforms:
      batch = fn(batch, step)
    return batch

  return transform


def make_embed_fn(eval_graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None, *,
                  test_time_shift: int = 0, normalize_views: bool = False
                  ) -> Callable[[dict, jax.Array], jax.Array]:
  """``embed(model_variables, images) -> f32[B, E]`` in eval mode, jitted (sharded on ``mesh``).

  ``test_time_shift=s > 0`` returns the mean embedding of the ``(2s + 1)^2`` copies of each image
  shifted by up to ``s`` pixels, each view L2-normalised first if ``normalize_views``
  (:mod:`rankjax.evaluation.test_time`).
  """

  def embed(variables, images):
    model = nnx.merge(eval_graphdef, variables["params"], variables["model_state"])
    return test_time.mean_over_shifts(lambda x: model(x).astype(jnp.float32), images,
                                      test_time_shift, normalize=normalize_views)

  if mesh is None:
    return jax.jit(embed)
  return jax.jit(embed, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def make_eval_embed_fn(eval_graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh | None = None
                       ) -> Callable[[dict, jax.Array], jax.Array]:
  """:func:`make_embed_fn` with the evaluation's test-time shifts (``config.eval.test_time_shift``;
  views averaged on the unit sphere when ``config.eval.distance`` is cosine)."""
  return make_embed_fn(eval_graphdef, mesh, test_time_shift=config.eval.test_time_shift,
                       normalize_views=config.eval.distance == "cosine")


def embed_split(embed: Callable, variables: dict, mesh: jax.sharding.Mesh,
                config: ml_collections.ConfigDict, *, split: str | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every image of ``split`` (default ``config.eval.split``) once, on the host.

  Returns ``(f32[N, E], int32[N])``. With several processes each embeds its shard; every process
  gets all ``N`` embeddings, in the split's own order (so the metrics equal a single process's).
  """
  from rankjax import data  # pylint: disable=g-import-not-at-top
  outs = []
  for host_batch in data.eval_batches(
      config.dataset, batch_size=config.eval.batch_size, image_size=config.image_size,
      split=split or config.eval.split, data_dir=config.data_dir,
      process_index=jax.process_index(), process_count=jax.process_count(),
      protocol=config.protocol):
    batch = parallel.global_batch(host_batch, mesh)
    outs.append(parallel.to_host({"embedding": embed(variables, batch["image"]),
                                  "label": batch["label"], "mask": batch["mask"]}))
  out = {k: parallel.process_order(np.concatenate([o[k] for o in outs]), config.eval.batch_size)
         for k in outs[0]}
  keep = out["mask"].astype(bool)
  return out["embedding"][keep], out["label"][keep]


# ---------------------------------------------------------------------------------------------
# Progress and TensorBoard.
# ---------------------------------------------------------------------------------------------


class _Progress:
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

  def pause(self) -> None:
    self.last_time = time.perf_counter()

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


class _SummaryWriter:
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


def _log_config_changes(path: str, config: ml_collections.ConfigDict) -> None:
  """Warns when a workdir is resumed with a config other than the one it was started with."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = _flatten(json.load(f))
  now = _flatten(json.loads(config.to_json_best_effort()))
  changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
  if changed:
    logging.warning("%s was written by a run with another config; changed: %s", path,
                    ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _quiet_orbax_info_logs() -> None:
  """Orbax logs every file operation at INFO; keep its warnings, drop the rest."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


class _DropOrbaxInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _stack(window: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  fetched = jax.device_get(window)
  return {k: np.stack([m[k] for m in fetched]) for k in fetched[0]}


def _write_json_atomically(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
