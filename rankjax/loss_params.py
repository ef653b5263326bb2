r"""Parameters that belong to a loss: class proxies, a learned margin, ...

A loss with parameters stays a pure function of ``(embeddings, labels)``; its parameters are
keyword arguments (``proxy_anchor_loss(x, y, proxies=p)``). This module says, for each config loss
name, which parameters the loss has, how they start (from the number of training labels and the
embedding size), and at which learning rate the optimizer trains each. :mod:`rankjax.train` keeps
them in the train state as ``state["loss_params"] = {keyword: array}``, passes them to the loss as
keywords, trains them with the network (one optimizer group per parameter, named by its keyword)
and checkpoints them; the encoder and the embedder know nothing of them.

=====================  =============  =================  ==========================================
loss                   parameter      shape              learning rate
=====================  =============  =================  ==========================================
proxy_anchor           ``proxies``    ``[C, D]``         ``optimizer.proxy_learning_rate``
normalized_softmax     ``proxies``    ``[C, D]``         ``optimizer.proxy_learning_rate``
arcface, cosface       ``proxies``    ``[C, D]``         ``optimizer.proxy_learning_rate``
subcenter_arcface      ``proxies``    ``[C, K, D]``      ``optimizer.proxy_learning_rate``
margin                 ``beta``       ``[C]``            ``loss.margin.beta_learning_rate``
=====================  =============  =================  ==========================================

``C`` is the number of training labels (:func:`rankjax.configs.num_train_labels`), ``D`` the
embedding size, ``K`` ``loss.subcenter_arcface.sub_centers``. Proxies start as a normal draw of
variance ``2 / C`` (:func:`proxy_init`, Proxy-Anchor's reference initialisation; the losses
normalise them); the margin loss's :math:`\beta` starts at ``loss.margin.beta``
for every class (Wu et al. 2017 learn one per class).

A new loss with parameters registers them here, e.g. one proxy per sub-centre and class and a
learned margin with its own config key::

    register("subcenter_arcface", proxies=LossParam(
        init=lambda key, num_classes, dim, *, sub_centers=3, **_: jax.random.normal(
            key, (num_classes * sub_centers, dim)),
        learning_rate=proxy_learning_rate))
    register("margin", beta=LossParam(
        init=lambda key, num_classes, dim, *, beta=1.2, **_: jnp.full((num_classes,), beta),
        learning_rate=lambda config: config.loss.margin.beta_learning_rate,
        config_keys=("beta_learning_rate",)))

``init`` receives the loss's config options (``config.loss.<name>``) as keywords, so a shape or a
starting value can follow them; ``config_keys`` are the keys of that section that configure the
parameter rather than the loss (they are not passed to the loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Optimizer groups that are the network's: a loss parameter may not take these names.
_NETWORK_GROUPS = ("backbone", "head")


@dataclasses.dataclass(frozen=True)
class LossParam:
  """One learned parameter of a loss.

  Attributes:
    init: ``init(key, num_classes, embedding_dim, **loss_options) -> jax.Array``, its starting
      value; ``loss_options`` are the loss's config options (unknown ones are to be ignored).
    learning_rate: ``learning_rate(config) -> float``, its peak learning rate, from the whole
      training config (it follows the backbone's warm-up and schedule).
    config_keys: keys of ``config.loss.<name>`` that configure this parameter, not the loss.
  """
  init: Callable[..., jax.Array]
  learning_rate: Callable[[Any], float]
  config_keys: tuple[str, ...] = ()


_REGISTRY: dict[str, dict[str, LossParam]] = {}


def register(loss_name: str, **params: LossParam) -> None:
  """Declares the parameters of the loss called ``loss_name``, by the keyword the loss takes."""
  for name, param in params.items():
    if name in _NETWORK_GROUPS:
      raise ValueError(f"A loss parameter cannot be called {name!r}: that is the optimizer group "
                       f"of the network's {name}.")
    if not isinstance(param, LossParam):
      raise TypeError(f"{loss_name}.{name} must be a LossParam; got {param!r}.")
  _REGISTRY[loss_name] = dict(params)


def specs(loss_name: str) -> dict[str, LossParam]:
  """``{keyword: LossParam}`` of the loss ``loss_name``; ``{}`` for a loss without parameters."""
  return dict(_REGISTRY.get(loss_name, {}))


def has_params(loss_name: str) -> bool:
  return bool(_REGISTRY.get(loss_name))


def config_keys(loss_name: str) -> tuple[str, ...]:
  """The keys of ``config.loss.<loss_name>`` that configure its parameters, not the loss."""
  return tuple(key for param in specs(loss_name).values() for key in param.config_keys)


def init_loss_params(loss_name: str, num_classes: int, embedding_dim: int, key: jax.Array,
                     **loss_kwargs) -> dict[str, jax.Array]:
  """The starting parameters of ``loss_name``: ``{keyword: array}``, ``{}`` for most losses.

  Args:
    loss_name: a config loss name (``config.loss.name``).
    num_classes: the number of training labels (labels are ``0 .. num_classes - 1``).
    embedding_dim: the embedding size ``D``.
    key: a JAX PRNG key; each parameter draws from its own fold of it.
    **loss_kwargs: the loss's options (``config.loss.<name>``), which may set shapes or values.

  Example:
    >>> params = init_loss_params("proxy_anchor", 10, 4, jax.random.key(0))
    >>> {k: v.shape for k, v in params.items()}
    {'proxies': (10, 4)}
  """
  if int(num_classes) <= 0 and has_params(loss_name):
    raise ValueError(f"Loss {loss_name!r} has one parameter row per training class; got "
                     f"num_classes={num_classes}.")
  out = {}
  for index, (name, param) in enumerate(sorted(specs(loss_name).items())):
    out[name] = param.init(jax.random.fold_in(key, index), int(num_classes), int(embedding_dim),
                           **loss_kwargs)
  return out


def learning_rates(loss_name: str, config) -> dict[str, float]:
  """``{keyword: peak learning rate}`` of the parameters of ``loss_name`` under ``config``."""
  return {name: float(param.learning_rate(config)) for name, param in specs(loss_name).items()}


def proxy_learning_rate(config) -> float:
  """``config.optimizer.proxy_learning_rate``, by default 100x the network's (Proxy-Anchor's)."""
  from rankjax import configs  # pylint: disable=g-import-not-at-top  (configs imports this module)
  return configs.proxy_learning_rate(config.optimizer)


def _class_proxies(key, num_classes, embedding_dim, **_):
  return proxy_init(key, (num_classes, embedding_dim))


def proxy_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  r"""Proxies of ``shape = (C, ..., D)`` drawn from :math:`\mathcal{N}(0, 2 / C)`.

  Proxy-Anchor's reference code (Kim et al. 2020) initialises its ``[C, D]`` proxies with
  PyTorch's ``kaiming_normal_(mode="fan_out")``, whose fan is the ``C`` rows. The losses only use
  the proxies' directions, so the scale sets how far an optimizer step turns them: with Adam's
  steps of about the learning rate per coordinate, a proxy of norm :math:`\sqrt{2D / C}` turns
  several times faster than a standard normal one of norm :math:`\sqrt{D}`.
  """
  return jax.random.normal(key, shape) * jnp.sqrt(2.0 / shape[0])


PROXIES = LossParam(init=_class_proxies, learning_rate=proxy_learning_rate)
register("proxy_anchor", proxies=PROXIES)
register("normalized_softmax", proxies=PROXIES)
register("arcface", proxies=PROXIES)
register("cosface", proxies=PROXIES)
register("subcenter_arcface", proxies=LossParam(
    init=lambda key, num_classes, dim, *, sub_centers=3, **_: proxy_init(
        key, (num_classes, sub_centers, dim)),
    learning_rate=proxy_learning_rate))
register("margin", beta=LossParam(
    init=lambda key, num_classes, dim, *, beta=1.2, **_: jnp.full((num_classes,), beta,
                                                                 jnp.float32),
    learning_rate=lambda config: config.loss.margin.beta_learning_rate,
    config_keys=("beta_learning_rate",)))
