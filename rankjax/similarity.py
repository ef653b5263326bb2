r"""Pairwise distance and similarity matrices, label masks and input checks.

Every ranking loss in :mod:`rankjax.losses` and the retrieval metrics in :mod:`rankjax.evaluation`
start from the same two objects: a pairwise matrix between embeddings and the masks saying which
pairs share a label. They live here, in one place.

Distances (``distance=``):

* ``"euclidean"``: :math:`d_{ij} = \sqrt{\|x_i - x_j\|^2}`, with a finite (zero) gradient at
  :math:`x_i = x_j`;
* ``"squared_euclidean"``: :math:`d_{ij} = \|x_i - x_j\|^2`;
* ``"cosine"``: :math:`d_{ij} = 1 - \cos(x_i, x_j)` (a zero vector has cosine 0 with everything).

The squared distance is computed from the Gram matrix,
:math:`\|x_i\|^2 + \|x_j\|^2 - 2 x_i \cdot x_j`, clipped at 0 (one matmul, as in TF Addons), with
the
diagonal of a self-distance matrix set to exactly 0.

Precision: every matrix product here runs at ``precision=jax.lax.Precision.HIGHEST`` unless told
otherwise (:data:`DEFAULT_PRECISION`), as the evaluation does. On TPUs the backend's default
computes float32 matmuls in bfloat16 passes, and recent NVIDIA GPUs may use TF32: the Gram form
then gives noisy distances between near-duplicates, which is what semi-hard selection and the
gradient of the square root at small distances are most sensitive to. ``precision=`` (any value
``jax.lax.dot_general`` takes: a ``jax.lax.Precision``, ``"default"``, ``"high"``, ``"highest"``,
``None``) trades that accuracy for speed. On the CPU every setting computes in float32.

References: a loss compares the rows of a batch (its anchors) either with the batch itself or with
a reference set ``(ref_embeddings f32[M, D], ref_labels int[M])``, e.g. a cross-batch memory.
:func:`positive_mask` and :func:`negative_mask` then give ``bool[B, M]`` masks, by these rules:

* without references, the batch is its own reference set and a sample is never paired with itself
  (the diagonal is excluded);
* with references, a negative reference label marks an empty slot, which is in no pair; nothing
  else is excluded, except the column ``ref_self_index[i]`` (when given) for anchor ``i``: the
  references' copy of that anchor, e.g. a memory that already holds the current batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
# The precision of the losses' pairwise matrices (see the module docstring).
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def check_distance(distance: str, *, allowed=DISTANCES) -> str:
  """Returns ``distance`` or raises a ``ValueError`` naming the ``distance`` argument."""
  if distance not in allowed:
    raise ValueError(f"distance={distance!r} is not one of {', '.join(map(repr, allowed))}.")
  return distance


def check_precision(precision):
  """Returns ``precision`` if ``jax.lax.dot_general`` takes it, else raises a ``ValueError``.

  Accepted: None, a ``jax.lax.Precision``, its name (``"default"``, ``"high"``, ``"highest"``,
  or ``"bfloat16"``, ``"tensorfloat32"``, ``"float32"``) or a pair of those (one per operand).
  """
  values = precision if isinstance(precision, (tuple, list)) and len(precision) == 2 else (
      precision,)
  for value in values:
    if value is None or isinstance(value, jax.lax.Precision):
      continue
    try:
      jax.lax.Precision(value)
    except (ValueError, TypeError):
      raise ValueError(f"precision={precision!r} is not a matmul precision: use None, a "
                       "jax.lax.Precision, or 'default', 'high' or 'highest'.") from None
  return tuple(precision) if isinstance(precision, list) else precision


def check_embeddings_and_labels(embeddings, labels, *, name: str = "embeddings",
                                labels_name: str = "labels"):
  """Checks a batch where it enters and returns it as ``(f32[B, D], int32[B])``.

  Raises ``ValueError`` naming the argument for a wrong rank, mismatched lengths, non-floating
  embeddings or non-integer labels. Works on tracers (it only reads shapes and dtypes), so it is
  safe under ``jit``, ``grad`` and ``vmap``. Low-precision inputs (bfloat16, float16) are upcast to
  float32 so that no loss overflows or loses its small differences.
  """
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  if embeddings.ndim != 2:
    raise ValueError(
        f"{name} must have rank 2 [batch, dim]; got shape {tuple(embeddings.shape)}.")
  if labels.ndim != 1:
    raise ValueError(f"{labels_name} must have rank 1 [batch]; got shape {tuple(labels.shape)}.")
  if embeddings.shape[0] != labels.shape[0]:
    raise ValueError(
        f"{name} has {embeddings.shape[0]} rows but {labels_name} has {labels.shape[0]} "
        "entries.")
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got dtype {embeddings.dtype}.")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise ValueError(f"{labels_name} must be integers; got dtype {labels.dtype}.")
  return embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32)), labels.astype(
      jnp.int32)


def check_nonnegative(value, name: str):
  """Raises ``ValueError`` when a concrete ``value`` (a margin, a scale) is negative."""
  try:
    concrete = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # A traced hyper-parameter (e.g. under vmap over margins) cannot be checked.
  if not np.isfinite(concrete) or concrete < 0:
    raise ValueError(f"{name} must be a finite number >= 0; got {value}.")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  r""":math:`x / \max(\|x\|, \epsilon)`: zero vectors stay zero, and the gradient stays finite."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(max(x, 0))`` whose gradient at 0 is 0 rather than inf (and so never NaN)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def squared_euclidean_distances(x: jax.Array, y: jax.Array | None = None, *,
                                precision=DEFAULT_PRECISION) -> jax.Array:
  r""":math:`\|x_i - y_j\|^2` for ``x: f32[N, D]``, ``y: f32[M, D]`` -> ``f32[N, M]``.

  With ``y=None`` the matrix is between ``x`` and itself and its diagonal is exactly 0.
  ``precision`` is that of the matrix products (forward and backward).
  """
  precision = check_precision(precision)
  if y is None:
    return _self_squared_distances(x, precision)
  return _cross_squared_distances(x, y, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_squared_distances(x, y, precision):
  return _cross_squared_distances_fwd(x, y, precision)[0]


def _cross_squared_distances_fwd(x, y, precision):
  sq = (jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :]
        - 2.0 * jnp.matmul(x, y.T, precision=precision))
  kept = sq > 0
  return jnp.where(kept, sq, 0.0), (x, y, kept)


