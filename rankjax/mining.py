r"""In-batch selection for ranking losses: hardest, semi-hard, all triplets, first/second per class.

Every function here takes a pairwise distance matrix ``distances: f32[B, B]`` (see
:mod:`rankjax.similarity`) and the batch's ``labels: int[B]`` and returns fixed-shape arrays, so it
runs under ``jit``, ``grad`` and ``vmap``. A positive pair ``(a, p)`` has ``a != p`` and the same
label; a negative pair has different labels.

With a reference set (``ref_labels: int[M]``, e.g. a cross-batch memory), ``distances`` is the
rectangular ``f32[B, M]`` matrix from the batch's anchors to the references, positives and
negatives are references, and the pairs follow :func:`rankjax.similarity.positive_mask`: empty
slots (label < 0) are in no pair, and ``ref_self_index[a]`` (when given) is the column never paired
with anchor ``a``. Time and memory are then :math:`O(B M)` per pass instead of :math:`O(B^2)`.

Semi-hard mining and batch-all sums answer, for every positive pair ``(a, p)``, a query against
all of ``a``'s negatives. Broadcasting that is a ``B x B x B`` tensor, which is never built. Two
exact strategies share the work, chosen at run time (``lax.cond``) from the largest class:

* **by positive slots** (every anchor has at most ``4 log2(M)`` positives, which covers P x K
  batches; ``M = B`` without references): a loop over ``k = 1 .. K-1`` visits every anchor's
  k-th positive at once, and each visit is one fused pass over the ``B x B`` matrix:
  :math:`O(B^2 K)` time, :math:`O(B^2)` memory, no sort;
* **by sorted rows** (any batch): each anchor's row holds its negative distances and its positive
  queries, sorted together once; every query is then answered from prefix scans of that row, and
  each entry's rank (``searchsorted``) maps values and gradients between sorted and batch order.
  :math:`O(B^2 \log B)` time, :math:`O(B^2)` memory. The sort runs on ``uint32`` keys (the bits of
  a non-negative float32 order like the float, and the spare low bit marks negatives against
  queries, fixing how ties break), since XLA sorts one integer operand several times faster than
  floats with an index payload.

Both give the same values; their gradients are custom VJPs that send each selected term's
cotangent to the distances it was computed from.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rankjax import similarity

_EXCLUDED = 0xFFFFFFFF  # Sort key of the diagonal (and anything left out): after every real key.

# Positive slots serve batches whose anchors have at most this many positives per log2(B); larger
# classes sort their rows. That keeps the worst case at O(B^2 log B). On the CPU the crossover
# was measured at about 6 log2(B) positives (B = 512 and 2048, D = 512).
SLOTS_PER_LOG2_BATCH = 4


def hardest_positive(distances: jax.Array, labels: jax.Array, *,
                     ref_labels: jax.Array | None = None,
                     ref_self_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Distance from each anchor to its farthest positive, :math:`\max_{p} d_{ap}`.

  Args:
    distances: ``f32[B, B]`` pairwise distances (``f32[B, M]`` to the references).
    labels: ``int[B]`` class labels.
    ref_labels: ``int[M]`` labels of the references, or None (the batch is the reference set).
    ref_self_index: ``int[B]``, the reference column holding each anchor itself, or None.

  Returns:
    ``(values f32[B], valid bool[B])``; ``valid[a]`` is False (and ``values[a]`` 0) when ``a`` has
    no positive. The gradient goes to the selected entry (shared equally between exact ties).

  Example:
    >>> import jax.numpy as jnp
    >>> d = jnp.array([[0., 1., 3.], [1., 0., 2.], [3., 2., 0.]])
    >>> hardest_positive(d, jnp.array([0, 0, 1]))
    (Array([1., 1., 0.], dtype=float32), Array([ True,  True, False], dtype=bool))
  """
  _check_distances(distances, labels, ref_labels)
  mask = similarity.positive_mask(labels, ref_labels=ref_labels, ref_self_index=ref_self_index)
  return _masked_extreme(distances, mask, jnp.max)


