r"""Margin loss with distance-weighted sampling of negatives (Wu et al. 2017).

Wu et al., "Sampling Matters in Deep Embedding Learning", ICCV 2017. On the unit sphere in
:math:`n` dimensions the distance between two uniformly random points has density
:math:`q(d) \propto d^{n-2} (1 - d^2/4)^{(n-3)/2}`, so uniform sampling draws almost only
negatives at :math:`d \approx \sqrt 2`. The paper draws anchor :math:`a`'s negative :math:`n`
with probability

.. math::
   \Pr(n \mid a) \propto \min\big(\lambda,\ q(d_{an})^{-1}\big)\,[d_{an} < d_{max}]

over the references of another class, :math:`\lambda = q(c)^{-1}` the weight at the ``cutoff``
distance :math:`c` (its code clips distances below at :math:`c`, which is the same weight since
:math:`q^{-1}` decreases up to :math:`\sqrt 2`) and :math:`d_{max}` the ``nonzero_loss_cutoff``
(negatives farther away have zero loss and are never drawn). The weights are computed as
logarithms, normalised per anchor by the anchor's largest weight (pytorch-metric-learning
normalises by the batch's largest, which can underflow whole rows at large :math:`n`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import proxies as proxy_losses
from rankjax.losses import spec

# Rows of the sampling done at once: bounds its weights, sums and searches to 128 x M.
_ROWS_PER_BLOCK = 128


def margin_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                beta=1.2, nu: float = 0.0, cutoff: float = 0.5,
                nonzero_loss_cutoff: float = 1.4, key: jax.Array,
                ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                ref_self_index: jax.Array | None = None,
                precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""Margin loss over every positive pair, each with one distance-weighted negative.

  On L2-normalised embeddings with distances :math:`d`, each positive pair :math:`(a, p)` gets a
  negative :math:`n_{ap}` drawn from :func:`negative_sampling_probabilities` (independently per
  pair, with ``key``), and

  .. math::
     L = \frac{1}{N_{>0}} \sum_{(a, p)} \Big[ (\alpha + d_{ap} - \beta_{y_a})_+
         + (\alpha - d_{a n_{ap}} + \beta_{y_a})_+ + \nu\, \beta_{y_a} \Big]

  the pair loss :math:`(\alpha + y_{ij} (d_{ij} - \beta))_+` of the paper's eq. 3 on the positive
  and the sampled negative pair, with :math:`N_{>0}` the number of those pair terms that are
  non-zero: the normalisation of the authors' code (MXNet ``MarginLoss``), which
  pytorch-metric-learning's ``MarginLoss`` shares. The :math:`\nu` penalty (eq. 5) is summed per
  positive pair and divided by :math:`N_{>0}` too, as in the authors' code. An anchor with no
  negative within ``nonzero_loss_cutoff`` draws none: its pairs keep only their positive term
  (the authors' code then draws from the whole batch uniformly; pytorch-metric-learning drops
  the anchor's pairs altogether).

  :math:`\beta` is a scalar or one value per class (indexed by the anchor's label, as the paper
  learns it); pass a trainable array to learn it (the paper: initial 1.2, its own learning rate).

  Cost: the draws are made for every (anchor, reference) slot, a binary search each, so time is
  O(B M log M) and memory O(B M) (the draws are counted block by block, never gathered).

  References: anchors come from the batch; positives and negatives from ``ref_embeddings``
  (e.g. a memory of past batches), or from the batch itself when they are None. A batch sample
  is never paired with itself; given references are a separate set, so every (anchor,
  reference) pair counts, except each anchor's own copy at ``ref_self_index`` (a memory that
  already holds the current batch, :mod:`rankjax.cross_batch`).

  Args:
    embeddings: ``f32[B, D]`` (normalised inside, as the paper defines the loss).
    labels: ``int[B]`` class labels.
    margin: :math:`\alpha \ge 0`.
    beta: :math:`\beta`: a scalar, or ``f32[C]`` with labels in ``[0, C)`` (outside that range:
      a ``ValueError``, or under ``jit`` a NaN loss and a ``checkify`` error, the rule of
      :mod:`rankjax.losses.proxies`).
    nu: :math:`\nu \ge 0`, the weight of the :math:`\beta` penalty.
    cutoff: :math:`c > 0`: distances below it are weighted as :math:`c`.
    nonzero_loss_cutoff: :math:`d_{max} > 0`: negatives at this distance or farther are never
      drawn (the paper: :math:`\alpha + \beta = 1.4`).
    key: a JAX PRNG key for the negatives (e.g. ``jax.random.fold_in(root, step)``).
    ref_embeddings: ``f32[M, D]`` or None (the batch).
    ref_labels: ``int[M]``, given with ``ref_embeddings``.
    ref_self_index: ``int[B]``, the reference column holding each anchor itself (never paired
      with it), or None.
    precision: matmul precision of the distances (``jax.lax.Precision.HIGHEST`` by default; see
      :func:`rankjax.similarity.cosine_similarities`).

  Returns:
    ``f32[]``; 0 when no pair term is non-zero (e.g. no positive pair). Gradients flow to the
    embeddings, the references and ``beta``, not through the sampling.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> # On a circle: 0 and 1 are 60 deg apart (d = 1); 2, the only negative, is at d = 1.3
    >>> # from 0 and 0.366 from 1, so both positive pairs draw it. Pull terms 0.2 + 1 - 1.2 = 0,
    >>> # push terms 0.2 - 1.3 + 1.2 = 0.1 and 0.2 - 0.366 + 1.2 = 1.034: (0.1 + 1.034) / 2.
    >>> angles = jnp.array([0.0, jnp.pi / 3, 2 * jnp.arcsin(0.65)])
    >>> x = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    >>> margin_loss(x, jnp.array([0, 0, 1]), key=jax.random.key(0))
    Array(0.56705064, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  refs, ref_labels, self_pairs = similarity.reference_set(embeddings, labels, ref_embeddings,
                                                          ref_labels, ref_self_index)
  similarity.check_nonnegative(margin, "margin")
  similarity.check_nonnegative(nu, "nu")
  beta, in_range = _check_beta(beta, labels)
  d = proxy_losses.nan_unless(
      in_range, unit_sphere_distances(embeddings, refs, self_pairs, precision=precision))
  anchor_beta = (beta if beta.ndim == 0 else jnp.take(beta, labels, mode="clip")[:, None])
  same = similarity.same_label_mask(labels, ref_labels)
  positive = same & ~self_pairs
  # Each positive pair (a, p) draws one negative; drawn[a, n] counts the pairs of anchor a that
  # drew n, so that the loss needs no gather (made block by block: one B x M matrix).
  dim = embeddings.shape[1]
  drawn = _count_draws(key, jax.lax.stop_gradient(d), ~same & ~self_pairs, positive,
                       lambda d, negative: _probabilities(d, negative, dim, cutoff,
                                                          nonzero_loss_cutoff))
  pull = jnp.where(positive, jax.nn.relu(margin + d - anchor_beta), 0.0)
  push = jax.nn.relu(margin - d + anchor_beta)
  active = jnp.sum(pull > 0) + jnp.sum(jnp.where(push > 0, drawn, 0.0))
  penalty = nu * jnp.sum(jnp.where(positive, anchor_beta, 0.0))
  loss = _common.safe_mean(jnp.sum(pull) + jnp.sum(drawn * push) + penalty, active)
  return proxy_losses.nan_unless(in_range, loss)


def negative_sampling_probabilities(embeddings: jax.Array, labels: jax.Array, *,
                                    cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4,
                                    ref_embeddings: jax.Array | None = None,
                                    ref_labels: jax.Array | None = None,
                                    precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""``f32[B, M]``: row :math:`a` is :math:`\Pr(n \mid a)` of the module doc over the references.

  Each row sums to 1, or is all 0 when anchor :math:`a` has no reference of another class closer
  than ``nonzero_loss_cutoff``. Distances are between the L2-normalised embeddings, with
  :math:`n` = ``D``. No gradient flows through the probabilities.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> x = jnp.array([[1., 0., 0.], [0., 1., 0.], [0.8, 0.6, 0.]])
    >>> # n = 3: q(d)^-1 = 1/d. Anchor 0's negatives: d = sqrt(2) > 1.4 (never drawn) and
    >>> # d = 0.63 (drawn); anchor 1's: sqrt(2) and 0.89; anchor 2's: 0.63 and 0.89.
    >>> print(np.asarray(negative_sampling_probabilities(x, jnp.array([0, 1, 2]))).round(3))
    [[0.    0.    1.   ]
     [0.    0.    1.   ]
     [0.586 0.414 0.   ]]
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  refs, ref_labels, self_pairs = similarity.reference_set(embeddings, labels, ref_embeddings,
                                                          ref_labels)
  d = unit_sphere_distances(embeddings, refs, self_pairs, precision=precision)
  negative = ~similarity.same_label_mask(labels, ref_labels) & ~self_pairs
  return _probabilities(d, negative, embeddings.shape[1], cutoff, nonzero_loss_cutoff)


def sample_negatives(key: jax.Array, probabilities: jax.Array, num_samples: int) -> jax.Array:
  """``int32[B, num_samples]``: independent draws from each row of ``probabilities: f32[B, M]``.

  Inverse-CDF sampling (per row: its own key ``jax.random.split(key, B)[a]``, one uniform per
  draw, a binary search in the row's cumulative sum), in blocks of rows: fixed shapes, jit-safe,
  memory O(B x num_samples) besides the input. A zero-probability entry is never drawn; a row of
  zeros draws index 0 (the caller masks it). :func:`margin_loss` draws its negatives this way,
  ``num_samples = M`` (draw ``j`` of anchor ``a`` is the negative of the pair ``(a, j)``), from
  the rows of :func:`negative_sampling_probabilities`.
  """
  return jax.lax.map(lambda args: _inverse_cdf_draws(*args, num_samples),
                     (jax.random.split(key, probabilities.shape[0]), probabilities),
                     batch_size=_ROWS_PER_BLOCK)


def _inverse_cdf_draws(key, p, num_samples):
  """``int32[num_samples]`` draws from one row ``p: f32[M]`` (see :func:`sample_negatives`)."""
  # A running maximum makes the cumulative sum exactly flat over zero entries (a parallel
  # cumsum may round them up by an ulp), so that side="right" can never land on one.
  cumulative = jax.lax.cummax(jnp.where(p > 0, jnp.cumsum(p), -jnp.inf))
  total = cumulative[-1]
  u = jax.random.uniform(key, (num_samples,)) * total
  index = jnp.searchsorted(cumulative, jnp.minimum(u, jnp.nextafter(total, -jnp.inf)),
                           side="right")
  valid = jnp.isfinite(total) & (total > 0)
  return jnp.where(valid, jnp.minimum(index, p.shape[0] - 1), 0).astype(jnp.int32)


def _count_draws(key, d, negative, positive, row_probabilities):
  """``f32[B, M]``: how many positive pairs of each anchor drew each reference as negative."""

  def count(row_key, d_row, negative_row, positive_row):
    p = row_probabilities(d_row, negative_row)
    index = _inverse_cdf_draws(row_key, p, d_row.shape[0])
    weight = jnp.where(jnp.any(p > 0), positive_row, False).astype(jnp.float32)
    return jnp.zeros_like(d_row).at[index].add(weight)

  return jax.lax.map(lambda args: count(*args),
                     (jax.random.split(key, d.shape[0]), d, negative, positive),
                     batch_size=_ROWS_PER_BLOCK)


def unit_sphere_distances(embeddings: jax.Array, refs: jax.Array, self_pairs: jax.Array, *,
                          precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""``f32[B, M]`` Euclidean distances between the L2-normalised rows, ``self_pairs`` set to 0.

  A zero vector stays at the origin (distance 1 to unit vectors); the gradient is finite at
  distance 0.
  """
  cosines = similarity.cosine_similarities(embeddings, refs, precision=precision)
  norms_x = jnp.sum(jnp.square(similarity.l2_normalize(embeddings)), axis=1)
  norms_r = jnp.sum(jnp.square(similarity.l2_normalize(refs)), axis=1)
  squared = norms_x[:, None] + norms_r[None, :] - 2.0 * cosines
  return similarity.safe_sqrt(jnp.where(self_pairs, 0.0, squared))


def _log_inverse_density(d, dim):
  r""":math:`\log q(d)^{-1} = (2 - n) \log d - \frac{n - 3}{2} \log(1 - d^2/4)`, for d > 0."""
  return ((2.0 - dim) * jnp.log(d)
          - 0.5 * (dim - 3.0) * jnp.log(jnp.maximum(1.0 - 0.25 * jnp.square(d), 1e-12)))


def _probabilities(d, negative, dim, cutoff, nonzero_loss_cutoff):
  """The rows (last axis) of :func:`negative_sampling_probabilities` from distances ``d``."""
  _common.check_positive(cutoff, "cutoff")
  _common.check_positive(nonzero_loss_cutoff, "nonzero_loss_cutoff")
  d = jax.lax.stop_gradient(jnp.maximum(d, cutoff))
  cap = _log_inverse_density(jnp.asarray(cutoff, jnp.float32), dim)  # log(lambda)
  log_weights = jnp.minimum(_log_inverse_density(d, dim), cap)
  candidate = negative & (d < nonzero_loss_cutoff)
  peak = jnp.max(jnp.where(candidate, log_weights, -jnp.inf), axis=-1, keepdims=True)
  weights = jnp.exp(jnp.where(candidate, log_weights - peak, -jnp.inf))
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


def _check_beta(beta, labels):
  """``(beta as f32[] or f32[C], in_range)``: a per-class beta's labels follow the proxy rule."""
  beta = jnp.asarray(beta)
  if not (jnp.issubdtype(beta.dtype, jnp.floating) or jnp.issubdtype(beta.dtype, jnp.integer)):
    raise ValueError(f"beta must be a number or a float array [num_classes]; got dtype "
                     f"{beta.dtype}.")
  beta = beta.astype(jnp.float32)
  if beta.ndim == 0:
    return beta, jnp.bool_(True)
  if beta.ndim != 1:
    raise ValueError(f"beta must be a scalar or have shape [num_classes]; got shape "
                     f"{tuple(beta.shape)}.")
  proxy_losses.check_label_range(labels, beta.shape[0], "one beta per class")
  in_range = proxy_losses.labels_in_range(labels, beta.shape[0], "one beta per class")
  return proxy_losses.nan_unless(in_range, beta), in_range

# Wu et al. 2017 learn one beta per class; it starts at the section's ``beta``, at its own rate
# ``beta_learning_rate`` (an Adam-scale rate; the paper trains beta with SGD at 0.1 on a gradient
# scaled by 1 / batch).
_BETA = spec.LossParam(
    init=lambda key, num_classes, dim, *, beta=1.2, **_: jnp.full((num_classes,), beta,
                                                                 jnp.float32),
    learning_rate=lambda config: config.loss.margin.beta_learning_rate,
    config_keys=("beta_learning_rate",))
SPECS = (spec.LossSpec(
    name="margin", label="margin (distance-weighted)", fn=margin_loss, paper="Wu et al. 2017",
    defaults=dict(margin=0.2, beta=1.2, nu=0.0, cutoff=0.5, nonzero_loss_cutoff=1.4,
                  beta_learning_rate=1e-3),
    normalize=True, group="later", params={"beta": _BETA}),)
