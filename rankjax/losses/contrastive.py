r"""Contrastive loss (Hadsell, Chopra & LeCun 2006), in the TF Addons form over all pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common


def contrastive_loss(embeddings: jax.Array, labels: jax.Array, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0, distance: str = "euclidean") -> jax.Array:
  r"""Contrastive loss over every ordered pair of the batch.

  .. math::
     L = \frac{1}{B(B-1)} \sum_{i \ne j}
         y_{ij}\,\max(0,\ d_{ij} - m_+)^2 + (1 - y_{ij})\,\max(0,\ m_- - d_{ij})^2

  with :math:`y_{ij} = 1` for a positive pair (same label) and 0 for a negative one. With
  ``pos_margin=0`` this is TF Addons' ``contrastive_loss`` applied to every pair.
  Hadsell, Chopra & LeCun, "Dimensionality reduction by learning an invariant mapping", CVPR 2006.

  Args:
    embeddings: ``f32[B, D]`` (used as given, not normalised).
    labels: ``int[B]`` class labels.
    pos_margin: :math:`m_+ \ge 0`, the distance below which positives are not pulled closer.
    neg_margin: :math:`m_- \ge 0`, the distance beyond which negatives are not pushed.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

  Returns:
    ``f32[]``; 0 for a batch of one.

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
  d = similarity.pairwise_distances(embeddings, distance=distance)
  pull = jnp.square(jax.nn.relu(d - pos_margin))
  push = jnp.square(jax.nn.relu(neg_margin - d))
  terms = (jnp.where(similarity.positive_mask(labels), pull, 0.0)
           + jnp.where(similarity.negative_mask(labels), push, 0.0))
  batch = labels.shape[0]
  return _common.safe_mean(jnp.sum(terms), batch * (batch - 1))
