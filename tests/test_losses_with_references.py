"""Losses over (batch x references): anchors from the batch, positives and negatives from a set M.

The float64 references below are written from each loss's formula over the anchor-reference
pairs, with no code shared with rankjax: a pair (a, j) is positive when the labels agree and
negative when they differ, a reference with a negative label (an empty memory slot) is in no pair,
and the column ``self_index[a]`` (the anchor's own copy) is never paired with anchor ``a``. Values
must match to 1e-5 relative; gradients (with respect to the batch and to the references) to
1e-5 relative with an absolute floor of 1e-5 times the largest entry, as in test_losses.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import losses
from rankjax import mining

# --- Float64 references over (batch x references) ------------------------------------------------


def _distance(u, v, distance):
  diff = u - v
  if distance == "euclidean":
    return np.sqrt(diff @ diff)
  if distance == "squared_euclidean":
    return diff @ diff
  norms = np.linalg.norm(u) * np.linalg.norm(v)
  return 1.0 - (u @ v / norms if norms > 0 else 0.0)


def _pairs(y, ry, self_index, a):
  """Positive and negative reference columns of anchor a."""
  usable = [j for j in range(len(ry)) if ry[j] >= 0 and (self_index is None or j != self_index[a])]
  return [j for j in usable if ry[j] == y[a]], [j for j in usable if ry[j] != y[a]]


def ref_contrastive(x, y, r, ry, self_index, pos_margin=0.0, neg_margin=1.0,
                    distance="euclidean"):
  total, count = 0.0, 0
  for a in range(len(y)):
    pos, neg = _pairs(y, ry, self_index, a)
    for j in pos:
      total += max(0.0, _distance(x[a], r[j], distance) - pos_margin) ** 2
    for j in neg:
      total += max(0.0, neg_margin - _distance(x[a], r[j], distance)) ** 2
    count += len(pos) + len(neg)
  return total / count if count else 0.0


def ref_triplet(x, y, r, ry, self_index, margin=0.2, mining="semihard", distance="euclidean",
                soft=False):
  loss = (lambda gap: np.logaddexp(0.0, gap)) if soft else (lambda gap: max(0.0, gap + margin))
  terms, active = [], 0
  for a in range(len(y)):
    pos, neg = _pairs(y, ry, self_index, a)
    d = {j: _distance(x[a], r[j], distance) for j in pos + neg}
    if mining == "all":
      for p in pos:
        for n in neg:
          terms.append(loss(d[p] - d[n]))
          active += terms[-1] > 0
      continue
    if not pos or not neg:
      continue
    if mining == "hard":
      terms.append(loss(max(d[p] for p in pos) - min(d[n] for n in neg)))
      continue
    for p in pos:
      beyond = [d[n] for n in neg if d[n] > d[p]]
      terms.append(loss(d[p] - (min(beyond) if beyond else max(d[n] for n in neg))))
  if mining == "all" and not soft:
    return sum(terms) / active if active else 0.0
  return float(np.mean(terms)) if terms else 0.0


def ref_multi_similarity(x, y, r, ry, self_index, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
  total = 0.0
  for a in range(len(y)):
    pos, neg = _pairs(y, ry, self_index, a)
    s = {j: x[a] @ r[j] / (np.linalg.norm(x[a]) * np.linalg.norm(r[j])) for j in pos + neg}
    kept_pos = [s[p] for p in pos if neg and s[p] < max(s[n] for n in neg) + epsilon]
    kept_neg = [s[n] for n in neg if pos and s[n] > min(s[p] for p in pos) - epsilon]
    total += np.log1p(sum(np.exp(-alpha * (v - base)) for v in kept_pos)) / alpha
    total += np.log1p(sum(np.exp(beta * (v - base)) for v in kept_neg)) / beta
  return total / len(y)


# (config name, options, reference, the reference's mining mode).
CASES = [
    ("contrastive", {}, ref_contrastive),
    ("contrastive", {"pos_margin": 0.3, "neg_margin": 2.0, "distance": "squared_euclidean"},
     ref_contrastive),
    ("contrastive", {"neg_margin": 0.9, "distance": "cosine"}, ref_contrastive),
    ("triplet_semihard", {}, ref_triplet),
    ("triplet_semihard", {"margin": 0.1, "distance": "cosine"}, ref_triplet),
    ("triplet_semihard", {"soft": True}, ref_triplet),
    ("triplet_hard", {}, ref_triplet),
    ("triplet_hard", {"soft": True, "distance": "squared_euclidean"}, ref_triplet),
    ("triplet_all", {"margin": 0.5}, ref_triplet),
    ("triplet_all", {"soft": True}, ref_triplet),
    ("multi_similarity", {}, ref_multi_similarity),
    ("multi_similarity", {"alpha": 1.0, "beta": 10.0, "base": 0.3, "epsilon": 0.2},
     ref_multi_similarity),
]
IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES]
NAMES = sorted({c[0] for c in CASES})


def _reference_kwargs(name, options):
  kwargs = dict(options)
  if name.startswith("triplet_"):
    kwargs["mining"] = name.split("_")[1]
  return kwargs


@functools.lru_cache(maxsize=None)
def _jitted(name, options_items, with_self):
  fn = losses.get_loss(name, **dict(options_items))

  def loss(x, r, y, ry, self_index):
    return fn(x, y, ref_embeddings=r, ref_labels=ry,
              ref_self_index=self_index if with_self else None)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def value_and_grads(name, x, y, r, ry, self_index=None, **options):
  fn = _jitted(name, tuple(sorted(options.items())), self_index is not None)
  self_index = jnp.zeros(len(y), jnp.int32) if self_index is None else jnp.asarray(self_index)
  value, (grad_x, grad_r) = fn(jnp.asarray(x, jnp.float32), jnp.asarray(r, jnp.float32),
                               jnp.asarray(y), jnp.asarray(ry), self_index)
  return float(value), np.asarray(grad_x), np.asarray(grad_r)


def numeric_grad(f, x, h=1e-6):
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def assert_grad_close(grad, expected):
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _f64(rng, shape):
  return rng.normal(size=shape).astype(np.float32).astype(np.float64)


def memory_batch(seed, batch=8, memory=14, dim=4, classes=4, empty=3):
  """A batch and a memory: past samples, ``empty`` unfilled slots (label -1)."""
  rng = np.random.default_rng(seed)
  x, y = _f64(rng, (batch, dim)), rng.integers(0, classes, size=batch)
  r, ry = _f64(rng, (memory, dim)), rng.integers(0, classes, size=memory)
  ry[rng.choice(memory, size=empty, replace=False)] = -1
  return x, y, r, ry


def _check(name, options, reference, x, y, r, ry, self_index):
  kwargs = _reference_kwargs(name, options)
  value, grad_x, grad_r = value_and_grads(name, x, y, r, ry, self_index, **options)
  expected = reference(x, y, r, ry, self_index, **kwargs)
  assert expected > 0  # the batch exercises the loss
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert_grad_close(grad_x, numeric_grad(lambda z: reference(z, y, r, ry, self_index, **kwargs),
                                         x))
  assert_grad_close(grad_r, numeric_grad(lambda z: reference(x, y, z, ry, self_index, **kwargs),
                                         r))


# --- Values and gradients against the references --------------------------------------------------


@pytest.mark.parametrize("name,options,reference", CASES, ids=IDS)
def test_past_memory_matches_reference(name, options, reference):
  # References that hold no copy of the batch, with empty slots: nothing is excluded but those.
  for seed in range(3):
    _check(name, options, reference, *memory_batch(seed), None)


@pytest.mark.parametrize("name,options,reference", CASES, ids=IDS)
def test_memory_holding_the_batch_excludes_each_anchors_own_copy(name, options, reference):
  # As a cross-batch memory right after it enqueued the batch: the batch's copy sits at
  # (ptr + i) mod M, here wrapping around the end of the ring.
  for seed in range(2):
    x, y, r, ry = memory_batch(10 + seed, memory=12, empty=0)
    self_index = (9 + np.arange(len(y))) % len(ry)
    r[self_index], ry[self_index] = x, y
    _check(name, options, reference, x, y, r, ry, self_index)


@pytest.mark.parametrize("name", ["triplet_semihard", "triplet_all"])
def test_sorted_rows_path_with_references(name, monkeypatch):
  # Forced off the positive slots: each anchor's row of references is sorted.
  monkeypatch.setattr(mining, "SLOTS_PER_LOG2_BATCH", -1)
  _jitted.cache_clear()
  try:
    for seed in range(2):
      x, y, r, ry = memory_batch(20 + seed, classes=3)
      _check(name, {"margin": 0.5}, ref_triplet, x, y, r, ry, None)
      self_index = np.arange(len(y)) + 2
      r[self_index], ry[self_index] = x, y
      _check(name, {"margin": 0.5}, ref_triplet, x, y, r, ry, self_index)
  finally:
    _jitted.cache_clear()


@pytest.mark.parametrize("name,options,reference", CASES, ids=IDS)
def test_the_batch_as_its_own_references_is_the_loss_without_them(name, options, reference):
  # refs = batch with self_index = i is the batch loss: same value, and the gradients through
  # anchors and references add up to the batch loss's gradient.
  del reference
  rng = np.random.default_rng(30)
  x = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=12))
  fn = losses.get_loss(name, **options)
  value, grad = jax.value_and_grad(fn)(x, y)
  with_refs, grad_x, grad_r = value_and_grads(name, x, y, x, y, np.arange(12), **options)
  np.testing.assert_allclose(with_refs, float(value), rtol=1e-5)
  assert_grad_close(grad_x + grad_r, np.asarray(grad))


@pytest.mark.parametrize("name", NAMES)
def test_references_that_hold_nothing_usable(name):
  x, y, r, ry = memory_batch(40)
  # Every slot empty: no pair at all, so 0 with zero gradients.
  value, grad_x, grad_r = value_and_grads(name, x, y, r, -np.ones_like(ry))
  assert value == 0.0 and not grad_x.any() and not grad_r.any()
  # One anchor whose references are its own copy and empty slots: again no pair.
  value, grad_x, _ = value_and_grads(name, x[:1], y[:1], np.concatenate([r[:3], x[:1]]),
                                     np.array([-1, -1, -1, y[0]]), np.array([3]))
  assert value == 0.0 and not grad_x.any()
  # No positive in the references (another class set): only contrastive's pushes count.
  value, grad_x, grad_r = value_and_grads(name, x, y, r, ry + 10)
  assert np.isfinite(value) and np.all(np.isfinite(grad_x)) and np.all(np.isfinite(grad_r))
  if name != "contrastive":
    assert value == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_references_are_finite(name):
  x, y, r, ry = memory_batch(41)
  for refs in (np.zeros_like(r), np.ones_like(r), 1e4 * r, np.concatenate([x, x])[:len(r)]):
    value, grad_x, grad_r = value_and_grads(name, x, y, refs, ry)
    assert np.isfinite(value) and np.all(np.isfinite(grad_x)) and np.all(np.isfinite(grad_r))
  # bfloat16 references are upcast like the batch.
  fn = losses.get_loss(name)
  low = fn(jnp.asarray(x, jnp.float32), jnp.asarray(y),
           ref_embeddings=jnp.asarray(r, jnp.bfloat16), ref_labels=jnp.asarray(ry))
  full = fn(jnp.asarray(x, jnp.float32), jnp.asarray(y),
            ref_embeddings=jnp.asarray(r, jnp.bfloat16).astype(jnp.float32),
            ref_labels=jnp.asarray(ry))
  np.testing.assert_allclose(float(low), float(full), rtol=1e-6)


def test_hand_computed_triplet_against_a_memory():
  # 1-D anchors 0 (class 0) and 2 (class 1); memory 1 (class 0), 0.5 (class 1), 3 (class 1) and
  # one empty slot. Anchor 0: d_ap = 1, negatives .5 and 3; anchor 2: positives .5 (d 1.5) and
  # 3 (d 1), negative 1 (d 1).
  x, y = jnp.array([[0.0], [2.0]]), jnp.array([0, 1])
  r, ry = jnp.array([[1.0], [0.5], [3.0], [9.0]]), jnp.array([0, 1, 1, -1])
  hard = losses.triplet_loss(x, y, margin=1.0, mining="hard", ref_embeddings=r, ref_labels=ry)
  assert float(hard) == pytest.approx(((1 - 0.5 + 1) + (1.5 - 1 + 1)) / 2)
  # Semi-hard: (0, p=1) picks 3 -> 0; (2, .5): none beyond 1.5, the farthest is 1 -> 1.5;
  # (2, 3): none beyond 1 (a tie is not beyond) -> 1 - 1 + 1 = 1.
  semihard = losses.triplet_loss(x, y, margin=1.0, ref_embeddings=r, ref_labels=ry)
  assert float(semihard) == pytest.approx((0.0 + 1.5 + 1.0) / 3)


# --- Input checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reference_errors_name_the_argument(name):
  fn = losses.get_loss(name)
  x, y = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="ref_embeddings was given without ref_labels"):
    fn(x, y, ref_embeddings=jnp.ones((5, 3)))
  with pytest.raises(ValueError, match="ref_labels was given without ref_embeddings"):
    fn(x, y, ref_labels=jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="ref_embeddings must have the embeddings' dimension 3"):
    fn(x, y, ref_embeddings=jnp.ones((5, 2)), ref_labels=jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="ref_embeddings has 5 rows but ref_labels has 4"):
    fn(x, y, ref_embeddings=jnp.ones((5, 3)), ref_labels=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="ref_labels must be integers"):
    fn(x, y, ref_embeddings=jnp.ones((5, 3)), ref_labels=jnp.zeros(5))
  with pytest.raises(ValueError, match="ref_self_index needs ref_embeddings"):
    fn(x, y, ref_self_index=jnp.arange(4))
  with pytest.raises(ValueError, match=r"ref_self_index must be integers of shape \[4\]"):
    fn(x, y, ref_embeddings=jnp.ones((5, 3)), ref_labels=jnp.zeros(5, jnp.int32),
       ref_self_index=jnp.arange(5))


def test_mining_checks_the_distance_shape():
  with pytest.raises(ValueError, match=r"distances must have shape \[2, 3\] \(anchors x refer"):
    mining.semihard_negatives(jnp.zeros((2, 2)), jnp.array([0, 1]),
                              ref_labels=jnp.array([0, 1, 1]))
