r"""Multi-similarity loss with its pair miner (Wang, Han, Huang, Dong & Scott 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec


def multi_similarity_loss(embeddings: jax.Array, labels: jax.Array, *, alpha: float = 2.0,
                          beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                          ref_embeddings: jax.Array | None = None,
                          ref_labels: jax.Array | None = None,
                          ref_self_index: jax.Array | None = None,
                          precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""Multi-similarity loss on the cosine similarities :math:`S` of L2-normalised embeddings.

  Pair mining keeps, for anchor :math:`i`, the positives with
  :math:`S_{ip} < \max_n S_{in} + \epsilon` and the negatives with
  :math:`S_{in} > \min_p S_{ip} - \epsilon`; then

  .. math::
     L = \frac{1}{B} \sum_{i=1}^{B} \frac{1}{\alpha}
         \log\Big(1 + \sum_{\text{kept } p} e^{-\alpha (S_{ip} - \lambda)}\Big)
       + \frac{1}{\beta} \log\Big(1 + \sum_{\text{kept } n} e^{\beta (S_{in} - \lambda)}\Big)

  with base :math:`\lambda`. With references (``ref_embeddings``, e.g. a cross-batch memory),
  :math:`S` is the ``B x M`` matrix from the batch's anchors to the references, and the positives
  and negatives of anchor :math:`i` are references (:func:`rankjax.similarity.positive_mask`);
  the mean still runs over the B anchors. An empty kept set contributes 0 (the authors' code
  skips such anchors yet still divides by B, which differs only for anchors with one set
  empty). Wang et al., "Multi-similarity loss with general pair weighting for deep metric
  learning", CVPR 2019. Invariant to the scale of the embeddings.

  Args:
    embeddings: ``f32[B, D]`` (normalised inside, as the paper defines it).
    labels: ``int[B]`` class labels.
    alpha: positive scale :math:`\alpha > 0`.
    beta: negative scale :math:`\beta > 0`.
    base: similarity offset :math:`\lambda`.
    epsilon: mining margin :math:`\epsilon \ge 0`.
    ref_embeddings: ``f32[M, D]`` references to draw positives and negatives from, or None:
      the batch itself.
    ref_labels: ``int[M]``, their labels (with ``ref_embeddings``); < 0 marks an empty slot.
    ref_self_index: ``int[B]``, the reference column holding each anchor itself (never paired
      with it), or None: the references hold no copy of the batch.
    precision: of the similarity matrix's matmul (:data:`rankjax.similarity.DEFAULT_PRECISION`).

  Returns:
    ``f32[]``; 0 when no pair is kept.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0.6, 0.8], [0., 1.]])
    >>> # Only anchor 1 keeps pairs: (log(1 + e^-0.2) / 2 + log(1 + e^3) / 10) / 3
    >>> multi_similarity_loss(x, jnp.array([0, 0, 1]), beta=10.0)
    Array(0.20130941, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  _common.check_positive(alpha, "alpha")
  _common.check_positive(beta, "beta")
  similarity.check_nonnegative(epsilon, "epsilon")
  refs, masks = _common.references(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
  s = similarity.cosine_similarities(embeddings, refs, precision=precision)
  pos = similarity.positive_mask(labels, **masks)
  neg = similarity.negative_mask(labels, **masks)
  hardest_negative = jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True)
  hardest_positive = jnp.min(jnp.where(pos, s, jnp.inf), axis=1, keepdims=True)
  # Against an empty set the comparisons are False (inf), so nothing is kept.
  kept_positive = pos & (s < hardest_negative + epsilon)
  kept_negative = neg & (s > hardest_positive - epsilon)
  pull = _common.log1p_sum_exp(-alpha * (s - base), kept_positive, axis=1) / alpha
  push = _common.log1p_sum_exp(beta * (s - base), kept_negative, axis=1) / beta
  return jnp.mean(pull + push)

SPECS = (spec.LossSpec(name="multi_similarity", label="multi-similarity",
                       fn=multi_similarity_loss, paper="Wang et al. 2019",
                       defaults=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
                       normalize=True),)
