r"""What a loss is besides its formula: :class:`LossSpec`, declared once beside each loss function.

A spec says everything the rest of rankjax needs to know about a loss, so that no other module
names one: its config name and display label, the options the name fixes, its paper's defaults,
whether the head L2-normalises for it, the batch layout it needs, the parameters it learns (with
their start and learning rate), whether it takes a PRNG key or a reference set (read from the
function's signature), which of its options the batch diagnostics use, and its paper. The
catalogue (:mod:`rankjax.losses.catalogue`) collects the specs; configs, the trainer, the
cross-batch memory, the demo, the sweeps and the docs read them there.

A loss with parameters stays a pure function of ``(embeddings, labels)``: its parameters are
keyword arguments (``proxy_anchor_loss(x, y, proxies=p)``). The trainer keeps them in the train
state as ``state["loss_params"] = {keyword: array}``, trains them with the network (one optimizer
group per keyword) and checkpoints them; the encoder and the embedder know nothing of them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# Optimizer groups that are the network's: a loss parameter may not take these names.
NETWORK_GROUPS = ("backbone", "head")
# The survey's pair-based losses, the proxy losses, and the later pair-based baselines.
GROUPS = ("survey", "proxy", "later")
# Proxy-Anchor's recipe: proxies learn 100x faster than the network (Kim et al. 2020's training
# setup, the scale common re-implementations use too).
PROXY_LEARNING_RATE_MULTIPLIER = 100.0


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


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One config loss: a loss function and what the library needs to know to train with it.

  Attributes:
    name: the config name (``config.loss.name``, :func:`rankjax.losses.get_loss`).
    label: the display name of tables and plots.
    fn: ``fn(embeddings f32[B, D], labels int[B], *, **options) -> f32[]``.
    paper: the paper whose formula and defaults it follows.
    defaults: the paper's options: the section ``config.loss.<name>`` starts from them (with
      the config keys of its parameters, which are not passed to ``fn``).
    normalize: whether the head L2-normalises its embeddings when ``config.model.normalize`` is
      ``None``: the N-pair family and lifted structure are defined on raw embeddings; the
      triplet and contrastive margins assume unit norm; the others normalise inside the loss.
    group: ``"survey"`` (the survey's pair-based losses), ``"proxy"`` or ``"later"``.
    fixed: options the name fixes (``triplet_hard`` is ``mining="hard"``).
    samples_per_class: the batch's K when the loss needs one (2 for the N-pair family, which
      reads one (anchor, positive) pair of each class); ``None`` for any K.
    params: ``{keyword: LossParam}``, the parameters the loss learns (class proxies, ...).
    diagnostics: options that :func:`rankjax.diagnostics.batch_diagnostics` takes from the loss
      (its margins), besides ``distance``.
  """
  name: str
  label: str
  fn: Callable[..., jax.Array]
  paper: str
  defaults: Mapping[str, Any]
  normalize: bool
  group: str = "survey"
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  samples_per_class: int | None = None
  params: Mapping[str, LossParam] = dataclasses.field(default_factory=dict)
  diagnostics: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"A loss name is a config key: {self.name!r} is not an identifier.")
    if self.group not in GROUPS:
      raise ValueError(f"Loss {self.name!r}: group must be one of {GROUPS}; got {self.group!r}.")
    for keyword, param in self.params.items():
      if keyword in NETWORK_GROUPS:
        raise ValueError(f"A loss parameter cannot be called {keyword!r}: that is the optimizer "
                         f"group of the network's {keyword}.")
      if not isinstance(param, LossParam):
        raise TypeError(f"{self.name}.{keyword} must be a LossParam; got {param!r}.")
    options = set(self.options)
    for what, keys in (("fixed", self.fixed), ("diagnostics", self.diagnostics),
                       ("params", self.params)):
      unknown = sorted(set(keys) - options)
      if unknown:
        raise ValueError(f"Loss {self.name!r}: {what} {unknown} are not keyword options of "
                         f"{self.fn.__name__} ({', '.join(self.options)}).")
    unknown = sorted(set(self.defaults) - options - set(self.param_config_keys))
    if unknown:
      raise ValueError(f"Loss {self.name!r}: defaults {unknown} are neither options of "
                       f"{self.fn.__name__} nor config keys of its parameters.")

  @functools.cached_property
  def options(self) -> tuple[str, ...]:
    """The keyword-only options of ``fn``."""
    return tuple(p.name for p in inspect.signature(self.fn).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)

  @property
  def takes_key(self) -> bool:
    """Whether the loss samples at random: it takes ``key=`` (a new PRNG key per step)."""
    return "key" in self.options

  @property
  def takes_references(self) -> bool:
    """Whether the loss compares the batch with a reference set (``ref_embeddings``, and
    ``ref_self_index``, each anchor's own copy in it), which is how a cross-batch memory plugs
    in."""
    return {"ref_embeddings", "ref_self_index"} <= set(self.options)

  @property
  def learns_proxies(self) -> bool:
    """Whether the loss learns a proxy per class: it has negatives without other classes in the
    batch."""
    return "proxies" in self.params

  @property
  def param_config_keys(self) -> tuple[str, ...]:
    """Keys of ``config.loss.<name>`` that configure the loss's parameters, not the loss."""
    return tuple(key for param in self.params.values() for key in param.config_keys)

  def bind(self, **options) -> Callable[..., jax.Array]:
    """``fn`` with ``options`` and the name's fixed options bound (see :func:`get_loss`)."""
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ValueError(f"Loss {self.name!r} does not take {', '.join(unknown)}; its options are: "
                       f"{', '.join(self.options)}.")
    for key, value in self.fixed.items():
      if key in options and options[key] != value:
        raise ValueError(f"Loss {self.name!r} means {key}={value!r}; got {key}={options[key]!r}.")
    return functools.partial(self.fn, **{**options, **self.fixed})

  def loss_options(self, section: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``fn`` in a config section ``config.loss.<name>``: without the keys that
    configure the loss's parameters."""
    own = set(self.param_config_keys)
    return {k: v for k, v in dict(section).items() if k not in own}

  def diagnostic_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`rankjax.diagnostics.batch_diagnostics` under ``options``."""
    out = {"distance": options.get("distance", "euclidean")}
    out.update({key: options[key] for key in self.diagnostics})
    return out

  def init_params(self, key: jax.Array, num_classes: int, embedding_dim: int,
                  **options) -> dict[str, jax.Array]:
    """The starting parameters: ``{keyword: array}``, ``{}`` for a loss without any.

    Args:
      key: a JAX PRNG key; each parameter draws from its own fold of it.
      num_classes: the number of training labels (labels are ``0 .. num_classes - 1``).
      embedding_dim: the embedding size ``D``.
      **options: the loss's config options (``config.loss.<name>``), which may set shapes.
    """
    if self.params and int(num_classes) <= 0:
      raise ValueError(f"Loss {self.name!r} has one parameter row per training class; got "
                       f"num_classes={num_classes}.")
    return {keyword: param.init(jax.random.fold_in(key, index), int(num_classes),
                                int(embedding_dim), **options)
            for index, (keyword, param) in enumerate(sorted(self.params.items()))}

  def learning_rates(self, config) -> dict[str, float]:
    """``{keyword: peak learning rate}`` of the loss's parameters under the training config."""
    return {keyword: float(param.learning_rate(config))
            for keyword, param in self.params.items()}


def proxy_learning_rate(config) -> float:
  """``config.optimizer.proxy_learning_rate``, or :data:`PROXY_LEARNING_RATE_MULTIPLIER` x the
  network's ``learning_rate`` when it is unset (Proxy-Anchor's recipe)."""
  optimizer = config.optimizer
  if optimizer.proxy_learning_rate is not None:
    return float(optimizer.proxy_learning_rate)
  return PROXY_LEARNING_RATE_MULTIPLIER * optimizer.learning_rate


def proxy_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  r"""Proxies of ``shape = (C, ..., D)`` drawn from :math:`\mathcal{N}(0, 2 / C)`.

  Proxy-Anchor's reference code (Kim et al. 2020) initialises its ``[C, D]`` proxies with
  PyTorch's ``kaiming_normal_(mode="fan_out")``, whose fan is the ``C`` rows. The losses only use
  the proxies' directions, so the scale sets how far an optimizer step turns them: with Adam's
  steps of about the learning rate per coordinate, a proxy of norm :math:`\sqrt{2D / C}` turns
  several times faster than a standard normal one of norm :math:`\sqrt{D}`.
  """
  return jax.random.normal(key, shape) * jnp.sqrt(2.0 / shape[0])


def _class_proxies(key, num_classes, embedding_dim, **_):
  return proxy_init(key, (num_classes, embedding_dim))


# One proxy per training class, ``f32[C, D]``, at the proxies' learning rate.
CLASS_PROXIES = LossParam(init=_class_proxies, learning_rate=proxy_learning_rate)
