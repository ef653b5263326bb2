r"""Exact retrieval metrics: Recall@K, MAP@R and R-Precision, in query chunks on device.

Every query is ranked against a gallery: the other queries (the usual protocol for CUB-200-2011,
Cars196, Stanford Online Products and Omniglot's evaluation characters) or a separate reference set
(In-Shop style query / gallery splits). Without a reference set a query's own row is excluded *by
index*, so an exact duplicate of the query elsewhere in the set still counts as a neighbour.

Ranking. ``distance="cosine"`` ranks by cosine similarity, ``"euclidean"`` by L2 distance (nearest
first) and ``"dot"`` by inner product. Items with equal scores are ordered by gallery index, lower
first: the order of a stable sort, of ``jax.lax.top_k`` and of ``numpy.argsort(kind="stable")``, so
the results are deterministic and a plain numpy implementation reproduces them exactly.

For a query :math:`q` with gallery ranking :math:`g_1, g_2, \dots` let :math:`\mathrm{rel}(i) = 1`
when :math:`g_i` has the query's label, and :math:`R_q` the number of gallery items with that label
(the query itself excluded). Then

.. math::

  \mathrm{Recall@}K = \frac{1}{|Q|} \sum_q \big[\exists\, i \le K:\ \mathrm{rel}(i) = 1\big],

  \mathrm{R\text{-}Precision} = \frac{1}{|Q_+|} \sum_{q \in Q_+} \frac{1}{R_q}
      \sum_{i \le R_q} \mathrm{rel}(i),
  \qquad
  \mathrm{MAP@R} = \frac{1}{|Q_+|} \sum_{q \in Q_+} \frac{1}{R_q}
      \sum_{i \le R_q} P(i)\, \mathrm{rel}(i),\quad
  P(i) = \frac{1}{i} \sum_{j \le i} \mathrm{rel}(j),

where :math:`Q_+` are the queries with :math:`R_q > 0` (Recall@K counts a query without any
same-label item as a miss; MAP@R and R-Precision leave it out). Recall@K is the measure of Jégou et
al. 2011 used by Oh Song et al. 2016 ("Deep Metric Learning via Lifted Structured Feature
Embedding"); MAP@R and R-Precision are those of Musgrave et al. 2020 ("A Metric Learning Reality
Check"). The means are correctly rounded (``math.fsum``), so the values do not depend on the chunk
size or the number of devices.

How it is computed (exact; never an N x N matrix). The queries go through in chunks of
``chunk_size``, taken in class order and split across the devices; each chunk is scored against the
gallery tile by tile with a float32 matmul, so the scores need ``O(chunk_size * tile)`` memory
(``tile <= N`` gallery rows, sized by memory):

* pass 1 scores the chunk against its queries' same-label items only (in class order, about
  ``chunk_size`` rows) and finds each query's best same-label item;
* pass 2 goes over the gallery once. It counts the items ranked ahead of that best item: its
  0-based rank, and a query is a hit at K exactly when the rank is below K, which is what a
  top-``max(ks)`` list would say, without sorting 1,000 neighbours per query. It also merges a
  running exact top-``max_q R_q`` list (a two-stage top-k over blocks of columns, with the tie order
  of ``jax.lax.top_k``), which gives :math:`\mathrm{rel}(i)` for :math:`i \le R_q`.

A score depends only on the two vectors and the matmul's shapes, which both passes share, so they
agree; pass 2 re-derives the best same-label item from its own scores anyway and, should the two
ever differ, counts that chunk again.

Progress (chunks done, elapsed time, ETA) is logged with absl logging every 10 seconds.

Example:
  >>> import numpy as np
  >>> from rankjax.evaluation import retrieval_metrics
  >>> x = np.array([[1., 0.], [.9, .1], [0., 1.], [.1, .9]], np.float32)
  >>> retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1, 2))
  {'recall@1': 1.0, 'recall@2': 1.0, 'map@r': 1.0, 'r_precision': 1.0}
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from rankjax import similarity

DISTANCES = ("cosine", "euclidean", "dot")

# Queries per step (CPU: all devices together, as CPU "devices" share the cores; accelerators: per
# device), and the memory of one [queries, gallery tile] block of scores per device. On the CPU the
# tiles stay small because buffers over 32 MiB come from fresh pages on every call.
_CPU_CHUNK = 1024
_ACCELERATOR_CHUNK = 4096
_CPU_TILE_BYTES = 8 * 2**20
_ACCELERATOR_TILE_BYTES = 256 * 2**20
# Columns per block in the two-stage top-k.
_BLOCK = 32
_LOG_EVERY_S = 10.0
_QUERY_AXIS = "queries"


@dataclasses.dataclass(frozen=True)
class QueryResults:
  """What each query contributes, before averaging (all ``[num_queries]`` host arrays).

  Attributes:
    first_hit: 0-based rank of the query's best same-label gallery item (the number of gallery
      items ranked ahead of it); ``gallery_size`` when it has none.
    num_relevant: ``R``, the number of same-label gallery items (the query itself excluded).
    hits_at_r: the number of same-label items among the ``R`` nearest.
    average_precision: :math:`\\frac{1}{R}\\sum_{i \\le R} P(i)\\,\\mathrm{rel}(i)`, summed over
      ``i`` in order in float64; 0 where ``R = 0``.
    gallery_size: the number of items each query is ranked against.
  """
  first_hit: np.ndarray
  num_relevant: np.ndarray
  hits_at_r: np.ndarray
  average_precision: np.ndarray
  gallery_size: int

  def metrics(self, ks: Sequence[int]) -> dict[str, float]:
    """``{"recall@K": ..., "map@r": ..., "r_precision": ...}`` from the per-query values."""
    n = len(self.first_hit)
    out = {f"recall@{k}": int(np.count_nonzero(self.first_hit < k)) / n for k in ks}
    has_r = self.num_relevant > 0
    n_r = int(np.count_nonzero(has_r))
    if n_r == 0:
      logging.warning("No query has a same-label item in the gallery: MAP@R and R-Precision "
                      "are reported as 0.")
      out["map@r"] = out["r_precision"] = 0.0
      return out
    out["map@r"] = math.fsum(self.average_precision[has_r]) / n_r
    out["r_precision"] = math.fsum(self.hits_at_r[has_r] / self.num_relevant[has_r]) / n_r
    return out


def retrieval_metrics(embeddings, labels, *, ks: Sequence[int] = (1, 2, 4, 8),
                      distance: str = "cosine", reference_embeddings=None,
                      reference_labels=None, chunk_size: int | None = None,
                      devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """Recall@K for each K in ``ks``, MAP@R and R-Precision (exact; see the module docstring).

  Args:
    embeddings: ``f[N, D]`` query embeddings (numpy or JAX).
    labels: ``int[N]`` class of each query.
    ks: the K of Recall@K; each at most the gallery size.
    distance: ``"cosine"``, ``"euclidean"`` or ``"dot"``.
    reference_embeddings: optional ``f[M, D]`` gallery; by default the queries themselves, each
      query's own row excluded.
    reference_labels: ``int[M]`` class of each reference item (with ``reference_embeddings``).
    chunk_size: queries scored at once over all devices (rounded up to a multiple of the device
      count); by default as many as keep one chunk's scores near 256 MiB per device.
    devices: the devices to split each chunk across (default: all local devices).

  Returns:
    ``{"recall@K": float for K in sorted(ks), "map@r": float, "r_precision": float}``.

  Raises:
    ValueError: for mismatched lengths, NaN or infinite embeddings, a K larger than the gallery, a
      reference set of another width, or an unknown distance.
  """
  ks = _check_ks(ks)
  results = query_results(embeddings, labels, distance=distance,
                          reference_embeddings=reference_embeddings,
                          reference_labels=reference_labels, chunk_size=chunk_size,
                          devices=devices, max_k=ks[-1])
  return results.metrics(ks)


def query_results(embeddings, labels, *, distance: str = "cosine", reference_embeddings=None,
                  reference_labels=None, chunk_size: int | None = None,
                  devices: Sequence[jax.Device] | None = None,
                  max_k: int = 1) -> QueryResults:
  """The per-query values behind :func:`retrieval_metrics` (same arguments; ``max_k`` is checked
  against the gallery size)."""
  similarity.check_distance(distance, allowed=DISTANCES)
  queries, query_labels = _check_set(embeddings, labels, "embeddings", "labels")
  exclude_self = reference_embeddings is None
  if exclude_self != (reference_labels is None):
    raise ValueError("reference_embeddings and reference_labels must be given together; got only "
                     + ("reference_labels." if exclude_self else "reference_embeddings."))
  if exclude_self:
    gallery, gallery_labels = queries, query_labels
  else:
    gallery, gallery_labels = _check_set(reference_embeddings, reference_labels,
                                         "reference_embeddings", "reference_labels")
    if gallery.shape[1] != queries.shape[1]:
      raise ValueError(f"reference_embeddings has width {gallery.shape[1]} but embeddings has "
                       f"width {queries.shape[1]}.")
  num_queries, num_gallery = queries.shape[0], gallery.shape[0]
  gallery_size = num_gallery - 1 if exclude_self else num_gallery
  if max_k > gallery_size:
    raise ValueError(
        f"ks asks for the {max_k} nearest neighbours but each query has only {gallery_size} "
        + ("(the other embeddings)." if exclude_self else "(the reference embeddings)."))

  # Classes as dense ids: the gallery's in [0, C); a query label absent from the gallery gets C.
  classes, gallery_ids, class_sizes = np.unique(gallery_labels, return_inverse=True,
                                                return_counts=True)
  num_classes = len(classes)
  where = np.minimum(np.searchsorted(classes, query_labels), num_classes - 1)
  query_ids = np.where(classes[where] == query_labels, where, num_classes).astype(np.int32)
  num_relevant = np.append(class_sizes, 0)[query_ids] - int(exclude_self)
  top_r = int(num_relevant.max())
  max_class = int(class_sizes.max())

  devices = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devices), (_QUERY_AXIS,))
  chunk = _chunk_size(chunk_size, num_queries, devices)
  num_chunks = -(-num_queries // chunk)
  top_k = top_r + int(exclude_self) if top_r else 0
  tile = _tile_size(chunk // len(devices), num_gallery, top_k, devices)
  num_tiles = -(-(num_gallery + 1) // tile)  # At least one padding row (scores -inf).
  padded_gallery = num_tiles * tile

  # Gallery items grouped by class (`members[starts[c]:starts[c + 1]]`), and the queries taken in
  # class order, so that the same-label items of a chunk's queries are one run of `members`.
  members = np.argsort(gallery_ids, kind="stable").astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(class_sizes)]).astype(np.int32)  # starts[C] = M.
  order = np.argsort(query_ids, kind="stable")
  chunk_ids = np.full(num_chunks * chunk, num_classes, np.int32)
  chunk_ids[:num_queries] = query_ids[order]
  chunk_ids = chunk_ids.reshape(num_chunks, chunk)
  known = chunk_ids < num_classes
  lowest = np.where(known, chunk_ids, num_classes).min(axis=1)
  highest = np.where(known, chunk_ids, -1).max(axis=1)
  union_start = starts[lowest]
  union_end = np.where(highest >= 0, starts[np.maximum(highest, 0) + 1], union_start)
  union = _round_up(max(int((union_end - union_start).max()), 1), tile)
  members = np.concatenate([members, np.full(union + max_class, padded_gallery - 1, np.int32)])
  gallery_ids_padded = np.full(padded_gallery, -1, np.int32)
  gallery_ids_padded[:num_gallery] = gallery_ids
  self_index = np.full(num_chunks * chunk, -1, np.int32)
  if exclude_self:
    self_index[:num_queries] = order

  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(None, _QUERY_AXIS))
  gallery_tiles = jax.device_put(
      _gallery_matrix(gallery, distance=distance, blocks=num_tiles, rows=tile), replicated)
  query_chunks = jax.device_put(
      _query_matrix(queries, order, distance=distance, blocks=num_chunks, rows=chunk), split)
  tables = jax.device_put((members, np.append(class_sizes, 0).astype(np.int32), starts,
                           gallery_ids_padded, union_start.astype(np.int32)), replicated)
  per_query = jax.device_put((chunk_ids, self_index.reshape(num_chunks, chunk)), split)

  logging.info("retrieval_metrics: %d queries x %d gallery items, dim %d, %s; %d chunks of %d "
               "on %d device(s), gallery tiles of %d; top-%d for R.", num_queries, num_gallery,
               queries.shape[1], distance, num_chunks, chunk, len(devices), tile, top_r)
  run_chunk = functools.partial(
      _score_chunk, queries=query_chunks, per_query=per_query, gallery=gallery_tiles,
      tables=tables, top_r=top_r, max_class=max_class, union=union, exclude_self=exclude_self,
      gallery_size=gallery_size)

  first_hit = np.empty(num_chunks * chunk, np.int64)
  hits_at_r = np.zeros(num_chunks * chunk, np.int64)
  average_precision = np.zeros(num_chunks * chunk, np.float64)
  r_sorted = np.zeros(num_chunks * chunk, np.int64)
  r_sorted[:num_queries] = num_relevant[order]
  start = last_log = time.perf_counter()
  pending = None
  for i in range(num_chunks + 1):
    # Dispatch chunk i before reading chunk i - 1 back, so the device never waits for the host.
    current = (i, run_chunk(np.int32(i))) if i < num_chunks else None
    if pending is not None:
      j, (ranks, relevant) = pending
      rows = slice(j * chunk, (j + 1) * chunk)
      first_hit[rows] = np.asarray(ranks)
      hits_at_r[rows], average_precision[rows] = _precision_at_r(np.asarray(relevant),
                                                                 r_sorted[rows])
      now = time.perf_counter()
      if now - last_log >= _LOG_EVERY_S and j + 1 < num_chunks:
        last_log = now
        done = (j + 1) / num_chunks
        logging.info("retrieval_metrics: %d/%d chunks (%.0f%%), %.0f s, ETA %.0f s.", j + 1,
                     num_chunks, 100 * done, now - start, (now - start) * (1 / done - 1))
    pending = current
  elapsed = time.perf_counter() - start
  if elapsed >= _LOG_EVERY_S:
    logging.info("retrieval_metrics: %d queries in %.1f s.", num_queries, elapsed)

  unsort = np.empty(num_queries, np.int64)
  unsort[order] = np.arange(num_queries)
  return QueryResults(first_hit=first_hit[unsort], num_relevant=num_relevant,
                      hits_at_r=hits_at_r[unsort], average_precision=average_precision[unsort],
                      gallery_size=gallery_size)


def top_k_candidates(scores: jax.Array, k: int, *,
                     block: int = _BLOCK) -> tuple[jax.Array, jax.Array]:
  """A few columns of each row, in column order, that hold its top ``k`` (ties: lower index).

  When ``k * block`` is small next to the row length, these are the ``k`` blocks of ``block``
  columns with the largest maxima (ties: lower block first): a block outside them is beaten by
  ``k`` block maxima, each a distinct item ranked ahead of everything in that block. Kept in
  column order, a ``top_k`` over them breaks ties by column exactly as one over the whole row.
  Otherwise (or when the row length is not a multiple of ``block``) they are the whole row.

  Returns:
    ``(values f32[C, m], indices int32[C, m])`` with ``m = k * block`` or ``N``.
  """
  rows, n = scores.shape
  if n % block or 4 * k * block > n:
    return scores, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), scores.shape)
  blocks = scores.reshape(rows, n // block, block)
  _, chosen = jax.lax.top_k(jnp.max(blocks, axis=2), k)
  chosen = jnp.sort(chosen, axis=1)
  values = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(rows, k * block)
  indices = (chosen[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)).reshape(
      rows, k * block)
  return values, indices


def _scores(q: jax.Array, rows: jax.Array) -> jax.Array:
  """``f32[c, r]``: the score of every query against every row (see :func:`_gallery_matrix`)."""
  return jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


def _union_scores(q: jax.Array, rows: jax.Array) -> jax.Array:
  """Pass 1's scores (its own name so that a test can make them disagree with pass 2's)."""
  return _scores(q, rows)


_NONE = np.iinfo(np.int32).max  # "No such item" as an index: after every real one.


def _best(values, indices, valid):
  """Per row, the best valid ``(value, index)``: largest value, then lowest index."""
  values = jnp.where(valid, values, -jnp.inf)
  best = jnp.max(values, axis=1)
  first = jnp.min(jnp.where(valid & (values == best[:, None]), indices, _NONE), axis=1)
  return best, first


def _better(a, b):
  """The better of two ``(value, index)`` per row, in ranking order."""
  take_b = (b[0] > a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))
  return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])


def _count_ahead(scores, columns, best, first, self_index):
  """Per row: gallery items ranked ahead of the item ``(best, first)``, the query itself aside."""
  ahead = ((scores > best[:, None])
           | ((scores == best[:, None]) & (columns < first[:, None])))
  return jnp.sum(ahead & (columns != self_index[:, None]), axis=1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_r", "max_class", "union", "exclude_self",
                                             "gallery_size"))
def _score_chunk(i, *, queries, per_query, gallery, tables, top_r, max_class, union,
                 exclude_self, gallery_size):
  """Rank of the best same-label item, and rel(i) for i <= top_r, for query chunk ``i``.

  Pass 1 scores the chunk against its queries' same-label items only (one run of ``members``)
  to find each query's best one. Pass 2 goes over the gallery in tiles counting the items ranked
  ahead of it and merging a running top-k. A score depends only on the two vectors (the matmul
  does the same arithmetic at every position), so both passes see the same values; pass 2 checks
  this and, should any best item differ, counts again with pass 2's own.
  """
  members, class_sizes, starts, gallery_ids, union_start = tables
  num_tiles, tile, width = gallery.shape
  q = jax.lax.dynamic_index_in_dim(queries, i, keepdims=False)
  qid, self_index = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in per_query)
  lo = union_start[i]

  slot = jnp.arange(max_class, dtype=jnp.int32)
  in_members = starts[qid][:, None] + slot
  positives = members[in_members]
  valid = (slot < class_sizes[qid][:, None]) & (positives != self_index[:, None])

  # Pass 1: the best same-label item of each query, from tiles of the same shape as pass 2's (the
  # matmul's arithmetic can depend on the shapes, not on the positions within them).
  union_rows = jax.lax.dynamic_slice(members, (lo,), (union,)).reshape(union // tile, tile)

  def union_step(best, u):
    scores = _union_scores(q, gallery.reshape(-1, width)[union_rows[u]])
    local = in_members - lo - u * tile
    inside = valid & (local >= 0) & (local < tile)
    return _better(best, _best(jnp.take_along_axis(scores, jnp.clip(local, 0, tile - 1), axis=1),
                               positives, inside)), None

  rows = q.shape[0]
  no_item = (jnp.full(rows, -jnp.inf), jnp.full(rows, _NONE, jnp.int32))
  best, _ = jax.lax.scan(union_step, no_item, jnp.arange(union // tile))

  def tile_scores(t):
    return _scores(q, jax.lax.dynamic_index_in_dim(gallery, t, keepdims=False)), (
        t * tile + jnp.arange(tile, dtype=jnp.int32))

  # Pass 2: count the items ahead of it, check it, and keep the nearest top_k.
  top_k = top_r + int(exclude_self) if top_r else 0

  def step(carry, t):
    count, seen, nearest = carry
    scores, columns = tile_scores(t)
    count += _count_ahead(scores, columns, *best, self_index)
    local = positives - t * tile
    inside = valid & (local >= 0) & (local < tile)
    seen = _better(seen, _best(jnp.take_along_axis(scores, jnp.clip(local, 0, tile - 1), axis=1),
                               positives, inside))
    if top_k:  # The running list holds earlier columns, so it goes first: ties stay in order.
      values, index = top_k_candidates(scores, top_k)
      values = jnp.concatenate([nearest[0], values], axis=1)
      index = jnp.concatenate([nearest[1], index + t * tile], axis=1)
      values, where = jax.lax.top_k(values, top_k)
      nearest = (values, jnp.take_along_axis(index, where, axis=1))
    return (count, seen, nearest), None

  init = (jnp.zeros(rows, jnp.int32), no_item,
          (jnp.full((rows, top_k), -jnp.inf), jnp.full((rows, top_k), _NONE, jnp.int32)))
  (count, seen, nearest), _ = jax.lax.scan(step, init, jnp.arange(num_tiles))

  def recount():
    def count_step(total, t):
      scores, columns = tile_scores(t)
      return total + _count_ahead(scores, columns, *seen, self_index), None
    return jax.lax.scan(count_step, jnp.zeros(rows, jnp.int32), jnp.arange(num_tiles))[0]

  agree = (seen[0] == best[0]) & (seen[1] == best[1])
  count = jax.lax.cond(jnp.all(agree), lambda: count, recount)
  first_hit = jnp.where(seen[0] > -jnp.inf, count, gallery_size)

  if not top_k:
    return first_hit, jnp.zeros((rows, 0), bool)
  nearest = nearest[1]
  if exclude_self:  # Drop the query itself from its list, keeping the order of the rest.
    nearest = jnp.take_along_axis(
        nearest, jnp.argsort(nearest == self_index[:, None], axis=1, stable=True),
        axis=1)[:, :top_r]
  return first_hit, gallery_ids[nearest] == qid[:, None]


def _precision_at_r(relevant: np.ndarray, num_relevant: np.ndarray):
  """Per query: same-label items among the R nearest, and average precision at R (float64)."""
  top = relevant.shape[1]
  within = relevant & (np.arange(top) < num_relevant[:, None])
  hits = np.cumsum(within, axis=1)
  # Summed left to right (cumsum is sequential), so the value is that of the formula's own loop.
  terms = np.where(within, hits / np.arange(1, top + 1), 0.0)
  total = np.cumsum(terms, axis=1)[:, -1] if top else np.zeros(len(relevant))
  ap = np.divide(total, num_relevant, out=np.zeros(len(relevant)), where=num_relevant > 0)
  return (hits[:, -1] if top else np.zeros(len(relevant), np.int64)), ap


@functools.partial(jax.jit, static_argnames=("distance", "blocks", "rows"))
def _gallery_matrix(x: jax.Array, *, distance: str, blocks: int, rows: int) -> jax.Array:
  """``[blocks, rows, D + 1]``: gallery rows and a column that turns a dot product into the score.

  A query row ``[q, 1]`` times it gives ``q . g`` (cosine on normalised rows, dot) or
  ``q . g - |g|^2 / 2`` (euclidean: the same order as ``-|q - g|``); padding rows score -inf.
  """
  x = jnp.asarray(x, jnp.float32)
  if distance == "cosine":
    x = similarity.l2_normalize(x)
  extra = (-0.5 * jnp.sum(x * x, axis=1) if distance == "euclidean"
           else jnp.zeros(x.shape[0], jnp.float32))
  x = jnp.concatenate([x, extra[:, None]], axis=1)
  pad = jnp.zeros((blocks * rows - x.shape[0], x.shape[1]), jnp.float32).at[:, -1].set(-jnp.inf)
  return jnp.concatenate([x, pad], axis=0).reshape(blocks, rows, -1)


@functools.partial(jax.jit, static_argnames=("distance", "blocks", "rows"))
def _query_matrix(x: jax.Array, order: jax.Array, *, distance: str, blocks: int,
                  rows: int) -> jax.Array:
  """``[blocks, rows, D + 1]``: ``x[order]`` with a trailing 1 (see :func:`_gallery_matrix`),
  zero-padded."""
  x = jnp.asarray(x, jnp.float32)[order]
  if distance == "cosine":
    x = similarity.l2_normalize(x)
  x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)
  return jnp.pad(x, ((0, blocks * rows - x.shape[0]), (0, 0))).reshape(blocks, rows, -1)


def _check_set(embeddings, labels, name: str, labels_name: str):
  """``(f32[N, D] on device, int labels on host)``, or a ValueError naming the argument."""
  if embeddings is None or labels is None:
    raise ValueError(f"{name} and {labels_name} must both be given.")
  labels_host = np.asarray(labels)
  if labels_host.ndim != 1:
    raise ValueError(f"{labels_name} must have rank 1; got shape {labels_host.shape}.")
  if not (np.issubdtype(labels_host.dtype, np.integer) or labels_host.dtype == np.bool_):
    raise ValueError(f"{labels_name} must be integers; got dtype {labels_host.dtype}.")
  if np.ndim(embeddings) == 2 and np.shape(embeddings)[0] != len(labels_host):
    raise ValueError(f"{name} has {np.shape(embeddings)[0]} rows but {labels_name} has "
                     f"{len(labels_host)} entries.")
  embeddings, _ = similarity.check_embeddings_and_labels(embeddings, labels_host, name=name)
  if embeddings.shape[0] == 0:
    raise ValueError(f"{name} is empty.")
  if embeddings.shape[1] == 0:
    raise ValueError(f"{name} has width 0.")
  bad = np.asarray(jnp.stack([jnp.isnan(embeddings).any(axis=1),
                              jnp.isinf(embeddings).any(axis=1)]))
  for what, rows in (("NaN", bad[0]), ("infinite values", bad[1])):
    if rows.any():
      first = np.flatnonzero(rows)[:5].tolist()
      raise ValueError(f"{name} contains {what} in {int(rows.sum())} of {len(rows)} rows (first: "
                       f"{first}); retrieval metrics are undefined for them. Did training "
                       f"diverge?")
  return embeddings.astype(jnp.float32), labels_host.astype(np.int64)


def _check_ks(ks) -> tuple[int, ...]:
  try:
    ks = tuple(ks)
  except TypeError:
    ks = (ks,)
  if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                   for k in ks):
    raise ValueError(f"ks must be a non-empty sequence of positive integers; got {ks!r}.")
  return tuple(sorted({int(k) for k in ks}))


def _chunk_size(chunk_size, num_queries: int, devices) -> int:
  """Queries per step over all devices: a multiple of the device count, at most the queries."""
  num_devices = len(devices)
  if chunk_size is None:
    chunk_size = (_CPU_CHUNK if devices[0].platform == "cpu"
                  else _ACCELERATOR_CHUNK * num_devices)
  elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
  return _round_up(min(int(chunk_size), num_queries), num_devices)


def _tile_size(per_device: int, num_gallery: int, top_k: int, devices) -> int:
  """Gallery rows per tile: one tile's scores fill about the tile budget of a device."""
  budget = _CPU_TILE_BYTES if devices[0].platform == "cpu" else _ACCELERATOR_TILE_BYTES
  tile = budget // (4 * per_device) // _BLOCK * _BLOCK
  tile = max(tile, _round_up(top_k, _BLOCK), 8 * _BLOCK)
  return min(tile, _round_up(num_gallery + 1, _BLOCK))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
