r"""The loss catalogue: every config loss, by name, from the :class:`~rankjax.losses.spec.LossSpec`
declared beside its function.

This is the one place that lists the losses. The config's sections (``config.loss.<name>``), the
head's normalisation, the batch layout, the learned parameters, the trainer's PRNG key, the
cross-batch memory, the demo, the sweeps' labels and this page's table are all read from it.

A loss added outside rankjax registers its spec with :func:`register_loss`; from then on it is a
config loss like the built-in ones (``--config.loss.name=<its name>``, its own config section at
its paper's defaults).

The built-in losses, with their papers' defaults (K: the batch's samples per class the loss needs;
"learns": its parameters, trained with the network):

"""

from __future__ import annotations

import difflib
from typing import Callable

import jax

from rankjax.losses import arcface
from rankjax.losses import contrastive
from rankjax.losses import cosface
from rankjax.losses import lifted_structure
from rankjax.losses import margin
from rankjax.losses import multi_similarity
from rankjax.losses import npairs
from rankjax.losses import proxies
from rankjax.losses import spec as spec_lib
from rankjax.losses import supcon
from rankjax.losses import triplet

LossSpec = spec_lib.LossSpec

# In the order of tables and sweeps: the survey's pair-based losses, then the proxy losses and
# the later baselines.
_BUILT_IN = (*contrastive.SPECS, *triplet.SPECS, *npairs.SPECS, *lifted_structure.SPECS,
             *multi_similarity.SPECS, *proxies.SPECS, *margin.SPECS, *supcon.SPECS,
             arcface.ARCFACE, *cosface.SPECS, arcface.SUBCENTER_ARCFACE)

CATALOGUE: dict[str, LossSpec] = {}
# The base config's loss (rankjax.configs.base_config): FaceNet's semi-hard triplet.
DEFAULT_LOSS = "triplet_semihard"


def register_loss(spec: LossSpec, *, replace: bool = False) -> LossSpec:
  """Adds ``spec`` to the catalogue under ``spec.name`` (an error if the name is taken, unless
  ``replace``); returns it."""
  if not isinstance(spec, LossSpec):
    raise TypeError(f"register_loss takes a LossSpec; got {spec!r}.")
  if spec.name in CATALOGUE and not replace:
    raise ValueError(f"A loss called {spec.name!r} is already registered "
                     f"({CATALOGUE[spec.name].fn.__name__}); pass replace=True to replace it.")
  CATALOGUE[spec.name] = spec
  return spec


def loss_names(group: str | None = None) -> tuple[str, ...]:
  """The config names of the catalogue, in its order; only those of ``group`` if given."""
  if group is not None and group not in spec_lib.GROUPS:
    raise ValueError(f"Unknown loss group {group!r}; the groups are {', '.join(spec_lib.GROUPS)}.")
  return tuple(name for name, s in CATALOGUE.items() if group is None or s.group == group)


def get_spec(name: str) -> LossSpec:
  """The spec of the loss called ``name``; a ``ValueError`` naming the valid ones otherwise."""
  if name not in CATALOGUE:
    close = difflib.get_close_matches(str(name), list(CATALOGUE), n=1)
    raise ValueError(f"Unknown loss {name!r}; the losses are {', '.join(CATALOGUE)}."
                     + (f" Did you mean {close[0]!r}?" if close else ""))
  return CATALOGUE[name]


def get_loss(name: str, **options) -> Callable[..., jax.Array]:
  """The loss called ``name``, with ``options`` bound: ``fn(embeddings, labels) -> f32[]``.

  ``name`` is a config name of the catalogue (:func:`loss_names`). The returned function still
  accepts keyword options, which override the bound ones. A loss that learns parameters
  (:attr:`LossSpec.params`, e.g. ``proxies=``) needs them at each call, and one that samples
  (:attr:`LossSpec.takes_key`) ``key=``, a new key per training step.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones), an option the loss does
      not take, or an option that contradicts the name (``get_loss("triplet_hard", mining="all")``).

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = get_loss("triplet_hard", margin=1.0)
    >>> loss_fn(jnp.array([[0., 0.], [1., 0.], [0., 1.5], [0., 2.]]), jnp.array([0, 0, 1, 1]))
    Array(0.1743061, dtype=float32)
  """
  return get_spec(name).bind(**options)


def catalogue_table(specs=None) -> str:
  """The catalogue as a reStructuredText table: name, defaults, paper."""
  specs = list(CATALOGUE.values()) if specs is None else list(specs)
  rows = [("``loss.name``", "defaults", "source")]
  for s in specs:
    parts = [", ".join(f"{k}={v!r}" for k, v in {**s.fixed, **s.defaults}.items())]
    parts.append("L2-normalised head" if s.normalize else "unnormalised head")
    if s.samples_per_class:
      parts.append(f"K={s.samples_per_class}")
    if s.params:
      parts.append("learns " + ", ".join(s.params))
    rows.append((s.name, "; ".join(p for p in parts if p), s.paper))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  rule = "  ".join("=" * w for w in widths)
  lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(), rule]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[1:]]
  return "\n".join(lines + [rule])


for _spec in _BUILT_IN:
  register_loss(_spec)
del _spec
if __doc__:  # None under python -OO.
  __doc__ += catalogue_table() + "\n"