def _cross_squared_distances_bwd(precision, residuals, g):
  # Written out so that the backward pass keeps one B x M mask, not autodiff's intermediates:
  # dL/dx_i = 2 sum_j G_ij (x_i - y_j), dL/dy_j = 2 sum_i G_ij (y_j - x_i).
  x, y, kept = residuals
  g = jnp.where(kept, g, 0.0)
  grad_x = 2.0 * (jnp.sum(g, axis=1)[:, None] * x - jnp.matmul(g, y, precision=precision))
  grad_y = 2.0 * (jnp.sum(g, axis=0)[:, None] * y - jnp.matmul(g.T, x, precision=precision))
  return grad_x, grad_y


_cross_squared_distances.defvjp(_cross_squared_distances_fwd, _cross_squared_distances_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _self_squared_distances(x, precision):
  return _self_squared_distances_fwd(x, precision)[0]


def _self_squared_distances_fwd(x, precision):
  norms = jnp.sum(x * x, axis=-1)
  sq = norms[:, None] + norms[None, :] - 2.0 * jnp.matmul(x, x.T, precision=precision)
  kept = (sq > 0) & ~jnp.eye(x.shape[0], dtype=bool)
  return jnp.where(kept, sq, 0.0), (x, kept)


def _self_squared_distances_bwd(precision, residuals, g):
  # The matrix is symmetric in x, so one matmul with the symmetrised cotangent S = G + G^T does
  # the backward pass: dL/dx_k = 2 (sum_j S_kj x_k - sum_j S_kj x_j). Autodiff would take two.
  x, kept = residuals
  g = jnp.where(kept, g, 0.0)
  s = g + g.T
  return (2.0 * (jnp.sum(s, axis=1)[:, None] * x - jnp.matmul(s, x, precision=precision)),)


_self_squared_distances.defvjp(_self_squared_distances_fwd, _self_squared_distances_bwd)


def cosine_similarities(x: jax.Array, y: jax.Array | None = None, *,
                        precision=DEFAULT_PRECISION) -> jax.Array:
  r""":math:`\cos(x_i, y_j)` for ``x: f32[N, D]``, ``y: f32[M, D]`` -> ``f32[N, M]``."""
  precision = check_precision(precision)
  xn = l2_normalize(x)
  yn = xn if y is None else l2_normalize(y)
  return jnp.matmul(xn, yn.T, precision=precision)


def pairwise_distances(x: jax.Array, y: jax.Array | None = None, *,
                       distance: str = "euclidean", precision=DEFAULT_PRECISION) -> jax.Array:
  """The ``f32[N, M]`` matrix of ``distance`` between the rows of ``x`` and of ``y`` (or ``x``).

  Example:
    >>> import jax.numpy as jnp
    >>> pairwise_distances(jnp.array([[0., 0.], [3., 4.]]))
    Array([[0., 5.],
           [5., 0.]], dtype=float32)
  """
  check_distance(distance)
  if distance == "cosine":
    d = 1.0 - cosine_similarities(x, y, precision=precision)
    if y is None:
      d = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)
    return d
  sq = squared_euclidean_distances(x, y, precision=precision)
  return sq if distance == "squared_euclidean" else safe_sqrt(sq)


