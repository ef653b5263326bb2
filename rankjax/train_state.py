r"""The training state and the jitted update step of :func:`rankjax.train.train_and_evaluate`.

A training state is plain nested dicts of arrays (checkpoints then do not depend on NNX
internals): the model's parameters and BatchNorm statistics, the optimizer state, the loss's own
parameters (``LossSpec.params``) and, with ``config.xbm.enabled``, a cross-batch memory
(:mod:`rankjax.cross_batch`). :func:`make_train_step` builds the step that updates it on one
global batch: forward in training mode, the loss on the whole batch, backward, the optimizer's
update (:mod:`rankjax.optim`), and the batch diagnostics (:mod:`rankjax.diagnostics`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from rankjax import augment as device_augment
from rankjax import configs
from rankjax import cross_batch
from rankjax import diagnostics
from rankjax import seeding

# Where the loss's own parameters sit in the tree the optimizer updates (beside the model's
# "backbone" and "head"); see trainable_params.
LOSS_PARAMS = "loss"

# A training state: plain nested dicts of arrays, so checkpoints do not depend on NNX internals.
#   {"step": i32[], "params": {...}, "model_state": {...}, "opt_state": optax state,
#    "loss_params": {keyword: array} (the loss's own parameters, e.g. class proxies),
#    "xbm": the cross-batch memory, with config.xbm.enabled (rankjax.cross_batch)}
TrainState = dict[str, Any]


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


def diagnostics_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of :func:`rankjax.diagnostics.batch_diagnostics` matching the loss."""
  return configs.loss_spec(config.loss.name).diagnostic_options(configs.loss_kwargs(config))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule],
                    diagnostic_kwargs: dict[str, Any] | None, *,
                    batch_transform: Callable[[dict, jax.Array], dict] | None = None,
                    memory: cross_batch.MemorySettings | None = None,
                    loss_key: jax.Array | None = None,
                    batch_outputs: bool = False) -> Callable[..., tuple]:
  """``step(state, batch) -> (state, metrics)``: one optimizer step on the global batch.

  ``batch`` is ``{"image": f32[B, H, W, C], "label": int[B]}``, or ``{"activation": [B, h, w,
  c], "label"}`` with the frozen prefix's output (:mod:`rankjax.frozen_cache`); jit it with the
  shardings of :mod:`rankjax.parallel` (train_and_evaluate does). ``metrics`` holds the loss, the
  gradient norm, the learning rates and :func:`rankjax.diagnostics.batch_diagnostics` of the batch.
  ``batch_transform(batch, step)``, if given, augments the batch on the device first (e.g.
  :func:`make_batch_transform`). With ``memory``, the loss adds its term against the cross-batch
  memory ``state["xbm"]`` (:func:`rankjax.cross_batch.loss_with_memory`), which the step updates,
  and ``metrics["xbm_loss"]`` is that term. A loss that samples (``LossSpec.takes_key``)
  gets ``key=fold_in(loss_key, step)``.

  ``diagnostic_kwargs=None`` leaves the batch diagnostics out of the step. ``batch_outputs=True``
  makes it ``step(state, batch) -> (state, metrics, outputs)`` with ``outputs = {"embeddings":
  f32[B, D], "label": int[B]}`` (the labels after ``batch_transform``), from which
  :func:`make_diagnostics_fn` computes the diagnostics outside the step: the trainer does that on
  the steps it logs only, since inside the step they cost a share of every step
  (measured by benchmarks/diagnostics.py).
  """
  compute_diagnostics = (None if diagnostic_kwargs is None
                         else make_diagnostics_fn(diagnostic_kwargs))

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    if batch_transform is not None:
      batch = batch_transform(batch, state["step"])
    def compute_loss(trainable):
      params = {k: v for k, v in trainable.items() if k != LOSS_PARAMS}
      model = nnx.merge(graphdef, params, state["model_state"])
      if "activation" in batch:  # The frozen prefix's output (rankjax.frozen_cache).
        embeddings = model.embed_from_frozen(batch["activation"]).astype(jnp.float32)
      else:
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
               **(compute_diagnostics(embeddings, batch["label"]) if compute_diagnostics else {})}
    new_state = {"step": state["step"] + 1, "params": trainable, "model_state": model_state,
                 "opt_state": opt_state, "loss_params": loss_params}
    if memory is not None:
      new_state["xbm"] = with_memory["xbm"]
    if batch_outputs:
      return new_state, metrics, {"embeddings": embeddings, "label": batch["label"]}
    return new_state, metrics

  return step


def make_diagnostics_fn(diagnostic_kwargs: dict[str, Any]
                        ) -> Callable[[jax.Array, jax.Array], dict[str, jax.Array]]:
  """``fn(embeddings f32[B, D], labels int[B]) -> dict``: the batch diagnostics of one batch.

  :func:`rankjax.diagnostics.batch_diagnostics` with ``diagnostic_kwargs`` (from
  :func:`diagnostics_kwargs`) bound; jit it, or call it inside a jitted step.
  """
  return functools.partial(diagnostics.batch_diagnostics, **diagnostic_kwargs)


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
