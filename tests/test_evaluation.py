"""Tests of rankjax.evaluation.retrieval against an independent numpy implementation.

The reference ranks every query by a full stable argsort of float64 distances and computes each
metric from its definition, query by query. The data are random clusters on an integer lattice
whose points all have squared norm 16 or 64: every score is then exact in float32 *and* float64
(cosine normalises by 1/4 or 1/8), so exact ties happen often (duplicates within and across
classes) and both sides must break them the same way, by gallery index. That makes exact equality
of every per-query count, and of every metric, a fair requirement.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax.evaluation import retrieval
from rankjax.evaluation import retrieval_metrics


def reference_results(queries, query_labels, gallery=None, gallery_labels=None, *,
                      distance="cosine"):
  """Per query: (first hit rank, R, hits in the top R, AP@R), from a full sort."""
  exclude_self = gallery is None
  if exclude_self:
    gallery, gallery_labels = queries, query_labels
  q = np.asarray(queries, np.float64)
  g = np.asarray(gallery, np.float64)
  if distance == "cosine":
    d = 1.0 - (q @ g.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(g, axis=1))
  elif distance == "euclidean":
    d = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
  else:
    d = -(q @ g.T)
  first, num_relevant, hits_at_r, ap = [], [], [], []
  for i in range(len(q)):
    order = np.argsort(d[i], kind="stable")
    if exclude_self:
      order = order[order != i]
    rel = gallery_labels[order] == query_labels[i]
    r = int(rel.sum())
    first.append(int(np.argmax(rel)) if r else len(order))
    hits, total = 0, 0.0
    for j in range(r):
      if rel[j]:
        hits += 1
        total += hits / (j + 1)
    num_relevant.append(r)
    hits_at_r.append(int(rel[:r].sum()))
    ap.append(total / r if r else 0.0)
  return tuple(np.array(a) for a in (first, num_relevant, hits_at_r, ap))


def reference_metrics(results, ks):
  first, num_relevant, hits_at_r, ap = results
  out = {f"recall@{k}": int(np.sum(first < k)) / len(first) for k in ks}
  has_r = num_relevant > 0
  out["map@r"] = math.fsum(ap[has_r]) / has_r.sum()
  out["r_precision"] = math.fsum(hits_at_r[has_r] / num_relevant[has_r]) / has_r.sum()
  return out


def lattice_clusters(seed, sizes, dim=12):
  """Clusters of integer vectors of squared norm 16 or 64 (scaled by 2), shuffled, some duplicated
  across classes; labels are sparse, non-contiguous integers."""
  rng = np.random.default_rng(seed)

  def sphere_point():
    while True:
      v = rng.integers(-2, 3, dim)
      if (v * v).sum() == 16:
        return v

  rows, labels = [], []
  for c, size in enumerate(sizes):
    centre = sphere_point()
    for _ in range(size):
      v = centre.copy()
      for _ in range(rng.integers(0, 5)):  # Swaps and sign flips keep the norm.
        if rng.random() < 0.5:
          i, j = rng.choice(dim, 2, replace=False)
          v[[i, j]] = v[[j, i]]
        else:
          v[rng.integers(dim)] *= -1
      rows.append(v * rng.choice([1, 2]))
      labels.append(7 * c + 3)
  x, y = np.array(rows, np.float32), np.array(labels)
  perm = rng.permutation(len(y))
  x, y = x[perm], y[perm]
  dup = rng.choice(len(y), size=(len(y) // 20, 2), replace=False)
  x[dup[:, 0]] = x[dup[:, 1]]  # Exact duplicates, mostly of another class.
  return x, y


SIZES = [1, 1, 2, 3, 3, 5, 8, 13, 1, 4, 6, 2, 9, 1, 7, 5, 3, 11, 2, 6] * 6  # Singletons too.


@pytest.fixture(scope="module")
def clustered():
  return lattice_clusters(0, SIZES)


def assert_same(results, ref):
  first, num_relevant, hits_at_r, ap = ref
  np.testing.assert_array_equal(results.first_hit, first)
  np.testing.assert_array_equal(results.num_relevant, num_relevant)
  np.testing.assert_array_equal(results.hits_at_r, hits_at_r)
  np.testing.assert_array_equal(results.average_precision, ap)


KS = (1, 2, 4, 8, 16, 100)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "dot"])
def test_matches_numpy_reference_queries_as_gallery(clustered, distance):
  x, y = clustered
  ref = reference_results(x, y, distance=distance)
  assert_same(retrieval.query_results(x, y, distance=distance, max_k=max(KS)), ref)
  assert retrieval_metrics(x, y, ks=KS, distance=distance) == reference_metrics(ref, KS)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "dot"])
def test_matches_numpy_reference_with_reference_set(clustered, distance):
  x, y = clustered
  queries, query_labels = x[:150], y[:150]  # Some query classes are absent from the gallery.
  gallery, gallery_labels = x[150:], y[150:]
  ref = reference_results(queries, query_labels, gallery, gallery_labels, distance=distance)
  assert (ref[1] == 0).any() and (ref[1] > 0).any()
  kwargs = dict(distance=distance, reference_embeddings=gallery, reference_labels=gallery_labels)
  assert_same(retrieval.query_results(queries, query_labels, **kwargs), ref)
  assert retrieval_metrics(queries, query_labels, ks=KS, **kwargs) == reference_metrics(ref, KS)


def test_many_tiles_small_chunks_and_one_device_give_the_same_counts(clustered, monkeypatch):
  x, y = clustered
  ref = reference_results(x, y, distance="euclidean")
  # Tiles of 256 gallery rows (5 tiles, and pass 1 over several tiles), chunks of 40 queries.
  monkeypatch.setattr(retrieval, "_CPU_TILE_BYTES", 1)
  assert_same(retrieval.query_results(x, y, distance="euclidean", chunk_size=40), ref)
  assert_same(retrieval.query_results(x, y, distance="euclidean", chunk_size=40,
                                      devices=jax.devices()[:1]), ref)


def test_pairs_use_the_two_stage_top_k(monkeypatch):
  x, y = lattice_clusters(1, [2] * 300 + [1] * 20)  # R <= 1: top-2 with self, from blocks.
  monkeypatch.setattr(retrieval, "_CPU_TILE_BYTES", 1)
  assert 4 * 2 * retrieval._BLOCK <= retrieval._tile_size(64, len(y), 2, jax.devices())
  ref = reference_results(x, y, distance="cosine")
  assert_same(retrieval.query_results(x, y, distance="cosine", chunk_size=64), ref)


def test_a_wrong_first_pass_is_caught_and_recounted(clustered, monkeypatch):
  x, y = clustered
  ref = reference_results(x, y, distance="dot")
  for nudge in (0.5, -0.5):
    monkeypatch.setattr(retrieval, "_union_scores",
                        lambda q, rows, nudge=nudge: retrieval._scores(q, rows) + nudge)
    jax.clear_caches()
    assert_same(retrieval.query_results(x, y, distance="dot"), ref)
  monkeypatch.undo()
  jax.clear_caches()


@pytest.mark.parametrize("k,block", [(1, 8), (3, 8), (7, 4), (40, 8)])
def test_top_k_of_the_candidates_equals_lax_top_k_including_ties(k, block):
  scores = np.random.default_rng(k).integers(0, 6, (16, 256)).astype(np.float32)
  candidates, columns = retrieval.top_k_candidates(jnp.asarray(scores), k, block=block)
  values, where = jax.lax.top_k(candidates, k)
  indices = jnp.take_along_axis(columns, where, axis=1)
  expected_values, expected_indices = jax.lax.top_k(scores, k)
  np.testing.assert_array_equal(values, expected_values)
  np.testing.assert_array_equal(indices, expected_indices)


# Six points on a line (euclidean), worked by hand:
#   x:     0  1  2.5  4  5  9        labels: A A B A B B
#   query 0: p1 A, p2 B, p3 A, p4 B, p5 B -> rel 1 0 1 0 0  first 0  R=2  RP 1/2  AP 1/2
#   query 1: p0 A, p2 B, p3 A, p4 B, p5 B -> rel 1 0 1 0 0  first 0  R=2  RP 1/2  AP 1/2
#   query 2: p1 A 1.5, p3 A 1.5, p0 A 2.5, p4 B 2.5, p5 B  (ties by index)
#                                          -> rel 0 0 0 1 1  first 3  R=2  RP 0    AP 0
#   query 3: p4 B, p2 B, p1 A, p0 A, p5 B -> rel 0 0 1 1 0  first 2  R=2  RP 0    AP 0
#   query 4: p3 A, p2 B, p1 A 4, p5 B 4, p0 A
#                                          -> rel 0 1 0 1 0  first 1  R=2  RP 1/2  AP 1/4
#   query 5: p4 B, p3 A, p2 B, p1 A, p0 A -> rel 1 0 1 0 0  first 0  R=2  RP 1/2  AP 1/2
# Recall@1 = 3/6, @2 = 4/6, @3 = 5/6 (query 2's hit is 4th only because p0 precedes p4), @4 = 1.
SIX_X = np.array([[0.], [1.], [2.5], [4.], [5.], [9.]], np.float32)
SIX_Y = np.array([0, 0, 1, 0, 1, 1])


def test_six_points_by_hand():
  metrics = retrieval_metrics(SIX_X, SIX_Y, ks=(1, 2, 3, 4), distance="euclidean")
  assert metrics == pytest.approx({"recall@1": 3 / 6, "recall@2": 4 / 6, "recall@3": 5 / 6,
                                   "recall@4": 1.0, "map@r": 1.75 / 6, "r_precision": 2 / 6},
                                  rel=1e-15, abs=0)


def test_six_points_by_hand_with_a_reference_set():
  # Queries 0 (A), 2 (B), 4 (B) against the gallery 1 (A), 3 (A), 5 (B):
  #   query 0: 1 A, 3 A, 5 B            -> rel 1 1 0  first 0  R=2  RP 1  AP 1
  #   query 2: 1 A 1.5, 3 A 1.5, 5 B    -> rel 0 0 1  first 2  R=1  RP 0  AP 0
  #   query 4: 3 A 1, 1 A 4, 5 B 4      -> rel 0 0 1  first 2  R=1  RP 0  AP 0 (1 precedes 5)
  metrics = retrieval_metrics(SIX_X[[0, 2, 4]], SIX_Y[[0, 2, 4]], ks=(1, 3), distance="euclidean",
                              reference_embeddings=SIX_X[[1, 3, 5]],
                              reference_labels=SIX_Y[[1, 3, 5]])
  assert metrics == {"recall@1": 1 / 3, "recall@3": 1.0, "map@r": 1 / 3, "r_precision": 1 / 3}


def test_duplicates_of_the_query_count_as_neighbours():
  x = np.array([[1., 0.], [1., 0.], [0., 1.]], np.float32)
  metrics = retrieval_metrics(x, np.array([0, 0, 1]), ks=(1,))
  assert metrics["recall@1"] == 2 / 3  # Rows 0 and 1 find each other; row 2 has no positive.
  assert metrics["map@r"] == 1.0


def test_only_singletons_give_zero_and_no_nan():
  x = np.eye(4, dtype=np.float32)
  assert retrieval_metrics(x, np.arange(4), ks=(1, 3)) == {
      "recall@1": 0.0, "recall@3": 0.0, "map@r": 0.0, "r_precision": 0.0}


def test_jax_and_bfloat16_inputs():
  x = jnp.asarray(SIX_X, jnp.bfloat16)
  assert retrieval_metrics(x, jnp.asarray(SIX_Y), ks=(1,), distance="euclidean")[
      "recall@1"] == 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=np.zeros(5, int)), "6 rows but labels has 5"),
    (dict(ks=(1, 6)), "6 nearest neighbours but each query has only 5"),
    (dict(ks=(0,)), "positive integers"),
    (dict(ks=(1.5,)), "positive integers"),
    (dict(distance="manhattan"), "distance='manhattan'"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(reference_embeddings=np.zeros((4, 3), np.float32),
          reference_labels=np.zeros(4, int)), "reference_embeddings has width 3 but embeddings "
                                              "has width 1"),
    (dict(reference_embeddings=SIX_X, reference_labels=np.zeros(4, int)),
     "reference_embeddings has 6 rows but reference_labels has 4"),
    (dict(reference_labels=SIX_Y), "must be given together"),
    (dict(reference_embeddings=SIX_X[:2], reference_labels=SIX_Y[:2], ks=(3,)),
     "3 nearest neighbours but each query has only 2 \\(the reference"),
    (dict(labels=np.zeros(6)), "labels must be integers"),
])
def test_bad_input_raises_a_clear_error(kwargs, match):
  args = dict(embeddings=SIX_X, labels=SIX_Y, ks=(1,))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    retrieval_metrics(args.pop("embeddings"), args.pop("labels"), **args)


@pytest.mark.parametrize("bad,what", [(np.nan, "NaN"), (np.inf, "infinite values")])
def test_non_finite_embeddings_raise(bad, what):
  x = SIX_X.copy()
  x[4, 0] = bad
  with pytest.raises(ValueError, match=f"embeddings contains {what} in 1 of 6 rows \\(first: "
                                       "\\[4\\]\\)"):
    retrieval_metrics(x, SIX_Y)
  with pytest.raises(ValueError, match=f"reference_embeddings contains {what}"):
    retrieval_metrics(SIX_X, SIX_Y, reference_embeddings=x, reference_labels=SIX_Y)


def test_progress_is_logged(caplog, monkeypatch):
  monkeypatch.setattr(retrieval, "_LOG_EVERY_S", 0.0)
  with caplog.at_level("INFO"):
    retrieval_metrics(SIX_X, SIX_Y, ks=(1,), chunk_size=2, devices=jax.devices()[:1])
  messages = [r.getMessage() for r in caplog.records]
  assert any("6 queries x 6 gallery items, dim 1, cosine; 3 chunks of 2" in m for m in messages)
  assert any("2/3 chunks (67%)" in m for m in messages)
  assert any("6 queries in" in m for m in messages)
