r"""Triplet loss with batch-all, batch-hard and semi-hard mining."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import mining as mining_lib
from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec

MINING = ("semihard", "hard", "all")


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                 mining: str = "semihard", distance: str = "euclidean", soft: bool = False,
                 ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                 ref_self_index: jax.Array | None = None,
                 precision=similarity.DEFAULT_PRECISION) -> jax.Array:
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

  With references (``ref_embeddings``, e.g. a cross-batch memory), anchors come from the batch
  and their positives and negatives from the references, by the same rules over the
  ``B x M`` distance matrix (:func:`rankjax.similarity.positive_mask` says which pairs count).

  No ``B x B x B`` tensor is built: see :mod:`rankjax.mining` for how semi-hard and batch-all
  are answered in :math:`O(B^2 \log B)` time and :math:`O(B^2)` memory (:math:`O(B M \log M)`
  and :math:`O(B M)` with references).

  Args:
    embeddings: ``f32[B, D]`` (used as given, not normalised).
    labels: ``int[B]`` class labels.
    margin: :math:`m \ge 0` (unused when ``soft``).
    mining: ``"semihard"``, ``"hard"`` or ``"all"``.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    soft: softplus instead of the hinge. With ``mining="all"`` this costs :math:`O(B^2 K)` for
      classes of at most ``K`` samples (softplus has no prefix-sum form).
    ref_embeddings: ``f32[M, D]`` references to draw positives and negatives from, or None:
      the batch itself.
    ref_labels: ``int[M]``, their labels (with ``ref_embeddings``); < 0 marks an empty slot.
    ref_self_index: ``int[B]``, the reference column holding each anchor itself (never paired
      with it), or None: the references hold no copy of the batch.
    precision: of the distance matrix's matmuls (:data:`rankjax.similarity.DEFAULT_PRECISION`).

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
  refs, masks = _common.references(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
  d = similarity.pairwise_distances(embeddings, refs, distance=distance, precision=precision)

  def loss(gap):  # gap = d_ap - d_an
    return jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin)

  if mining == "hard":
    farthest_positive, has_positive = mining_lib.hardest_positive(d, labels, **masks)
    nearest_negative, has_negative = mining_lib.hardest_negative(d, labels, **masks)
    valid = has_positive & has_negative
    losses = jnp.where(valid, loss(farthest_positive - nearest_negative), 0.0)
    return _common.safe_mean(jnp.sum(losses), jnp.sum(valid))
  if mining == "semihard":
    negative, valid = mining_lib.semihard_negatives(d, labels, **masks)
    losses = jnp.where(valid, loss(d - negative), 0.0)
    return _common.safe_mean(jnp.sum(losses), jnp.sum(valid))
  if soft:
    sums = mining_lib.negative_softplus_sums(d, labels, **masks)
    return _common.safe_mean(jnp.sum(sums), mining_lib.valid_triplet_count(labels, **masks))
  sums, counts = mining_lib.negative_hinge_sums(d, labels, margin=margin, **masks)
  return _common.safe_mean(jnp.sum(sums), jnp.sum(counts))

_TRIPLET = dict(fn=triplet_loss, normalize=True, diagnostics=("margin",))
SPECS = (
    spec.LossSpec(name="triplet_semihard", label="triplet (semi-hard)",
                  paper="Schroff et al. 2015 (FaceNet)", fixed={"mining": "semihard"},
                  defaults=dict(margin=0.2, distance="euclidean"), **_TRIPLET),
    spec.LossSpec(name="triplet_hard", label="triplet (batch hard)", paper="Hermans et al. 2017",
                  fixed={"mining": "hard"},
                  defaults=dict(margin=0.2, distance="euclidean", soft=False), **_TRIPLET),
    spec.LossSpec(name="triplet_all", label="triplet (batch all)", paper="Hermans et al. 2017",
                  fixed={"mining": "all"},
                  defaults=dict(margin=0.2, distance="euclidean", soft=False), **_TRIPLET),
)