def same_label_mask(labels: jax.Array, other_labels: jax.Array | None = None) -> jax.Array:
  """``bool[N, M]``: True where ``labels[i] == other_labels[j]``.

  ``other_labels`` defaults to ``labels``.
  """
  other = labels if other_labels is None else other_labels
  return labels[:, None] == other[None, :]


def positive_mask(labels: jax.Array, *, ref_labels: jax.Array | None = None,
                  ref_self_index: jax.Array | None = None) -> jax.Array:
  """``bool[B, M]``: positive pairs, the same label and not the anchor itself.

  Without ``ref_labels``, pairs ``i != j`` of the batch (``M = B``); with them, by the rules of
  the module docstring (empty slots, label < 0, and ``ref_self_index`` excluded).
  """
  if ref_labels is None:
    return same_label_mask(labels) & ~jnp.eye(labels.shape[0], dtype=bool)
  return same_label_mask(labels, ref_labels) & _usable_references(ref_labels, ref_self_index)


def negative_mask(labels: jax.Array, *, ref_labels: jax.Array | None = None,
                  ref_self_index: jax.Array | None = None) -> jax.Array:
  """``bool[B, M]``: negative pairs, different labels (so ``i != j`` holds by itself).

  With ``ref_labels``, empty slots (label < 0) and ``ref_self_index`` are excluded.
  """
  if ref_labels is None:
    return ~same_label_mask(labels)
  return ~same_label_mask(labels, ref_labels) & _usable_references(ref_labels, ref_self_index)


def _usable_references(ref_labels, ref_self_index):
  """``bool[1 or B, M]``: the reference columns an anchor may be paired with."""
  usable = (ref_labels >= 0)[None, :]
  if ref_self_index is not None:
    usable = usable & (jnp.arange(ref_labels.shape[0])[None, :] != ref_self_index[:, None])
  return usable


