r"""Contrastive loss (Hadsell, Chopra & LeCun 2006), in the TF Addons form over all pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec


def contrastive_loss(embeddings: jax.Array, labels: jax.Array, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0, distance: str = "euclidean",
                     ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                     ref_self_index: jax.Array | None = None,
                     precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""Contrastive loss over every ordered pair of the batch (or of batch x references).

  .. math::
     L = \frac{1}{|P| + |N|} \Big(\sum_{(i, j) \in P} \max(0,\ d_{ij} - m_+)^2
         + \sum_{(i, j) \in N} \max(0,\ m_- - d_{ij})^2\Big)

  over the positive pairs :math:`P` (same label) and negative pairs :math:`N`: the ordered pairs
  :math:`i \ne j` of the batch, :math:`|P| + |N| = B(B-1)`, or with references every (anchor,
  reference) pair that :func:`rankjax.similarity.positive_mask` / ``negative_mask`` allow. With
  ``pos_margin=0`` this is TF Addons' ``contrastive_loss`` applied to every pair.
  Hadsell, Chopra & LeCun, "Dimensionality reduction by learning an invariant mapping", CVPR 2006.

  Args:
    embeddings: ``f32[B, D]`` (used as given, not normalised).
    labels: ``int[B]`` class labels.
    pos_margin: :math:`m_+ \ge 0`, the distance below which positives are not pulled closer.
    neg_margin: :math:`m_- \ge 0`, the distance beyond which negatives are not pushed.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    ref_embeddings: ``f32[M, D]`` references to pair the anchors with (e.g. a cross-batch
      memory, :mod:`rankjax.cross_batch`), or None: the batch itself.
    ref_labels: ``int[M]``, their labels (with ``ref_embeddings``); < 0 marks an empty slot.
    ref_self_index: ``int[B]``, the reference column holding each anchor itself (never paired
      with it), or None: the references hold no copy of the batch.
    precision: of the distance matrix's matmuls (:data:`rankjax.similarity.DEFAULT_PRECISION`).

  Returns:
    ``f32[]``; 0 for a batch of one (without references) or without any pair.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 0.], [0.5, 0.], [0., 0.5]])
    >>> contrastive_loss(x, jnp.array([0, 0, 1]))  # (2 * 0.25 + 2 * 0.25 + 2 * 0.0858) / 6
    Array(0.19526215, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  similarity.check_distance(distance)
  similarity.check_nonnegative(pos_margin, "pos_margin")
  similarity.check_nonnegative(neg_margin, "neg_margin")
  refs, masks = _common.references(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
  d = similarity.pairwise_distances(embeddings, refs, distance=distance, precision=precision)
  pull = jnp.square(jax.nn.relu(d - pos_margin))
  push = jnp.square(jax.nn.relu(neg_margin - d))
  pos = similarity.positive_mask(labels, **masks)
  neg = similarity.negative_mask(labels, **masks)
  terms = jnp.where(pos, pull, 0.0) + jnp.where(neg, push, 0.0)
  batch = labels.shape[0]
  pairs = batch * (batch - 1) if refs is None else jnp.sum(pos | neg)
  return _common.safe_mean(jnp.sum(terms), pairs)

SPECS = (spec.LossSpec(
    name="contrastive", label="contrastive", fn=contrastive_loss, paper="Hadsell et al. 2006",
    defaults=dict(pos_margin=0.0, neg_margin=1.0, distance="euclidean"), normalize=True,
    diagnostics=("pos_margin", "neg_margin")),)