def hardest_negative(distances: jax.Array, labels: jax.Array, *,
                     ref_labels: jax.Array | None = None,
                     ref_self_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Distance from each anchor to its nearest negative, :math:`\min_{n} d_{an}`.

  Takes the arguments of :func:`hardest_positive` and returns ``(values f32[B], valid bool[B])``
  as it does.

  Example:
    >>> import jax.numpy as jnp
    >>> d = jnp.array([[0., 1., 3.], [1., 0., 2.], [3., 2., 0.]])
    >>> hardest_negative(d, jnp.array([0, 0, 1]))[0]
    Array([3., 2., 2.], dtype=float32)
  """
  _check_distances(distances, labels, ref_labels)
  mask = similarity.negative_mask(labels, ref_labels=ref_labels, ref_self_index=ref_self_index)
  return _masked_extreme(distances, mask, jnp.min)


def _masked_extreme(distances, mask, reduce_fn):
  valid = jnp.any(mask, axis=1)
  fill = -jnp.inf if reduce_fn is jnp.max else jnp.inf  # never wins; an empty row is masked below
  values = reduce_fn(jnp.where(mask, distances, fill), axis=1)
  return jnp.where(valid, values, 0.0), valid


def semihard_negatives(distances: jax.Array, labels: jax.Array, *,
                       ref_labels: jax.Array | None = None,
                       ref_self_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Semi-hard negative of every positive pair, by the rule of TF Addons' ``TripletSemiHardLoss``.

  For a positive pair :math:`(a, p)` the negative is the nearest one farther than the positive,

  .. math:: n^*(a, p) = \arg\min_{n:\ d_{an} > d_{ap}} d_{an},

  and, where no negative is farther than :math:`d_{ap}`, the farthest negative
  :math:`\arg\max_n d_{an}` (Schroff et al. 2015, "FaceNet"; TF Addons' exact rule: strict
  :math:`>`, no margin in the selection).

  Args:
    distances: ``f32[B, B]`` pairwise distances (``d >= 0``), or ``f32[B, M]`` to references.
    labels: ``int[B]`` class labels.
    ref_labels: ``int[M]`` labels of the references, or None (the batch is the reference set).
    ref_self_index: ``int[B]``, the reference column holding each anchor itself, or None.

  Returns:
    ``(negative_distances f32[B, M], valid bool[B, M])``: ``negative_distances[a, p]`` is
    :math:`d_{a n^*(a, p)}` where ``valid[a, p]``, i.e. for positive pairs whose anchor has a
    negative, and 0 elsewhere. Differentiable: the gradient of an entry flows to
    :math:`d_{a n^*}` (split equally between exactly tied negatives).

  Example:
    >>> import jax.numpy as jnp
    >>> d = jnp.array([[0., 1., .75, .5], [1., 0., 3., 4.], [.75, 3., 0., 1.], [.5, 4., 1., 0.]])
    >>> neg, valid = semihard_negatives(d, jnp.array([0, 0, 1, 1]))
    >>> neg[0, 1], neg[1, 0]  # none beyond d_01 = 1: the farthest; 3 and 4 beyond d_10: the nearer
    (Array(0.75, dtype=float32), Array(3., dtype=float32))
  """
  _check_distances(distances, labels, ref_labels)
  masks = dict(ref_labels=ref_labels, ref_self_index=ref_self_index)
  has_negative = jnp.any(similarity.negative_mask(labels, **masks), axis=1)
  valid = similarity.positive_mask(labels, **masks) & has_negative[:, None]
  return _semihard_choice(distances, labels, _columns(labels, ref_labels, ref_self_index)), valid


def negative_hinge_sums(distances: jax.Array, labels: jax.Array, *, margin,
                        ref_labels: jax.Array | None = None,
                        ref_self_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Batch-all hinge sums: for every positive pair, its summed hinge over all negatives.

  .. math::
     s_{ap} = \sum_{n} \max(0,\ d_{ap} - d_{an} + m), \qquad
     c_{ap} = \#\{n : d_{ap} - d_{an} + m > 0\}

  over the negatives ``n`` of ``a`` (Hermans et al. 2017, "In defense of the triplet loss"),
  computed without the ``B x B x B`` triplet tensor.

  Args:
    distances: ``f32[B, B]`` pairwise distances (``d >= 0``), or ``f32[B, M]`` to references.
    labels: ``int[B]`` class labels.
    margin: the margin ``m >= 0`` (a float or a scalar array).
    ref_labels: ``int[M]`` labels of the references, or None (the batch is the reference set).
    ref_self_index: ``int[B]``, the reference column holding each anchor itself, or None.

  Returns:
    ``(sums f32[B, M], counts f32[B, M])``, zero off the positive pairs. ``sums`` is
    differentiable in ``distances`` and ``margin``.

  Example:
    >>> import jax.numpy as jnp
    >>> d = jnp.array([[0., 1., 1.5, 3.], [1., 0., 2., 4.], [1.5, 2., 0., 1.], [3., 4., 1., 0.]])
    >>> sums, counts = negative_hinge_sums(d, jnp.array([0, 0, 1, 1]), margin=1.0)
    >>> sums[0, 1], counts[0, 1]  # only n = 2: 1 - 1.5 + 1
    (Array(0.5, dtype=float32), Array(1., dtype=float32))
  """
  _check_distances(distances, labels, ref_labels)
  return _hinge_sums(distances, jnp.asarray(margin, distances.dtype), labels,
                     _columns(labels, ref_labels, ref_self_index))


def negative_softplus_sums(distances: jax.Array, labels: jax.Array, *,
                           ref_labels: jax.Array | None = None,
                           ref_self_index: jax.Array | None = None) -> jax.Array:
  r"""Soft batch-all sums :math:`s_{ap} = \sum_n \log(1 + e^{d_{ap} - d_{an}})` per positive pair.

  The soft-margin triplet of Hermans et al. 2017 over every negative. Softplus does not split
  into prefix sums, so this always runs by positive slots: :math:`O(B^2 K)` time for classes of
  at most ``K`` samples (``K = B`` in the worst case), :math:`O(B^2)` memory. Takes the
  references as :func:`negative_hinge_sums` does (then :math:`O(B M K)` time).

  Returns:
    ``f32[B, M]``, zero off the positive pairs; differentiable in ``distances``.

  Example:
    >>> import jax.numpy as jnp
    >>> d = jnp.array([[0., 1., 1.], [1., 0., 1.], [1., 1., 0.]])
    >>> negative_softplus_sums(d, jnp.array([0, 0, 1]))[0, 1]  # log(1 + e^0)
    Array(0.6931472, dtype=float32)
  """
  _check_distances(distances, labels, ref_labels)
  return _softplus_sums(distances, labels, _columns(labels, ref_labels, ref_self_index))


def valid_triplet_count(labels: jax.Array, *, ref_labels: jax.Array | None = None,
                        ref_self_index: jax.Array | None = None) -> jax.Array:
  r"""Number of valid triplets :math:`\sum_a |P(a)|\,|N(a)|` as ``f32[]`` (exceeds int32 at B=4096).

  With ``ref_labels``, positives and negatives are references (as in :func:`semihard_negatives`).

  Example:
    >>> import jax.numpy as jnp
    >>> valid_triplet_count(jnp.array([0, 0, 1, 1, 1]))
    Array(18., dtype=float32)
  """
  if ref_labels is not None:
    masks = dict(ref_labels=ref_labels, ref_self_index=ref_self_index)
    positives = jnp.sum(similarity.positive_mask(labels, **masks), axis=1).astype(jnp.float32)
    negatives = jnp.sum(similarity.negative_mask(labels, **masks), axis=1).astype(jnp.float32)
    return jnp.sum(positives * negatives)
  same = similarity.same_label_mask(labels)
  same_count = jnp.sum(same, axis=1).astype(jnp.float32)
  batch = labels.shape[0]
  return jnp.sum((same_count - 1.0) * (batch - same_count))


def _check_distances(distances, labels, ref_labels):
  width = labels.shape[0] if ref_labels is None else ref_labels.shape[0]
  if distances.shape != (labels.shape[0], width):
    what = "references" if ref_labels is not None else "batch"
    raise ValueError(f"distances must have shape [{labels.shape[0]}, {width}] (anchors x "
                     f"{what}); got {tuple(distances.shape)}.")


class ClassPairs(NamedTuple):
  """First and second sample of each class with two or more, in ``max(B // 2, 1)`` slots.

  Attributes:
    anchors: ``int32[S]``: batch index of a class's first sample (0 in unused slots).
    positives: ``int32[S]``: batch index of the same class's second sample (0 in unused slots).
    valid: ``bool[S]``: which slots hold a pair; the first ``sum(valid)`` slots do.
  """
  anchors: jax.Array
  positives: jax.Array
  valid: jax.Array


def first_two_per_class(labels: jax.Array, *, slots: int | None = None) -> ClassPairs:
  """The N-pairs (anchor, positive) of each class with two or more samples (Sohn 2016).

  The anchor of a class is its first sample in batch order and its positive the second, so a
  batch laid out as (anchor, positive) pairs of distinct classes gives exactly the paper's pairs.
  Pairs fill ``slots`` static slots, ordered by label; a batch has at most ``B // 2`` pairs (the
  default), and :func:`pair_count` says how many it has: pairs beyond ``slots`` are dropped.
  ``O(B log B)``.

  Example:
    >>> import jax.numpy as jnp
    >>> pairs = first_two_per_class(jnp.array([3, 5, 3, 3, 7, 5]))
    >>> pairs.anchors, pairs.positives
    (Array([0, 1, 0], dtype=int32), Array([2, 5, 0], dtype=int32))
    >>> pairs.valid
    Array([ True,  True, False], dtype=bool)
  """
  batch = labels.shape[0]
  slots = max(batch // 2, 1) if slots is None else slots
  order, has_second = _classes_with_two(labels)
  (first,) = jnp.nonzero(has_second, size=slots, fill_value=0)
  valid = jnp.arange(slots) < jnp.sum(has_second)
  second = jnp.minimum(first + 1, batch - 1)
  return ClassPairs(jnp.where(valid, order[first], 0), jnp.where(valid, order[second], 0), valid)


def pair_count(labels: jax.Array) -> jax.Array:
  """``int32[]``: the number of classes with at least two samples in the batch.

  Example:
    >>> import jax.numpy as jnp
    >>> pair_count(jnp.array([3, 5, 3, 3, 7, 5]))
    Array(2, dtype=int32)
  """
  return jnp.sum(_classes_with_two(labels)[1]).astype(jnp.int32)


def _classes_with_two(labels):
  """Label-sorted batch order (stable), and where in it a class starts that has a second sample."""
  order = jnp.argsort(labels, stable=True).astype(jnp.int32)  # stable: batch order within a class
  sorted_labels = labels[order]
  follows_same = sorted_labels[1:] == sorted_labels[:-1]
  starts = jnp.concatenate([jnp.ones((1,), bool), ~follows_same])
  return order, starts & jnp.concatenate([follows_same, jnp.zeros((1,), bool)])


# --- Row machinery -------------------------------------------------------------------------------
#
# Semi-hard and batch-all work anchor by anchor: row a of the output needs only row a of the
# distances and the labels. So each is written for one row and mapped over the rows, a block of
# rows at a time when the matrix is large, which bounds the temporaries (sorted keys, ranks,
# prefix scans) to one block. The custom VJPs keep only the distances and recompute the rest
# block by block in the backward pass.

_BLOCK_ELEMENTS = 1 << 20  # Rows per block: about 1M entries (4 MiB per float32 temporary).


def _map_rows(fn, *rows):
  """``stack([fn(*r) for r in zip(*rows)])``, vectorised over blocks of rows."""
  batch, width = rows[0].shape[0], rows[0].shape[-1]
  block = max(1, _BLOCK_ELEMENTS // max(width, 1))
  if block >= batch:
    return jax.vmap(fn)(*rows)
  return lax.map(lambda args: fn(*args), rows, batch_size=block)


class _Columns(NamedTuple):
  """What an anchor may be paired with: the batch itself, or a reference set."""
  labels: jax.Array             # int[M]: the columns' labels
  usable: jax.Array | None      # bool[M]: False for an empty slot; None: all usable (the batch)
  self_column: jax.Array        # int[B]: the column holding each anchor itself (M or < 0: none)


def _columns(labels, ref_labels, ref_self_index) -> _Columns:
  if ref_labels is None:
    return _Columns(labels, None, jnp.arange(labels.shape[0], dtype=jnp.int32))
  width = ref_labels.shape[0]
  if ref_self_index is None:
    ref_self_index = jnp.full(labels.shape, width, jnp.int32)
  return _Columns(ref_labels, ref_labels >= 0, ref_self_index)


def _row_masks(labels, columns: _Columns, anchor):
  """``(positive bool[M], negative bool[M])`` of one anchor."""
  same = columns.labels == labels[anchor]
  other = jnp.arange(columns.labels.shape[0]) != columns.self_column[anchor]
  if columns.usable is None:
    return same & other, ~same
  usable = columns.usable & other
  return same & usable, ~same & usable


class _Slots(NamedTuple):
  """Where each anchor's class sits among the label-sorted columns: its k-th positive is one
  lookup away."""
  order: jax.Array          # int[M]: column indices sorted by label (stable)
  class_start: jax.Array    # int[B]: per anchor, first position of its class in `order`
  class_size: jax.Array     # int[B]: per anchor, number of columns of its class
  offset: jax.Array         # int[B]: per anchor, its own position within its class (-1: absent)
  count: jax.Array          # int[B]: per anchor, number of positives
  max_positives: jax.Array  # int[]: largest number of positives


def _positive_slots(labels, columns: _Columns) -> _Slots:
  width = columns.labels.shape[0]
  keys = columns.labels
  if columns.usable is not None:  # Empty slots sort first, in a class no anchor has.
    keys = jnp.where(columns.usable, keys, jnp.iinfo(keys.dtype).min)
  order = jnp.argsort(keys, stable=True)
  sorted_keys = keys[order]
  start = jnp.searchsorted(sorted_keys, labels, side="left")
  size = jnp.searchsorted(sorted_keys, labels, side="right") - start
  position = jnp.zeros_like(order).at[order].set(jnp.arange(width, dtype=order.dtype))
  own = columns.self_column
  inside = (own >= 0) & (own < width)
  own_position = position[jnp.clip(own, 0, width - 1)]
  has_self = inside & (own_position >= start) & (own_position < start + size)
  offset = jnp.where(has_self, own_position - start, -1)
  count = size - has_self.astype(size.dtype)
  return _Slots(order, start, size, offset, count, jnp.max(count))


def _use_slots(slots):
  batch = slots.order.shape[0]
  return slots.max_positives <= SLOTS_PER_LOG2_BATCH * max(1, math.ceil(math.log2(max(batch, 2))))


def _partner(slots: _Slots, anchor, k):
  """The anchor's k-th positive (k >= 1) as ``(column, valid)``; column M (dropped) if none.

  Its class's columns are visited cyclically from the one after the anchor's own (from the first
  when the anchor is not among them).
  """
  size = slots.class_size[anchor]
  valid = k <= slots.count[anchor]
  within = (slots.offset[anchor] + k) % jnp.maximum(size, 1)
  partner = slots.order[slots.class_start[anchor] + within]
  return jnp.where(valid, partner, slots.order.shape[0]), valid


def _at(row, column):
  """``row[column]``, and 0 where ``column`` is out of range."""
  inside = column < row.shape[0]
  return jnp.where(inside, row[jnp.where(inside, column, 0)], jnp.zeros((), row.dtype))


def _over_slots(slots, body, init):
  return lax.fori_loop(1, slots.max_positives + 1, body, init)


def _sort_keys(values, second_kind, include):
  """``uint32`` keys ordering values; at equal values ``second_kind`` entries go last.

  Non-negative float32 bit patterns compare like the floats, and they fit in 31 bits, which
  leaves the low bit for the kind. Excluded entries (the diagonal) sort after everything.
  """
  values = jnp.where(values > 0, values, 0.0).astype(jnp.float32)  # +0.0, never -0.0
  bits = lax.bitcast_convert_type(values, jnp.uint32)
  keys = (bits << 1) | second_kind.astype(jnp.uint32)
  return jnp.where(include, keys, jnp.uint32(_EXCLUDED))


def _sorted_row(keys, negative_kind: int):
  """Sorted keys, each key's first position among its equals, their values, and negatives."""
  sorted_keys = lax.sort(keys, is_stable=False)
  ranks = jnp.searchsorted(sorted_keys, keys, side="left").astype(jnp.int32)
  in_row = sorted_keys != jnp.uint32(_EXCLUDED)
  values = jnp.where(in_row, lax.bitcast_convert_type(sorted_keys >> 1, jnp.float32), 0.0)
  is_negative = in_row & ((sorted_keys & 1) == negative_kind)
  return sorted_keys, ranks, values, is_negative


def _exclusive_reverse_cummin(x, fill):
  return jnp.concatenate([lax.cummin(x, reverse=True)[1:], jnp.full_like(x[:1], fill)])


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


# --- Semi-hard: nearest negative strictly beyond each positive, else the farthest ----------------


@jax.custom_vjp
def _semihard_choice(distances, labels, columns):
  """``f32[B, M]``: per positive pair, the chosen negative's distance (0 without negatives)."""
  slots = _positive_slots(labels, columns)

  def row(d_row, anchor):
    pos, neg = _row_masks(labels, columns, anchor)
    return lax.cond(_use_slots(slots),
                    lambda: _semihard_row_by_slots(d_row, neg, slots, anchor),
                    lambda: _semihard_row_by_sorting(d_row, pos, neg)[0])

  return _map_rows(row, distances, jnp.arange(labels.shape[0]))


def _farthest(d_row, neg):
  return jnp.max(jnp.where(neg, d_row, -jnp.inf))  # -inf without negatives


def _semihard_row_by_slots(d_row, neg, slots, anchor):
  farthest = _farthest(d_row, neg)

  def visit(k, chosen):
    column, valid = _partner(slots, anchor, k)
    nearest = jnp.min(jnp.where(neg & (d_row > _at(d_row, column)), d_row, jnp.inf))
    negative = jnp.where(nearest < jnp.inf, nearest, farthest)
    return chosen.at[column].set(jnp.where(valid & (farthest > -jnp.inf), negative, 0.0),
                                 mode="drop")

  return _over_slots(slots, visit, jnp.zeros_like(d_row))


def _semihard_row_by_sorting(d_row, pos, neg):
  # Negatives sort before positives at equal distance: a tie is not "farther than d_ap".
  sorted_keys, ranks, values, is_negative = _sorted_row(
      _sort_keys(d_row, pos, pos | neg), negative_kind=0)
  # Sorted, the first negative after a position is the smallest one beyond it.
  beyond = _exclusive_reverse_cummin(jnp.where(is_negative, values, jnp.inf), jnp.inf)[ranks]
  found = pos & (beyond < jnp.inf)
  farthest = _farthest(d_row, neg)
  chosen = jnp.where(found, beyond, farthest)
  chosen = jnp.where(pos & (farthest > -jnp.inf), chosen, 0.0)
  return chosen, found, farthest, sorted_keys, ranks, is_negative


def _semihard_fwd(distances, labels, columns):
  return _semihard_choice(distances, labels, columns), (distances, labels, columns)


def _semihard_bwd(residuals, g):
  distances, labels, columns = residuals
  slots = _positive_slots(labels, columns)

  def row(d_row, g_row, anchor):
    pos, neg = _row_masks(labels, columns, anchor)
    return lax.cond(_use_slots(slots),
                    lambda: _semihard_grad_row_by_slots(d_row, g_row, neg, slots, anchor),
                    lambda: _semihard_grad_row_by_sorting(d_row, g_row, pos, neg))

  return _map_rows(row, distances, g, jnp.arange(labels.shape[0])), None, None


def _shared(d_row, neg, value, g):
  """``g`` split equally between the negatives at distance ``value`` (exact ties share)."""
  chosen = neg & (d_row == value)
  return jnp.where(chosen, g / jnp.maximum(jnp.sum(chosen), 1), 0.0)


def _semihard_grad_row_by_slots(d_row, g_row, neg, slots, anchor):
  farthest = _farthest(d_row, neg)

  def visit(k, grad):
    column, valid = _partner(slots, anchor, k)
    nearest = jnp.min(jnp.where(neg & (d_row > _at(d_row, column)), d_row, jnp.inf))
    negative = jnp.where(nearest < jnp.inf, nearest, farthest)
    return grad + _shared(d_row, neg, negative, jnp.where(valid, _at(g_row, column), 0.0))

  return _over_slots(slots, visit, jnp.zeros_like(d_row))


def _semihard_grad_row_by_sorting(d_row, g_row, pos, neg):
  _, found, farthest, sorted_keys, ranks, is_negative = _semihard_row_by_sorting(d_row, pos, neg)
  g = jnp.where(found, g_row, 0.0)
  position = jnp.arange(d_row.shape[0], dtype=jnp.int32)
  # The positives that pick a negative are those sorted between it and the previous negative.
  cumulative = jnp.cumsum(jnp.zeros_like(g).at[ranks].add(g))
  last = lax.cummax(jnp.where(is_negative, position, -1))
  previous = jnp.concatenate([jnp.full_like(last[:1], -1), last[:-1]])
  picked = jnp.where(is_negative, cumulative
                     - jnp.where(previous >= 0, cumulative[jnp.maximum(previous, 0)], 0.0), 0.0)
  # Exactly tied negatives share one key (and one rank): split their gradient between them.
  starts = jnp.concatenate([jnp.ones_like(sorted_keys[:1], bool),
                            sorted_keys[1:] != sorted_keys[:-1]])
  group_size = _exclusive_reverse_cummin(jnp.where(starts, position, d_row.shape[0]),
                                         d_row.shape[0]) - position
  grad = jnp.where(neg, (picked / group_size.astype(picked.dtype))[ranks], 0.0)
  # Positives with no negative beyond them all pick the farthest one.
  return grad + _shared(d_row, neg, farthest, jnp.sum(jnp.where(pos & ~found, g_row, 0.0)))


_semihard_choice.defvjp(_semihard_fwd, _semihard_bwd)


# --- Batch-all: hinge sums over every negative ---------------------------------------------------


@jax.custom_vjp
def _hinge_sums(distances, margin, labels, columns):
  """``(sums f32[B, M], counts f32[B, M])`` of relu(d_ap + m - d_an) over negatives n."""
  slots = _positive_slots(labels, columns)

  def row(d_row, anchor):
    pos, neg = _row_masks(labels, columns, anchor)
    return lax.cond(_use_slots(slots),
                    lambda: _hinge_row_by_slots(d_row, margin, neg, slots, anchor),
                    lambda: _hinge_row_by_sorting(d_row, margin, pos, neg)[:2])

  return _map_rows(row, distances, jnp.arange(labels.shape[0]))


def _hinge_row_by_slots(d_row, margin, neg, slots, anchor):
  def visit(k, carry):
    sums, counts = carry
    column, _ = _partner(slots, anchor, k)
    excess = _at(d_row, column) + margin - d_row
    active = neg & (excess > 0)
    sums = sums.at[column].set(jnp.sum(jnp.where(active, excess, 0.0)), mode="drop")
    return sums, counts.at[column].set(jnp.sum(active).astype(sums.dtype), mode="drop")

  return _over_slots(slots, visit, (jnp.zeros_like(d_row), jnp.zeros_like(d_row)))


def _hinge_row_by_sorting(d_row, margin, pos, neg):
  thresholds = d_row + margin
  # Thresholds sort before negatives at equal value: d_an = d_ap + m gives a zero hinge.
  keys = _sort_keys(jnp.where(pos, thresholds, d_row), neg, pos | neg)
  _, ranks, values, is_negative = _sorted_row(keys, negative_kind=1)
  # Centring the row keeps c * t - sum(d) from cancelling in float32.
  centre = jnp.sum(jnp.where(neg, d_row, 0.0)) / jnp.maximum(jnp.sum(neg), 1)
  counts = jnp.where(pos, _exclusive_cumsum(is_negative.astype(d_row.dtype))[ranks], 0.0)
  sums_before = _exclusive_cumsum(jnp.where(is_negative, values - centre, 0.0))[ranks]
  sums = jnp.where(pos, counts * (thresholds - centre) - sums_before, 0.0)
  return sums, counts, ranks, is_negative


def _hinge_fwd(distances, margin, labels, columns):
  return _hinge_sums(distances, margin, labels, columns), (distances, margin, labels, columns)


def _hinge_bwd(residuals, cotangents):
  distances, margin, labels, columns = residuals
  slots = _positive_slots(labels, columns)

  def row(d_row, g_row, anchor):
    pos, neg = _row_masks(labels, columns, anchor)
    return lax.cond(_use_slots(slots),
                    lambda: _hinge_grad_row_by_slots(d_row, g_row, margin, neg, slots, anchor),
                    lambda: _hinge_grad_row_by_sorting(d_row, g_row, margin, pos, neg))

  grad, grad_margin = _map_rows(row, distances, cotangents[0], jnp.arange(labels.shape[0]))
  return grad, jnp.sum(grad_margin).astype(margin.dtype), None, None


def _hinge_grad_row_by_slots(d_row, g_row, margin, neg, slots, anchor):
  def visit(k, carry):
    grad, grad_margin = carry
    column, valid = _partner(slots, anchor, k)
    active = neg & (_at(d_row, column) + margin - d_row > 0)
    g_ap = jnp.where(valid, _at(g_row, column), 0.0)
    pull = g_ap * jnp.sum(active)  # d s_ap / d d_ap = count
    grad = (grad - jnp.where(active, g_ap, 0.0)).at[column].add(pull, mode="drop")
    return grad, grad_margin + pull

  return _over_slots(slots, visit, (jnp.zeros_like(d_row), jnp.zeros((), d_row.dtype)))


def _hinge_grad_row_by_sorting(d_row, g_row, margin, pos, neg):
  _, counts, ranks, is_negative = _hinge_row_by_sorting(d_row, margin, pos, neg)
  g = jnp.where(pos, g_row, 0.0)
  # A negative's hinge is active for every threshold sorted after it.
  moved = jnp.zeros_like(g).at[ranks].add(g)
  after = jnp.cumsum(moved[::-1])[::-1] - moved
  push = jnp.where(neg, jnp.where(is_negative, after, 0.0)[ranks], 0.0)
  return g * counts - push, jnp.sum(g * counts)


_hinge_sums.defvjp(_hinge_fwd, _hinge_bwd)


# --- Soft batch-all: softplus sums over every negative -------------------------------------------


@jax.custom_vjp
def _softplus_sums(distances, labels, columns):
  """``f32[B, M]``: per positive pair, sum over negatives n of softplus(d_ap - d_an)."""
  slots = _positive_slots(labels, columns)

  def row(d_row, anchor):
    _, neg = _row_masks(labels, columns, anchor)

    def visit(k, sums):
      column, _ = _partner(slots, anchor, k)
      terms = jnp.where(neg, jax.nn.softplus(_at(d_row, column) - d_row), 0.0)
      return sums.at[column].set(jnp.sum(terms), mode="drop")

    return _over_slots(slots, visit, jnp.zeros_like(d_row))

  return _map_rows(row, distances, jnp.arange(labels.shape[0]))


def _softplus_fwd(distances, labels, columns):
  return _softplus_sums(distances, labels, columns), (distances, labels, columns)


def _softplus_bwd(residuals, g):
  distances, labels, columns = residuals
  slots = _positive_slots(labels, columns)

  def row(d_row, g_row, anchor):
    _, neg = _row_masks(labels, columns, anchor)

    def visit(k, grad):
      column, valid = _partner(slots, anchor, k)
      slope = jnp.where(neg, jax.nn.sigmoid(_at(d_row, column) - d_row), 0.0)
      g_ap = jnp.where(valid, _at(g_row, column), 0.0)
      return (grad - g_ap * slope).at[column].add(g_ap * jnp.sum(slope), mode="drop")

    return _over_slots(slots, visit, jnp.zeros_like(d_row))

  return _map_rows(row, distances, g, jnp.arange(labels.shape[0])), None, None


_softplus_sums.defvjp(_softplus_fwd, _softplus_bwd)