def check_references(embeddings: jax.Array, labels: jax.Array, ref_embeddings, ref_labels,
                     ref_self_index=None):
  """Checks a reference set where it enters a loss: ``(f32[M, D], int32[M], int32[B] or None)``.

  Args:
    embeddings: the checked batch ``f32[B, D]`` (its anchors).
    labels: the checked batch labels ``int32[B]``.
    ref_embeddings: ``f32[M, D]`` or None.
    ref_labels: ``int[M]`` or None; both or neither must be given.
    ref_self_index: ``int[B]`` or None: the column of the references that holds anchor ``i``
      itself (never paired with it); only with references.

  Returns:
    ``(None, None, None)`` without references, else the references upcast like the batch and
    ``ref_self_index`` as int32 (or None).

  Raises:
    ValueError: naming the argument, for one of the pair missing, a wrong rank, a size that does
      not match, or a wrong dtype.
  """
  if ref_embeddings is None and ref_labels is None:
    if ref_self_index is not None:
      raise ValueError("ref_self_index needs ref_embeddings and ref_labels: without references "
                       "the batch is its own reference set and its diagonal is excluded already.")
    return None, None, None
  if ref_embeddings is None or ref_labels is None:
    given, missing = (("ref_labels", "ref_embeddings") if ref_embeddings is None
                      else ("ref_embeddings", "ref_labels"))
    raise ValueError(f"{given} was given without {missing}: give both ref_embeddings and "
                     "ref_labels (a reference set), or neither (the batch is its own).")
  ref_embeddings, ref_labels = check_embeddings_and_labels(
      ref_embeddings, ref_labels, name="ref_embeddings", labels_name="ref_labels")
  if ref_embeddings.shape[1] != embeddings.shape[1]:
    raise ValueError(f"ref_embeddings must have the embeddings' dimension {embeddings.shape[1]}: "
                     f"they have dimension {ref_embeddings.shape[1]} but embeddings have "
                     f"{embeddings.shape[1]}.")
  if ref_self_index is not None:
    ref_self_index = jnp.asarray(ref_self_index)
    if ref_self_index.shape != labels.shape or not jnp.issubdtype(ref_self_index.dtype,
                                                                   jnp.integer):
      raise ValueError(f"ref_self_index must be integers of shape [{labels.shape[0]}] (one column "
                       f"per anchor); got {ref_self_index.dtype}{list(ref_self_index.shape)}.")
    ref_self_index = ref_self_index.astype(jnp.int32)
  return ref_embeddings, ref_labels, ref_self_index


def reference_set(embeddings: jax.Array, labels: jax.Array, ref_embeddings=None, ref_labels=None,
                  ref_self_index=None):
  """The references of a pair loss: ``(f32[M, D], int32[M], self_pairs: bool[B, M])``.

  Anchors come from the batch ``(embeddings, labels)`` and their positives and negatives from the
  references: the batch itself when ``ref_embeddings`` and ``ref_labels`` are None (then
  ``self_pairs`` is the diagonal, which a loss leaves out: a sample is never its own positive),
  or a separate set given as both (e.g. a memory of past batches; ``self_pairs`` then marks only
  the references with a negative label, the empty slots of a memory, and the pairs
  ``(i, ref_self_index[i])`` when given: each anchor's own copy, in a memory that already holds
  the batch; every other (anchor, reference) pair counts). A loss leaves the ``self_pairs``
  entries out of both its positives and its negatives. Checks the references where they enter.
  """
  ref_embeddings, ref_labels, ref_self_index = check_references(
      embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
  if ref_labels is None:
    return embeddings, labels, jnp.eye(labels.shape[0], dtype=bool)
  # Slots with a negative label (an empty slot of a cross-batch memory) pair with nothing, nor
  # does an anchor with its own copy.
  excluded = ~_usable_references(ref_labels, ref_self_index)
  return (ref_embeddings, ref_labels,
          jnp.broadcast_to(excluded, (labels.shape[0], ref_labels.shape[0])))
