r"""Lifted structured loss (Song, Xiang, Jegelka & Savarese 2016), in the TF Addons form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec


def lifted_structure_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 1.0,
                          precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""Lifted structured embedding loss on (non-squared) euclidean distances :math:`D`.

  .. math::
     J_{ij} = \log\Big(\sum_{k \in N(i)} e^{m - D_{ik}} + \sum_{l \in N(j)} e^{m - D_{jl}}\Big)
              + D_{ij}, \qquad
     L = \frac{1}{2|P|} \sum_{\{i, j\} \in P} \max(0,\ J_{ij})^2

  over the unordered positive pairs :math:`P`, with :math:`N(i)` the negatives of :math:`i`.
  Each row's sum is a log-sum-exp, so the loss stays finite for any distance scale. Song et al.,
  "Deep metric learning via lifted structured feature embedding", CVPR 2016; this is TF Addons'
  ``lifted_struct_loss``.

  Args:
    embeddings: ``f32[B, D]`` (used as given, not normalised).
    labels: ``int[B]`` class labels.
    margin: :math:`m \ge 0`.
    precision: of the distance matrix's matmuls (:data:`rankjax.similarity.DEFAULT_PRECISION`).

  Returns:
    ``f32[]``; 0 without positive pairs or without negatives.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 0.], [1., 0.], [0., 2.]])
    >>> # One positive pair: J = log(e^(1 - 2) + e^(1 - sqrt 5)) + 1 = 0.58207; J^2 / 2
    >>> lifted_structure_loss(x, jnp.array([0, 0, 1]))
    Array(0.16939871, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  similarity.check_nonnegative(margin, "margin")
  d = similarity.pairwise_distances(embeddings, distance="euclidean", precision=precision)
  pos = similarity.positive_mask(labels)
  row, has_negative = _common.masked_logsumexp(margin - d, similarity.negative_mask(labels), axis=1)
  row_i, row_j = row[:, None], row[None, :]
  neg_i, neg_j = has_negative[:, None], has_negative[None, :]
  pair = jnp.where(neg_i & neg_j, jnp.logaddexp(row_i, row_j), jnp.where(neg_i, row_i, row_j))
  valid = pos & (neg_i | neg_j)
  terms = jnp.where(valid, jnp.square(jax.nn.relu(pair + d)), 0.0)
  # Over ordered pairs each unordered pair counts twice, in the sum and in |P| alike.
  return _common.safe_mean(0.5 * jnp.sum(terms), jnp.sum(pos))

SPECS = (spec.LossSpec(name="lifted_structure", label="lifted structure",
                       fn=lifted_structure_loss, paper="Song et al. 2016",
                       defaults=dict(margin=1.0), normalize=False),)
