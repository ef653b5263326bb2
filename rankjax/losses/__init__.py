"""Ranking losses: pure functions ``loss(embeddings f32[B, D], labels int[B], *, ...) -> f32[]``.

Every loss is usable under ``jax.jit``, ``jax.grad`` and ``jax.vmap``, has keyword-only options,
never returns NaN or inf, and gives 0 on a batch where it has nothing to compare. Configs pick one
by name with :func:`get_loss`::

    loss_fn = get_loss("triplet_semihard", margin=0.2)
    value = loss_fn(embeddings, labels)

The proxy-based losses (:data:`PROXY_LOSSES`) also take learned class proxies,
``loss_fn(embeddings, labels, proxies=f32[C, D])`` (sub-center ArcFace: ``f32[C, K, D]``); they
belong to the loss (:mod:`rankjax.loss_params`), and rankjax.train keeps them in its state and
trains them with the network. The losses of :data:`LOSSES_NEEDING_KEY` draw random samples and
take a PRNG key per call, ``loss_fn(embeddings, labels, key=jax.random.fold_in(root, step))``.
The pair-based losses (contrastive, triplet, multi-similarity, margin, supcon) accept a reference
set, ``loss_fn(embeddings, labels, ref_embeddings=f32[M, D], ref_labels=int[M])``, which is how a
cross-batch memory (:mod:`rankjax.cross_batch`) plugs in.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from rankjax.losses.arcface import arcface_loss, subcenter_arcface_loss
from rankjax.losses.contrastive import contrastive_loss
from rankjax.losses.cosface import cosface_loss
from rankjax.losses.lifted_structure import lifted_structure_loss
from rankjax.losses.margin import margin_loss, negative_sampling_probabilities, sample_negatives
from rankjax.losses.multi_similarity import multi_similarity_loss
from rankjax.losses.npairs import angular_loss, npairs_angular_loss, npairs_loss
from rankjax.losses.proxies import normalized_softmax_loss, proxy_anchor_loss
from rankjax.losses.supcon import supcon_loss
from rankjax.losses.triplet import triplet_loss

__all__ = [
    "LOSSES",
    "LOSSES_NEEDING_KEY",
    "PROXY_LOSSES",
    "angular_loss",
    "arcface_loss",
    "contrastive_loss",
    "cosface_loss",
    "get_loss",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "negative_sampling_probabilities",
    "npairs_angular_loss",
    "normalized_softmax_loss",
    "npairs_loss",
    "proxy_anchor_loss",
    "sample_negatives",
    "subcenter_arcface_loss",
    "supcon_loss",
    "triplet_loss",
]

# Config name -> (function, options fixed by the name).
LOSSES: dict[str, tuple[Callable, dict]] = {
    "contrastive": (contrastive_loss, {}),
    "triplet": (triplet_loss, {}),
    "triplet_semihard": (triplet_loss, {"mining": "semihard"}),
    "triplet_hard": (triplet_loss, {"mining": "hard"}),
    "triplet_all": (triplet_loss, {"mining": "all"}),
    "npairs": (npairs_loss, {}),
    "angular": (angular_loss, {}),
    "npairs_angular": (npairs_angular_loss, {}),
    "lifted_structure": (lifted_structure_loss, {}),
    "multi_similarity": (multi_similarity_loss, {}),
    "proxy_anchor": (proxy_anchor_loss, {}),
    "normalized_softmax": (normalized_softmax_loss, {}),
    "margin": (margin_loss, {}),
    "supcon": (supcon_loss, {}),
    "arcface": (arcface_loss, {}),
    "cosface": (cosface_loss, {}),
    "subcenter_arcface": (subcenter_arcface_loss, {}),
}
# The losses that take ``proxies=`` (learned vectors per training class) besides the batch.
PROXY_LOSSES = ("proxy_anchor", "proxy_anchor_loss", "normalized_softmax",
                "normalized_softmax_loss", "arcface", "arcface_loss", "cosface", "cosface_loss",
                "subcenter_arcface", "subcenter_arcface_loss")
# The losses that take ``key=`` (a JAX PRNG key, a new one per step) for their random sampling.
LOSSES_NEEDING_KEY = ("margin", "margin_loss")
for _fn in {fn for fn, _ in LOSSES.values()}:
  LOSSES[_fn.__name__] = (_fn, {})
del _fn


def get_loss(name: str, **options) -> Callable:
  """The loss called ``name``, with ``options`` bound: ``fn(embeddings, labels) -> f32[]``.

  Names are the config names (``"contrastive"``, ``"triplet_semihard"``, ``"triplet_hard"``,
  ``"triplet_all"``, ``"npairs"``, ``"angular"``, ``"npairs_angular"``, ``"lifted_structure"``,
  ``"multi_similarity"``, ``"proxy_anchor"``, ``"normalized_softmax"``, ``"margin"``,
  ``"supcon"``, ``"arcface"``, ``"cosface"``, ``"subcenter_arcface"``, and ``"triplet"``) or the
  function names (``"triplet_loss"``, ...).
  The returned function still accepts keyword options, which override the bound ones. A loss of
  :data:`PROXY_LOSSES` still needs ``proxies=``, and one of :data:`LOSSES_NEEDING_KEY` ``key=``
  (a new key per training step), at each call.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones), an option the loss does
      not take, or an option that contradicts the name (``get_loss("triplet_hard", mining="all")``).

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = get_loss("triplet_hard", margin=1.0)
    >>> loss_fn(jnp.array([[0., 0.], [1., 0.], [0., 1.5], [0., 2.]]), jnp.array([0, 0, 1, 1]))
    Array(0.1743061, dtype=float32)
  """
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}.")
  fn, fixed = LOSSES[name]
  accepted = [p for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - {p.name for p in accepted})
  if unknown:
    raise ValueError(f"Loss {name!r} does not take {', '.join(unknown)}; its options are: "
                     f"{', '.join(p.name for p in accepted)}.")
  for key, value in fixed.items():
    if key in options and options[key] != value:
      raise ValueError(f"Loss {name!r} means {key}={value!r}; got {key}={options[key]!r}.")
  return functools.partial(fn, **{**options, **fixed})
