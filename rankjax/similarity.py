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
:math:`\|x_i\|^2 + \|x_j\|^2 - 2 x_i \cdot x_j`, clipped at 0 (one matmul, as in TF Addons), with the
diagonal of a self-distance matrix set to exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def check_distance(distance: str, *, allowed=DISTANCES) -> str:
  """Returns ``distance`` or raises a ``ValueError`` naming the ``distance`` argument."""
  if distance not in allowed:
    raise ValueError(f"distance={distance!r} is not one of {', '.join(map(repr, allowed))}.")
  return distance


def check_embeddings_and_labels(embeddings, labels, *, name: str = "embeddings"):
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
    raise ValueError(f"labels must have rank 1 [batch]; got shape {tuple(labels.shape)}.")
  if embeddings.shape[0] != labels.shape[0]:
    raise ValueError(
        f"{name} has {embeddings.shape[0]} rows but labels has {labels.shape[0]} entries.")
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got dtype {embeddings.dtype}.")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
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


def squared_euclidean_distances(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
  r""":math:`\|x_i - y_j\|^2` for ``x: f32[N, D]``, ``y: f32[M, D]`` -> ``f32[N, M]``.

  With ``y=None`` the matrix is between ``x`` and itself and its diagonal is exactly 0.
  """
  if y is None:
    return _self_squared_distances(x)
  sq = (jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :]
        - 2.0 * (x @ y.T))
  return jnp.maximum(sq, 0.0)


@jax.custom_vjp
def _self_squared_distances(x):
  return _self_squared_distances_fwd(x)[0]


def _self_squared_distances_fwd(x):
  norms = jnp.sum(x * x, axis=-1)
  sq = norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)
  kept = (sq > 0) & ~jnp.eye(x.shape[0], dtype=bool)
  return jnp.where(kept, sq, 0.0), (x, kept)


def _self_squared_distances_bwd(residuals, g):
  # The matrix is symmetric in x, so one matmul with the symmetrised cotangent S = G + G^T does
  # the backward pass: dL/dx_k = 2 (sum_j S_kj x_k - sum_j S_kj x_j). Autodiff would take two.
  x, kept = residuals
  g = jnp.where(kept, g, 0.0)
  s = g + g.T
  return (2.0 * (jnp.sum(s, axis=1)[:, None] * x - s @ x),)


_self_squared_distances.defvjp(_self_squared_distances_fwd, _self_squared_distances_bwd)


def cosine_similarities(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
  r""":math:`\cos(x_i, y_j)` for ``x: f32[N, D]``, ``y: f32[M, D]`` -> ``f32[N, M]``."""
  xn = l2_normalize(x)
  yn = xn if y is None else l2_normalize(y)
  return xn @ yn.T


def pairwise_distances(x: jax.Array, y: jax.Array | None = None, *,
                       distance: str = "euclidean") -> jax.Array:
  """The ``f32[N, M]`` matrix of ``distance`` between the rows of ``x`` and of ``y`` (or ``x``).

  Example:
    >>> import jax.numpy as jnp
    >>> pairwise_distances(jnp.array([[0., 0.], [3., 4.]]))
    Array([[0., 5.],
           [5., 0.]], dtype=float32)
  """
  check_distance(distance)
  if distance == "cosine":
    d = 1.0 - cosine_similarities(x, y)
    if y is None:
      d = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)
    return d
  sq = squared_euclidean_distances(x, y)
  return sq if distance == "squared_euclidean" else safe_sqrt(sq)


def same_label_mask(labels: jax.Array, other_labels: jax.Array | None = None) -> jax.Array:
  """``bool[N, M]``: True where ``labels[i] == other_labels[j]`` (``other_labels`` defaults to ``labels``)."""
  other = labels if other_labels is None else other_labels
  return labels[:, None] == other[None, :]


def positive_mask(labels: jax.Array) -> jax.Array:
  """``bool[B, B]``: positive pairs, ``i != j`` with the same label."""
  return same_label_mask(labels) & ~jnp.eye(labels.shape[0], dtype=bool)


