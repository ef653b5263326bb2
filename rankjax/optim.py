r"""The optimizer of ``config.optimizer``: optax, with learning-rate groups by parameter path.

The backbone, the embedding head (``head_learning_rate``) and each of the loss's own parameters
(class proxies at their own rate, ``LossSpec.learning_rates``) are separate groups
with the same warm-up and schedule; weight decay applies to kernels and proxies only.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from rankjax import configs
from rankjax.train_state import LOSS_PARAMS


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int, *,
                   loss_learning_rates: dict[str, float] | None = None
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """The optax optimizer of ``config.optimizer`` and its learning-rate schedules by group.

  ``params`` is the tree to optimise: the model's parameters, and the loss's own under ``"loss"``
  (:func:`rankjax.train_state.trainable_params`). Parameters under the model's ``head`` get
  ``head_learning_rate`` (when set), each parameter of the loss its own group at
  ``loss_learning_rates[keyword]`` (e.g. ``proxies`` at
  :func:`rankjax.losses.spec.proxy_learning_rate`; see ``LossSpec.learning_rates``),
  and the backbone ``learning_rate``, each with the same warm-up and schedule
  (``optax.multi_transform`` by path). Weight decay applies to kernels and proxies only (rank >=
  2), not to biases, BatchNorm scales or a scalar margin. The global gradient norm is clipped
  first when ``grad_clip_norm > 0``.

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
