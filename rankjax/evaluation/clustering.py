r"""Clustering quality: k-means (k-means++ and Lloyd, in JAX on device) and NMI.

:func:`nmi` clusters the embeddings with k-means, one cluster per class by default, and compares
the clusters with the classes by normalised mutual information with the arithmetic mean of the two
entropies (scikit-learn's default, and the NMI reported in the metric-learning literature since
Oh Song et al. 2016):

.. math::

  \mathrm{NMI}(Y, C) = \frac{I(Y; C)}{\tfrac12 \left(H(Y) + H(C)\right)},\qquad
  I(Y; C) = \sum_{y, c} \frac{n_{yc}}{n} \log \frac{n\, n_{yc}}{n_y\, n_c}.

:func:`kmeans` seeds with greedy k-means++ (Arthur & Vassilvitskii 2007: each next centre drawn with
probability proportional to the squared distance to the nearest centre so far; of ``2 + log k``
such draws the one that lowers the total squared distance most, as scikit-learn), then runs Lloyd
iterations until no point changes cluster, the centres move less than ``tol`` (relative to the
data's variance, as scikit-learn), or ``max_iter``. Assignment goes through the points in chunks,
so memory is ``O(chunk * k)``: Stanford Online Products (60,502 points, 11,316 classes) fits. A
cluster that loses all its points keeps its centre. Progress is logged every 10 seconds.

Example:
  >>> import numpy as np
  >>> from rankjax.evaluation import nmi
  >>> x = np.array([[0., 0.], [0., 1.], [10., 10.], [10., 11.]], np.float32)
  >>> nmi(x, np.array([0, 0, 1, 1]))
  1.0
"""

from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rankjax import similarity

# Memory for one chunk's [points, clusters] distances (the CPU reuses buffers under 32 MiB).
_CPU_CHUNK_BYTES = 8 * 2**20
_ACCELERATOR_CHUNK_BYTES = 256 * 2**20
_SEEDS_PER_CALL = 256  # k-means++ centres chosen per device call (progress between calls).
_LOG_EVERY_S = 10.0


def nmi(embeddings, labels, *, num_clusters: int | None = None, seed: int = 0,
        max_iter: int = 100) -> float:
  """Normalised mutual information between the classes and a k-means clustering.

  Args:
    embeddings: ``f[N, D]``.
    labels: ``int[N]``.
    num_clusters: k (default: the number of distinct labels).
    seed: k-means++ seed.
    max_iter: most Lloyd iterations.

  Returns:
    NMI in [0, 1] (arithmetic normalisation).

  Raises:
    ValueError: for mismatched lengths, NaN or infinite embeddings, or a bad ``num_clusters``.
  """
  labels = np.asarray(labels)
  x, _ = similarity.check_embeddings_and_labels(embeddings, labels)
  if num_clusters is None:
    num_clusters = len(np.unique(labels))
  _, assignments = kmeans(x, num_clusters, seed=seed, max_iter=max_iter)
  return normalized_mutual_info(labels, assignments)


