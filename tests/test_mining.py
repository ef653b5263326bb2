"""Tests of rankjax.mining against loops over anchors, pairs and triplets.

Distances here are random symmetric matrices, some with small integer entries so that exact ties
(between negatives, and between a negative and d_ap or d_ap + m) are common: the tie rules
(strict "farther than", zero hinge at equality, gradients split between tied negatives) must then
agree exactly. Both strategies, positive slots and sorted rows, are run on every case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import mining

PATHS = {"slots": 10**6, "sorted_rows": -1}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
  monkeypatch.setattr(mining, "SLOTS_PER_LOG2_BATCH", PATHS[request.param])
  return request.param


def random_case(seed, batch=11, classes=3, integer=False):
  rng = np.random.default_rng(seed)
  if integer:
    d = rng.integers(1, 6, size=(batch, batch)).astype(np.float64)
  else:
    d = rng.uniform(0.1, 3.0, size=(batch, batch))
  d = np.triu(d, 1)
  d = d + d.T
  labels = rng.integers(0, classes, size=batch)
  return d, labels


def positives(labels, a):
  return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def negatives(labels, a):
  return [n for n in range(len(labels)) if labels[n] != labels[a]]


def ref_semihard(d, labels, weights):
  """Chosen negative distance per positive pair, and d(sum w * chosen)/dd with tie splitting."""
  n = len(labels)
  chosen, grad = np.zeros((n, n)), np.zeros((n, n))
  for a in range(n):
    neg = negatives(labels, a)
    if not neg:
      continue
    for p in positives(labels, a):
      beyond = [k for k in neg if d[a, k] > d[a, p]]
      value = min(d[a, k] for k in beyond) if beyond else max(d[a, k] for k in neg)
      chosen[a, p] = value
      tied = [k for k in neg if d[a, k] == value]
      for k in tied:
        grad[a, k] += weights[a, p] / len(tied)
  return chosen, grad


def ref_hinge_sums(d, labels, margin, weights):
  n = len(labels)
  sums, counts = np.zeros((n, n)), np.zeros((n, n))
  grad, grad_margin = np.zeros((n, n)), 0.0
  for a in range(n):
    for p in positives(labels, a):
      for k in negatives(labels, a):
        excess = d[a, p] + margin - d[a, k]
        if excess > 0:
          sums[a, p] += excess
          counts[a, p] += 1
          grad[a, p] += weights[a, p]
          grad[a, k] -= weights[a, p]
          grad_margin += weights[a, p]
  return sums, counts, grad, grad_margin


def ref_softplus_sums(d, labels, weights):
  n = len(labels)
  sums, grad = np.zeros((n, n)), np.zeros((n, n))
  for a in range(n):
    for p in positives(labels, a):
      for k in negatives(labels, a):
        gap = d[a, p] - d[a, k]
        sums[a, p] += np.logaddexp(0.0, gap)
        slope = 1.0 / (1.0 + np.exp(-gap))
        grad[a, p] += weights[a, p] * slope
        grad[a, k] -= weights[a, p] * slope
  return sums, grad


def _weights(seed, n):
  return np.random.default_rng(seed + 100).normal(size=(n, n))


CASES = [(seed, integer) for seed in range(3) for integer in (False, True)]


# Compiled once per path (the path is read when tracing, so it is part of the cache key).
@functools.lru_cache(maxsize=None)
def _semihard_fn(path):
  del path

  def weighted(dist, labels, w):
    chosen, valid = mining.semihard_negatives(dist, labels)
    return jnp.sum(jnp.where(valid, w * chosen, 0.0)), (chosen, valid)

  return jax.jit(jax.value_and_grad(weighted, has_aux=True))


@functools.lru_cache(maxsize=None)
def _hinge_fn(path):
  del path

  def weighted(dist, m, labels, w):
    sums, counts = mining.negative_hinge_sums(dist, labels, margin=m)
    return jnp.sum(w * sums), (sums, counts)

  return jax.jit(jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("seed,integer", CASES)
def test_semihard_negatives(path, seed, integer):
  d, labels = random_case(seed, integer=integer)
  w = _weights(seed, len(labels))
  expected, expected_grad = ref_semihard(d, labels, w)

  (_, (chosen, valid)), grad = _semihard_fn(path)(
      jnp.asarray(d, jnp.float32), jnp.asarray(labels), jnp.asarray(w, jnp.float32))
  pos = labels[:, None] == labels[None, :]
  np.fill_diagonal(pos, False)
  np.testing.assert_array_equal(valid, pos)
  np.testing.assert_allclose(chosen, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed,integer", CASES)
def test_negative_hinge_sums(path, seed, integer):
  d, labels = random_case(seed, integer=integer)
  w = _weights(seed, len(labels))
  margin = 1.0 if integer else 0.7  # integer margin: d_ap + m ties with negatives
  sums_ref, counts_ref, grad_ref, grad_margin_ref = ref_hinge_sums(d, labels, margin, w)

  (_, (sums, counts)), (grad, grad_margin) = _hinge_fn(path)(
      jnp.asarray(d, jnp.float32), jnp.float32(margin), jnp.asarray(labels),
      jnp.asarray(w, jnp.float32))
  np.testing.assert_array_equal(counts, counts_ref)
  np.testing.assert_allclose(sums, sums_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_margin, grad_margin_ref, rtol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_negative_softplus_sums(seed):
  d, labels = random_case(seed)
  w = _weights(seed, len(labels))
  sums_ref, grad_ref = ref_softplus_sums(d, labels, w)
  fn = jax.jit(jax.value_and_grad(
      lambda dist: jnp.sum(w * mining.negative_softplus_sums(dist, jnp.asarray(labels)))))
  value, grad = fn(jnp.asarray(d, jnp.float32))
  np.testing.assert_allclose(value, np.sum(w * sums_ref), rtol=1e-5)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_blocks_of_rows_give_the_same_answer(monkeypatch):
  # Large batches run block by block (lax.map with a remainder block): same values, gradients.
  d, labels = random_case(5, batch=13, integer=True)
  w = _weights(5, 13)

  def run():
    def total(dist):
      chosen, _ = mining.semihard_negatives(dist, jnp.asarray(labels))
      sums, _ = mining.negative_hinge_sums(dist, jnp.asarray(labels), margin=1.0)
      return jnp.sum(w * chosen) + jnp.sum(w * sums)
    return jax.jit(jax.value_and_grad(total))(jnp.asarray(d, jnp.float32))

  whole = run()
  monkeypatch.setattr(mining, "_BLOCK_ELEMENTS", 4 * 13)  # 4 rows per block, 13 rows
  blocked = run()
  np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
  np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-6)


def test_hardest_positive_and_negative():
  d, labels = random_case(7, integer=True)
  labels[0] = 99  # an anchor without positives
  far_pos, has_pos = mining.hardest_positive(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  near_neg, has_neg = mining.hardest_negative(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  for a in range(len(labels)):
    pos, neg = positives(labels, a), negatives(labels, a)
    assert bool(has_pos[a]) == bool(pos) and bool(has_neg[a]) == bool(neg)
    assert float(far_pos[a]) == (max(d[a, p] for p in pos) if pos else 0.0)
    assert float(near_neg[a]) == (min(d[a, k] for k in neg) if neg else 0.0)
  # Gradient: to the selected entry, shared between exact ties.
  grad = jax.grad(lambda x: jnp.sum(mining.hardest_negative(x, jnp.asarray(labels))[0]))(
      jnp.asarray(d, jnp.float32))
  for a in range(len(labels)):
    neg = negatives(labels, a)
    best = min(d[a, k] for k in neg)
    tied = [k for k in neg if d[a, k] == best]
    expected = np.zeros(len(labels))
    expected[tied] = 1.0 / len(tied)
    np.testing.assert_allclose(grad[a], expected, rtol=1e-6)


def test_single_class_and_no_positive_batches(path):
  d, _ = random_case(8)
  d = jnp.asarray(d, jnp.float32)
  w = jnp.ones(d.shape)
  for labels in [jnp.zeros(11, jnp.int32), jnp.arange(11, dtype=jnp.int32)]:
    (_, (chosen, valid)), grad = _semihard_fn(path)(d, labels, w)
    (_, (sums, counts)), (grad_all, _) = _hinge_fn(path)(d, jnp.float32(0.5), labels, w)
    assert not bool(jnp.any(valid))
    assert float(jnp.abs(chosen).sum() + sums.sum() + counts.sum()) == 0.0
    assert float(jnp.abs(grad).sum() + jnp.abs(grad_all).sum()) == 0.0


def test_valid_triplet_count():
  for seed in range(3):
    _, labels = random_case(seed, batch=15, classes=4)
    expected = sum(len(positives(labels, a)) * len(negatives(labels, a))
                   for a in range(len(labels)))
    assert float(mining.valid_triplet_count(jnp.asarray(labels))) == expected
  # 4096 samples in 2 classes: 4096 * 2047 * 2048 triplets, beyond int32.
  labels = jnp.arange(4096) % 2
  assert float(mining.valid_triplet_count(labels)) == pytest.approx(4096 * 2047 * 2048, rel=1e-6)


def test_first_two_per_class():
  labels = np.array([4, 2, 4, 9, 2, 4, 7, 7, 1])
  pairs = mining.first_two_per_class(jnp.asarray(labels))
  got = {int(a): int(p) for a, p, v in zip(pairs.anchors, pairs.positives, pairs.valid) if v}
  assert got == {0: 2, 1: 4, 6: 7}  # 9 and 1 have one sample; the third 4 is ignored
  assert pairs.valid.shape == (4,) and list(pairs.valid) == [True, True, True, False]
  for seed in range(3):
    _, labels = random_case(seed, batch=15, classes=6)
    pairs = mining.first_two_per_class(jnp.asarray(labels))
    expected = {}
    for label in np.unique(labels):
      members = np.flatnonzero(labels == label)
      if len(members) >= 2:
        expected[members[0]] = members[1]
    got = {int(a): int(p) for a, p, v in zip(pairs.anchors, pairs.positives, pairs.valid) if v}
    assert got == expected
  assert not bool(mining.first_two_per_class(jnp.array([7])).valid[0])


def test_under_vmap_both_paths_agree():
  # Under vmap the slot/sort choice is per batch, so lax.cond runs both branches and selects.
  cases = [random_case(seed, integer=True) for seed in range(3)]
  d = jnp.asarray(np.stack([c[0] for c in cases]), jnp.float32)
  labels = jnp.asarray(np.stack([c[1] for c in cases]))
  chosen, sums = jax.jit(jax.vmap(lambda x, y: (
      mining.semihard_negatives(x, y)[0], mining.negative_hinge_sums(x, y, margin=1.0)[0])))(
          d, labels)
  for i, (di, li) in enumerate(cases):
    np.testing.assert_allclose(chosen[i], ref_semihard(di, li, np.zeros_like(di))[0], rtol=1e-6)
    np.testing.assert_allclose(sums[i], ref_hinge_sums(di, li, 1.0, np.zeros_like(di))[0],
                               rtol=1e-5, atol=1e-5)
