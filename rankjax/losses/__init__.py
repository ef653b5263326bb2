"""Ranking losses: pure functions ``loss(embeddings f32[B, D], labels int[B], *, ...) -> f32[]``.

Every loss is usable under ``jax.jit``, ``jax.grad`` and ``jax.vmap``, has keyword-only options,
never returns NaN or inf, and gives 0 on a batch where it has nothing to compare. Configs pick one
by name with :func:`get_loss`::

    loss_fn = get_loss("triplet_semihard", margin=0.2)
    value = loss_fn(embeddings, labels)

Each config name has a :class:`LossSpec` in the catalogue (:mod:`rankjax.losses.catalogue`,
:func:`get_spec`), declared beside its function: its defaults, normalisation, batch layout and the
parameters it learns. The proxy losses learn class proxies,
``loss_fn(embeddings, labels, proxies=f32[C, D])`` (sub-center ArcFace: ``f32[C, K, D]``); they
belong to the loss (``LossSpec.params``), and rankjax.train keeps them in its state and trains
them with the network. A loss whose spec ``takes_key`` draws random samples and takes a PRNG key
per call, ``loss_fn(embeddings, labels, key=jax.random.fold_in(root, step))``. One whose spec
``takes_references`` accepts a reference set,
``loss_fn(embeddings, labels, ref_embeddings=f32[M, D], ref_labels=int[M])``, which is how a
cross-batch memory (:mod:`rankjax.cross_batch`) plugs in.
"""

from __future__ import annotations

from rankjax.losses import catalogue
from rankjax.losses import spec
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
    "CATALOGUE",
    "LossParam",
    "LossSpec",
    "angular_loss",
    "arcface_loss",
    "contrastive_loss",
    "cosface_loss",
    "get_loss",
    "get_spec",
    "lifted_structure_loss",
    "loss_names",
    "margin_loss",
    "multi_similarity_loss",
    "negative_sampling_probabilities",
    "npairs_angular_loss",
    "normalized_softmax_loss",
    "npairs_loss",
    "proxy_anchor_loss",
    "register_loss",
    "sample_negatives",
    "subcenter_arcface_loss",
    "supcon_loss",
    "triplet_loss",
]

CATALOGUE = catalogue.CATALOGUE
LossParam = spec.LossParam
LossSpec = spec.LossSpec
get_loss = catalogue.get_loss
get_spec = catalogue.get_spec
loss_names = catalogue.loss_names
register_loss = catalogue.register_loss