def negative_mask(labels: jax.Array) -> jax.Array:
  """``bool[B, B]``: negative pairs, different labels (so ``i != j`` holds by itself)."""
  return ~same_label_mask(labels)


def check_precision(precision, name: str = "precision"):
  """The matmul precision ``precision`` as ``jnp.matmul`` takes it, or a ``ValueError`` naming it.

  Accepts ``None`` (the backend's default), a ``jax.lax.Precision``, its name (``"highest"``,
  ``"high"``, ``"default"``, or the aliases ``"float32"``, ``"tensorfloat32"``, ``"bfloat16"``),
  a ``jax.lax.DotAlgorithmPreset``, or a pair of those for the two operands.
  """
  if precision is None or isinstance(precision, (jax.lax.Precision, jax.lax.DotAlgorithmPreset)):
    return precision
  if isinstance(precision, str):
    try:
      return jax.lax.Precision(precision)
    except ValueError:
      pass
  elif isinstance(precision, (tuple, list)) and len(precision) == 2:
    return tuple(check_precision(p, name) for p in precision)
  raise ValueError(f"{name}={precision!r} is not a matmul precision: use jax.lax.Precision.HIGHEST "
                   f"(or 'highest'), 'high', 'default', or None for the backend's default.")


def cosine_similarities_with_precision(x: jax.Array, y: jax.Array | None = None, *,
                                       precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r""":func:`cosine_similarities` with its dot products computed at ``precision``.

  ``jax.lax.Precision.HIGHEST`` (the default) keeps float32 matmuls in float32 on every backend;
  ``None`` or ``"default"`` lets TPUs run them in bfloat16 passes and recent NVIDIA GPUs in TF32,
  faster but with errors of ~1e-3 in the cosines.
  """
  xn = l2_normalize(x)
  yn = xn if y is None else l2_normalize(y)
  return jnp.matmul(xn, yn.T, precision=check_precision(precision))


def reference_set(embeddings: jax.Array, labels: jax.Array, ref_embeddings=None, ref_labels=None):
  """The references of a pair loss: ``(f32[M, D], int32[M], self_pairs: bool[B, M])``.

  Anchors come from the batch ``(embeddings, labels)`` and their positives and negatives from the
  references: the batch itself when ``ref_embeddings`` and ``ref_labels`` are None (then
  ``self_pairs`` is the diagonal, which a loss leaves out: a sample is never its own positive),
  or a separate set given as both (e.g. a memory of past batches; ``self_pairs`` is then all
  False and every (anchor, reference) pair counts). Checks the references where they enter.
  """
  if (ref_embeddings is None) != (ref_labels is None):
    raise ValueError("Give both ref_embeddings and ref_labels (a reference set), or neither (the "
                     "batch is its own reference set).")
  if ref_embeddings is None:
    return embeddings, labels, jnp.eye(labels.shape[0], dtype=bool)
  ref_labels = jnp.asarray(ref_labels)
  if ref_labels.ndim != 1 or not (jnp.issubdtype(ref_labels.dtype, jnp.integer)
                                  or ref_labels.dtype == jnp.bool_):
    raise ValueError(f"ref_labels must be integers of rank 1 [num_references]; got shape "
                     f"{tuple(ref_labels.shape)} and dtype {ref_labels.dtype}.")
  ref_embeddings = jnp.asarray(ref_embeddings)
  if ref_embeddings.ndim == 2 and ref_embeddings.shape[0] != ref_labels.shape[0]:
    raise ValueError(f"ref_embeddings has {ref_embeddings.shape[0]} rows but ref_labels has "
                     f"{ref_labels.shape[0]} entries.")
  ref_embeddings, ref_labels = check_embeddings_and_labels(ref_embeddings, ref_labels,
                                                           name="ref_embeddings")
  if ref_embeddings.shape[1] != embeddings.shape[1]:
    raise ValueError(f"ref_embeddings have dimension {ref_embeddings.shape[1]} but embeddings "
                     f"have {embeddings.shape[1]}.")
  return (ref_embeddings, ref_labels,
          jnp.zeros((labels.shape[0], ref_labels.shape[0]), dtype=bool))