def normalized_mutual_info(labels_true, labels_pred) -> float:
  """NMI of two labelings of the same items, arithmetic normalisation (scikit-learn's default).

  As scikit-learn: 1 when neither labeling splits the items, 0 when the mutual information is 0.
  Two labelings that make the same partition give exactly 1.

  Example:
    >>> normalized_mutual_info([0, 0, 1, 1], [5, 5, 3, 3])
    1.0
  """
  labels_true = np.asarray(labels_true).ravel()
  labels_pred = np.asarray(labels_pred).ravel()
  if labels_true.shape != labels_pred.shape:
    raise ValueError(f"labels_true has {labels_true.size} items but labels_pred has "
                     f"{labels_pred.size}.")
  n = labels_true.size
  _, y = np.unique(labels_true, return_inverse=True)
  _, c = np.unique(labels_pred, return_inverse=True)
  num_y, num_c = y.max(initial=-1) + 1, c.max(initial=-1) + 1
  if num_y == num_c and num_y <= 1:
    return 1.0
  cells, n_yc = np.unique(y.astype(np.int64) * num_c + c, return_counts=True)
  if len(cells) == num_y == num_c:  # Each class is exactly one cluster: the same partition.
    return 1.0
  n_y = np.bincount(y, minlength=num_y).astype(np.float64)
  n_c = np.bincount(c, minlength=num_c).astype(np.float64)
  n_yc = n_yc.astype(np.float64)
  mi = np.sum(n_yc / n * (np.log(n_yc) + np.log(n) - np.log(n_y[cells // num_c])
                          - np.log(n_c[cells % num_c])))
  mi = max(float(mi), 0.0)
  if mi == 0.0:
    return 0.0
  h_y = -np.sum(n_y / n * np.log(n_y / n))
  h_c = -np.sum(n_c / n * np.log(n_c / n))
  return float(mi / max((h_y + h_c) / 2, np.finfo(np.float64).eps))


def kmeans(embeddings, num_clusters: int, *, seed: int = 0, max_iter: int = 100,
           tol: float = 1e-4, chunk_size: int | None = None) -> tuple[jax.Array, np.ndarray]:
  """Greedy k-means++ seeding and Lloyd iterations, on the default device.

  Example:
    >>> centres, clusters = kmeans(np.array([[0.], [0.1], [5.], [5.2]], np.float32), 2)
    >>> normalized_mutual_info(clusters, [0, 0, 1, 1])
    1.0

  Args:
    embeddings: ``f[N, D]``.
    num_clusters: k, in ``[1, N]``.
    seed: seed of the k-means++ draws.
    max_iter: most Lloyd iterations.
    tol: stop when the squared centre movement, summed over centres, is at most ``tol`` times the
      mean per-dimension variance of the data (scikit-learn's rule).
    chunk_size: points assigned at once (default: about 8 MiB of distances on the CPU, 256 MiB
      on an accelerator).

  Returns:
    ``(centres f32[k, D], assignments int[N])`` (the cluster of each point, on the host).
  """
  x = jnp.asarray(embeddings)
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"embeddings must be a floating [N, D] array; got {x.dtype} "
                     f"{tuple(x.shape)}.")
  x = x.astype(jnp.float32)
  n = x.shape[0]
  if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) \
      or not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters must be an integer in [1, {n}] (the number of embeddings); "
                     f"got {num_clusters!r}.")
  bad = np.asarray(~jnp.isfinite(x).all(axis=1))
  if bad.any():
    raise ValueError(f"embeddings contains NaN or infinite values in {int(bad.sum())} of {n} "
                     f"rows (first: {np.flatnonzero(bad)[:5].tolist()}); NMI is undefined.")
  k = int(num_clusters)
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
      chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
  if chunk_size is None:
    budget = (_CPU_CHUNK_BYTES if jax.devices()[0].platform == "cpu"
              else _ACCELERATOR_CHUNK_BYTES)
    chunk_size = max(8, budget // (4 * k) // 8 * 8)
  chunk = min(int(chunk_size), n)
  num_chunks = -(-n // chunk)
  padded = jnp.pad(x, ((0, num_chunks * chunk - n), (0, 0)))

  start = last_log = time.perf_counter()

  def log(what, done, total):
    nonlocal last_log
    now = time.perf_counter()
    if now - last_log >= _LOG_EVERY_S:
      last_log = now
      logging.info("kmeans (%d points, k=%d): %s %d/%d, %.0f s.", n, k, what, done, total,
                   now - start)

  # Greedy k-means++ (as scikit-learn): centre 0 uniformly; then draw 2 + log(k) candidates with
  # probability ~ squared distance to the nearest centre so far, and keep the best of them.
  key = jax.random.key(seed)
  key, first = jax.random.split(key)
  centres = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(
      x[jax.random.randint(first, (), 0, n)])
  nearest = _squared_distances_to(x, centres[0])
  for begin in range(1, k, _SEEDS_PER_CALL):
    end = min(begin + _SEEDS_PER_CALL, k)
    centres, nearest, key = _seed_centres(x, centres, nearest, key, begin, end - begin,
                                          trials=2 + int(np.log(k)))
    if time.perf_counter() - last_log >= _LOG_EVERY_S:
      nearest.block_until_ready()  # Report finished work, not dispatched work.
    log("k-means++ centres", end, k)

  variance = float(jnp.mean(jnp.var(x, axis=0)))
  assignments, changed = None, True
  for iteration in range(max_iter):
    new_assignments, centres, shift = _lloyd_step(padded, centres, n=n, chunk=chunk)
    changed = assignments is None or bool(jnp.any(new_assignments != assignments))
    assignments = new_assignments
    log("Lloyd iteration", iteration + 1, max_iter)
    if not changed or float(shift) <= tol * variance:
      break
  if changed:  # Stopped on tol or max_iter: assign the points to the final centres.
    assignments, _, _ = _lloyd_step(padded, centres, n=n, chunk=chunk)
  return centres, np.asarray(assignments)


def _squared_distances_to(x: jax.Array, centre: jax.Array) -> jax.Array:
  # |x|^2 - 2 x.c + |c|^2: one matrix-vector product rather than an [N, D] difference.
  cross = jnp.dot(x, centre, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(x * x, axis=1) - 2.0 * cross + jnp.dot(centre, centre), 0.0)


@functools.partial(jax.jit, static_argnames=("count", "trials"))
def _seed_centres(x, centres, nearest, key, begin, count, trials):
  """Draws centres ``begin .. begin + count - 1`` by greedy k-means++ sampling."""
  squared_norms = jnp.sum(x * x, axis=1)

  def body(j, state):
    centres, nearest, key = state
    key, draw = jax.random.split(key)
    # Inverse-CDF draws (one cumulative sum, not N Gumbel draws per candidate). When every point
    # sits on a chosen centre (duplicates) the sum is 0 and any point will do.
    cumulative = jnp.cumsum(nearest)
    targets = jax.random.uniform(draw, (trials,)) * cumulative[-1]
    candidates = jnp.minimum(jnp.searchsorted(cumulative, targets, side="right"),
                             x.shape[0] - 1)
    cross = jax.lax.dot_general(x[candidates], x, (((1,), (1,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)  # [trials, N]
    distances = jnp.maximum(squared_norms[candidates][:, None] - 2.0 * cross
                            + squared_norms[None, :], 0.0)
    after = jnp.minimum(nearest[None, :], distances)
    best = jnp.argmin(jnp.sum(after, axis=1))  # The candidate that lowers the potential most.
    return centres.at[begin + j].set(x[candidates[best]]), after[best], key

  return jax.lax.fori_loop(0, count, body, (centres, nearest, key))


@functools.partial(jax.jit, static_argnames=("n", "chunk"))
def _lloyd_step(padded, centres, *, n, chunk):
  """Assigns every point to its nearest centre, then moves each centre to its points' mean."""
  half_norms = 0.5 * jnp.sum(centres * centres, axis=1)

  def assign(points):
    scores = jax.lax.dot_general(points, centres, (((1,), (1,)), ((), ())),
                                 precision=jax.lax.Precision.HIGHEST) - half_norms
    return jnp.argmax(scores, axis=1).astype(jnp.int32)

  assignments = jax.lax.map(assign, padded.reshape(-1, chunk, padded.shape[1])).reshape(-1)[:n]
  k = centres.shape[0]
  sums = jax.ops.segment_sum(padded[:n], assignments, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones(n, jnp.float32), assignments, num_segments=k)
  moved = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)
  return assignments, moved, jnp.sum((moved - centres) ** 2)
