r"""Triplet loss with batch-all, batch-hard and semi-hard mining."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import mining as mining_lib
from rankjax import similarity
from rankjax.losses import _common

MINING = ("semihard", "hard", "all")


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                 mining: str = "semihard", distance: str = "euclidean",
                 soft: bool = False) -> jax.Array:
  r"""Triplet loss :math:`\ell(a, p, n) = \max(0,\ d_{ap} - d_{an} + m)` over in-batch triplets.

  With ``soft=True``, :math:`\ell(a, p, n) = \log(1 + e^{d_{ap} - d_{an}})` (no margin). Triplets
  come from the batch, by ``mining``:

  * ``"all"``: every valid triplet :math:`(a, p, n)`;
    :math:`L = \sum \ell \,/\, \#\{\ell > 0\}`, the mean over the active triplets (the mean over
    all valid triplets when ``soft``); 0 when there are none. Hermans, Beyer & Leibe 2017,
    "In defense of the triplet loss for person re-identification" ("BA≠0").
  * ``"hard"``: for each anchor with a positive and a negative, the farthest positive and the
    nearest negative, :math:`\ell(a, \arg\max_p d_{ap}, \arg\min_n d_{an})`, averaged over those
    anchors (Hermans et al. 2017, batch hard).
  * ``"semihard"``: for each positive pair :math:`(a, p)` whose anchor has a negative, the nearest
    negative with :math:`d_{an} > d_{ap}`, or the farthest negative where there is none; the mean
    of :math:`\ell` over those pairs (Schroff, Kalenichenko & Philbin 2015, "FaceNet"). This is
    exactly TF Addons' ``TripletSemiHardLoss`` (its ``"L_2"`` is ``distance="squared_euclidean"``),
    except that a one-class batch gives 0 where TF Addons gives :math:`\text{mean}(m + d_{ap})`
    and a batch without positive pairs gives 0 where TF Addons gives NaN.

  No ``B x B x B`` tensor is built: see :mod:`rankjax.mining` for how semi-hard and batch-all
  are answered in :math:`O(B^2 \log B)` time and :math:`O(B^2)` memory.

  Args:
    embeddings: ``f32[B, D]`` (used as given, not normalised).
    labels: ``int[B]`` class labels.
    margin: :math:`m \ge 0` (unused when ``soft``).
    mining: ``"semihard"``, ``"hard"`` or ``"all"``.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    soft: softplus instead of the hinge. With ``mining="all"`` this costs :math:`O(B^2 K)` for
      classes of at most ``K`` samples (softplus has no prefix-sum form).

  Returns:
    ``f32[]``; 0 when no triplet can be formed.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 0.], [1., 0.], [0., 1.5], [0., 2.]])
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> # Anchors 0 and 1: 1 - 1.5 + 1 and 1 - sqrt(3.25) + 1; anchors 2 and 3 are satisfied.
    >>> triplet_loss(x, labels, margin=1.0, mining="hard")
    Array(0.1743061, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  _common.check_choice(mining, "mining", MINING)
  similarity.check_distance(distance)
  similarity.check_nonnegative(margin, "margin")
  soft = _common.check_flag(soft, "soft")
  d = similarity.pairwise_distances(embeddings, distance=distance)

  def loss(gap):  # gap = d_ap - d_an
    return jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin)

  if mining == "hard":
    farthest_positive, has_positive = mining_lib.hardest_positive(d, labels)
    nearest_negative, has_negative = mining_lib.hardest_negative(d, labels)
    valid = has_positive & has_negative
    losses = jnp.where(valid, loss(farthest_positive - nearest_negative), 0.0)
    return _common.safe_mean(jnp.sum(losses), jnp.sum(valid))
  if mining == "semihard":
    negative, valid = mining_lib.semihard_negatives(d, labels)
    losses = jnp.where(valid, loss(d - negative), 0.0)
    return _common.safe_mean(jnp.sum(losses), jnp.sum(valid))
  if soft:
    sums = mining_lib.negative_softplus_sums(d, labels)
    return _common.safe_mean(jnp.sum(sums), mining_lib.valid_triplet_count(labels))
  sums, counts = mining_lib.negative_hinge_sums(d, labels, margin=margin)
  return _common.safe_mean(jnp.sum(sums), jnp.sum(counts))
