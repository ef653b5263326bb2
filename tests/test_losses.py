"""Tests of rankjax.losses against independent numpy implementations written from the formulas.

The references below loop over anchors, pairs and triplets in float64 exactly as the papers (and
issue 2) state each loss, with no code shared with rankjax. Gradients are checked against central
finite differences of those references. Float32 results must match to 1e-5 relative: values with
``rtol=1e-5``; gradients elementwise with ``rtol=1e-5`` and an absolute floor of 1e-5 times the
largest gradient entry (entries that cancel to ~0 carry float32 rounding of the large ones).
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import losses
from rankjax import mining

# --- Float64 references, straight from the formulas ----------------------------------------------


def ref_distances(x, distance="euclidean"):
  n = len(x)
  d = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      diff = x[i] - x[j]
      if distance == "euclidean":
        d[i, j] = np.sqrt(diff @ diff)
      elif distance == "squared_euclidean":
        d[i, j] = diff @ diff
      else:
        norms = np.linalg.norm(x[i]) * np.linalg.norm(x[j])
        d[i, j] = 1.0 - (x[i] @ x[j] / norms if norms > 0 else 0.0)
  return d


def softplus(z):
  return np.logaddexp(0.0, z)


def ref_contrastive(x, y, pos_margin=0.0, neg_margin=1.0, distance="euclidean"):
  d = ref_distances(x, distance)
  n = len(x)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      if y[i] == y[j]:
        total += max(0.0, d[i, j] - pos_margin) ** 2
      else:
        total += max(0.0, neg_margin - d[i, j]) ** 2
  return total / (n * (n - 1)) if n > 1 else 0.0


def _pos_neg(y, a):
  n = len(y)
  return ([p for p in range(n) if p != a and y[p] == y[a]], [k for k in range(n) if y[k] != y[a]])


def ref_triplet(x, y, margin=0.2, mining="semihard", distance="euclidean", soft=False):
  d = ref_distances(x, distance)
  loss = (lambda gap: softplus(gap)) if soft else (lambda gap: max(0.0, gap + margin))
  terms = []
  if mining == "all":
    active = 0
    for a in range(len(y)):
      pos, neg = _pos_neg(y, a)
      for p in pos:
        for k in neg:
          terms.append(loss(d[a, p] - d[a, k]))
          active += terms[-1] > 0
    if soft:
      return float(np.mean(terms)) if terms else 0.0
    return sum(terms) / active if active else 0.0
  for a in range(len(y)):
    pos, neg = _pos_neg(y, a)
    if not pos or not neg:
      continue
    if mining == "hard":
      terms.append(loss(max(d[a, p] for p in pos) - min(d[a, k] for k in neg)))
      continue
    for p in pos:
      beyond = [d[a, k] for k in neg if d[a, k] > d[a, p]]
      chosen = min(beyond) if beyond else max(d[a, k] for k in neg)
      terms.append(loss(d[a, p] - chosen))
  return float(np.mean(terms)) if terms else 0.0


def ref_tfa_semihard(x, y, margin):
  """TF Addons' triplet_semihard_loss (distance_metric="L_2"), transcribed to numpy."""
  d = ref_distances(x, "squared_euclidean")
  n = len(y)
  adjacency = y[:, None] == y[None, :]
  adjacency_not = ~adjacency
  d_tile = np.tile(d, (n, 1))
  mask = np.tile(adjacency_not, (n, 1)) & (d_tile > d.T.reshape(-1, 1))
  mask_final = (mask.sum(1, keepdims=True) > 0).reshape(n, n).T

  def masked_minimum(data, m):
    axis_max = data.max(1, keepdims=True)
    return ((data - axis_max) * m).min(1, keepdims=True) + axis_max

  def masked_maximum(data, m):
    axis_min = data.min(1, keepdims=True)
    return ((data - axis_min) * m).max(1, keepdims=True) + axis_min

  outside = masked_minimum(d_tile, mask).reshape(n, n).T
  inside = np.tile(masked_maximum(d, adjacency_not), (1, n))
  semi_hard = np.where(mask_final, outside, inside)
  loss_mat = margin + d - semi_hard
  mask_positives = adjacency.astype(float) - np.eye(n)
  return np.maximum(loss_mat * mask_positives, 0.0).sum() / mask_positives.sum()


def _first_two(y):
  pairs, seen = [], {}
  for i, label in enumerate(y):
    seen.setdefault(label, []).append(i)
  for label in sorted(seen, key=lambda c: seen[c][0]):
    if len(seen[label]) >= 2:
      pairs.append((seen[label][0], seen[label][1]))
  return pairs


def _logsumexp(values):
  values = np.asarray(values, np.float64)
  peak = values.max()
  return peak + np.log(np.exp(values - peak).sum())


def ref_npairs(x, y, l2_reg=0.002, negatives="positives"):
  pairs = _first_two(y)
  if not pairs:
    return 0.0
  ce = []
  for i, (a, p) in enumerate(pairs):
    target = x[a] @ x[p]
    if negatives == "positives":
      logits = [x[a] @ x[q] for _, q in pairs]
    else:
      logits = [target] + [x[a] @ x[k] for k in range(len(y)) if y[k] != y[a]]
    ce.append(_logsumexp(logits) - target)
  reg = np.mean([x[a] @ x[a] for a, _ in pairs]) + np.mean([x[p] @ x[p] for _, p in pairs])
  return float(np.mean(ce) + 0.25 * l2_reg * reg)


def ref_angular(x, y, alpha_degrees=45.0):
  pairs = _first_two(y)
  if not pairs:
    return 0.0
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  t = np.tan(np.deg2rad(alpha_degrees)) ** 2
  out = []
  for i, (a, p) in enumerate(pairs):
    f = [4 * t * (u[a] + u[p]) @ u[q] - 2 * (1 + t) * u[a] @ u[p]
         for j, (_, q) in enumerate(pairs) if j != i]
    out.append(np.log1p(np.sum(np.exp(f))) if f else 0.0)
  return float(np.mean(out))


def ref_npairs_angular(x, y, alpha_degrees=45.0, angular_weight=2.0, l2_reg=0.002):
  return ref_npairs(x, y, l2_reg) + angular_weight * ref_angular(x, y, alpha_degrees)


def ref_lifted(x, y, margin=1.0):
  d = ref_distances(x)
  n = len(y)
  total, num_pairs = 0.0, 0
  for i in range(n):
    for j in range(i + 1, n):
      if y[i] != y[j]:
        continue
      num_pairs += 1
      s = sum(np.exp(margin - d[i, k]) for k in range(n) if y[k] != y[i])
      s += sum(np.exp(margin - d[j, k]) for k in range(n) if y[k] != y[j])
      if s > 0:
        total += max(0.0, np.log(s) + d[i, j]) ** 2
  return total / (2 * num_pairs) if num_pairs else 0.0


def ref_multi_similarity(x, y, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = u @ u.T
  total = 0.0
  for i in range(len(y)):
    pos, neg = _pos_neg(y, i)
    kept_pos = [s[i, p] for p in pos if neg and s[i, p] < max(s[i, k] for k in neg) + epsilon]
    kept_neg = [s[i, k] for k in neg if pos and s[i, k] > min(s[i, p] for p in pos) - epsilon]
    total += np.log1p(sum(np.exp(-alpha * (v - base)) for v in kept_pos)) / alpha
    total += np.log1p(sum(np.exp(beta * (v - base)) for v in kept_neg)) / beta
  return total / len(y)


# (config name, options, reference).
CASES = [
    ("contrastive", {}, ref_contrastive),
    ("contrastive", {"pos_margin": 0.3, "neg_margin": 2.0, "distance": "squared_euclidean"},
     ref_contrastive),
    ("contrastive", {"neg_margin": 0.9, "distance": "cosine"}, ref_contrastive),
    ("triplet_semihard", {}, ref_triplet),
    ("triplet_semihard", {"margin": 0.3, "distance": "squared_euclidean"}, ref_triplet),
    ("triplet_semihard", {"margin": 0.1, "distance": "cosine"}, ref_triplet),
    ("triplet_semihard", {"soft": True}, ref_triplet),
    ("triplet_hard", {}, ref_triplet),
    ("triplet_hard", {"soft": True, "distance": "cosine"}, ref_triplet),
    ("triplet_all", {}, ref_triplet),
    ("triplet_all", {"margin": 0.2, "distance": "squared_euclidean"}, ref_triplet),
    ("triplet_all", {"soft": True}, ref_triplet),
    ("npairs", {}, ref_npairs),
    ("npairs", {"l2_reg": 0.1, "negatives": "all"}, ref_npairs),
    ("angular", {}, ref_angular),
    ("angular", {"alpha_degrees": 36.0}, ref_angular),
    ("npairs_angular", {"angular_weight": 1.5}, ref_npairs_angular),
    ("lifted_structure", {}, ref_lifted),
    ("lifted_structure", {"margin": 0.5}, ref_lifted),
    ("multi_similarity", {}, ref_multi_similarity),
    ("multi_similarity", {"alpha": 1.0, "beta": 10.0, "base": 0.3, "epsilon": 0.2},
     ref_multi_similarity),
]

ALL_NAMES = ["contrastive", "triplet_semihard", "triplet_hard", "triplet_all", "npairs", "angular",
             "npairs_angular", "lifted_structure", "multi_similarity"]


def _reference_kwargs(name, options):
  kwargs = dict(options)
  if name.startswith("triplet_"):
    kwargs["mining"] = name.split("_")[1]
  return kwargs


@functools.lru_cache(maxsize=None)
def _value_and_grad(name, options_items):
  return jax.jit(jax.value_and_grad(losses.get_loss(name, **dict(options_items))))


def value_and_grad(name, x, y, **options):
  """Jitted value and gradient, compiled once per loss, options and input shape."""
  x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
  value, grad = _value_and_grad(name, tuple(sorted(options.items())))(x, jnp.asarray(y))
  return float(value), np.asarray(grad, np.float32)


def numeric_grad(f, x, h=1e-6):
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def random_batch(seed, batch=12, dim=4, classes=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32).astype(np.float64)
  y = rng.integers(0, classes, size=batch)
  return x, y


def assert_grad_close(grad, expected):
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# --- Values and gradients against the references --------------------------------------------------


@pytest.mark.parametrize("name,options,reference", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}"
                              for c in CASES])
def test_matches_reference_values_and_gradients(name, options, reference):
  kwargs = _reference_kwargs(name, options)
  for seed in range(3):
    x, y = random_batch(seed)
    value, grad = value_and_grad(name, x, y, **options)
    expected = reference(x, y, **kwargs)
    assert expected > 0  # the batch exercises the loss
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert_grad_close(grad, numeric_grad(lambda z: reference(z, y, **kwargs), x))


@pytest.mark.parametrize("name", ["triplet_semihard", "triplet_all"])
def test_sorted_rows_path_matches_reference(name, monkeypatch):
  # Large classes (or a forced limit, here) take the sort-and-rank path instead of slots.
  monkeypatch.setattr(mining, "SLOTS_PER_LOG2_BATCH", -1)
  fn = jax.jit(jax.value_and_grad(losses.get_loss(name, margin=0.5)))
  for seed in range(3):
    x, y = random_batch(10 + seed, classes=3)
    value, grad = fn(jnp.asarray(x, jnp.float32), jnp.asarray(y))
    kwargs = _reference_kwargs(name, {"margin": 0.5})
    np.testing.assert_allclose(float(value), ref_triplet(x, y, **kwargs), rtol=1e-5)
    assert_grad_close(np.asarray(grad), numeric_grad(lambda z: ref_triplet(z, y, **kwargs), x))


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semihard_equals_tf_addons(margin):
  # TF Addons' "L_2" is the squared euclidean distance; its mean runs over all positive pairs.
  for seed in range(4):
    x, y = random_batch(20 + seed)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # TF Addons expects normalised inputs
    value, _ = value_and_grad("triplet_semihard", x, y, margin=margin,
                              distance="squared_euclidean")
    np.testing.assert_allclose(value, ref_tfa_semihard(x, y, margin), rtol=1e-5)


def test_batches_of_duplicates_match_reference():
  # Exact ties between distances (repeated samples): selection and tie splitting still agree.
  x, y = random_batch(30, batch=8, dim=4, classes=3)
  x = np.concatenate([x, x[:4]])
  y = np.concatenate([y, y[:4]])
  for name in ["triplet_semihard", "triplet_hard", "triplet_all", "contrastive"]:
    kwargs = _reference_kwargs(name, {})
    value, _ = value_and_grad(name, x, y)
    reference = ref_triplet if name.startswith("triplet") else ref_contrastive
    np.testing.assert_allclose(value, reference(x, y, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("per_class", [2, 4, 8, 16])
def test_pair_losses_with_any_number_of_pairs(per_class):
  # 16 samples hold 8, 4, 2 or 1 pairs: each runs with a different static number of slots.
  rng = np.random.default_rng(per_class)
  x = rng.normal(size=(16, 4)).astype(np.float32).astype(np.float64)
  y = rng.permutation(np.arange(16) // per_class)
  for name, options, reference in [("npairs", {}, ref_npairs),
                                   ("npairs", {"negatives": "all"}, ref_npairs),
                                   ("angular", {}, ref_angular)]:
    value, grad = value_and_grad(name, x, y, **options)
    np.testing.assert_allclose(value, reference(x, y, **options), rtol=1e-5)
    expected = numeric_grad(lambda z: reference(z, y, **options), x)
    if per_class < 16:
      assert_grad_close(grad, expected)
    else:
      # One pair: the cross-entropy's gradient terms (size |x| ~ 1) cancel exactly, leaving the
      # penalty's 1e-3 x, so float32 rounding is ~1e-7 absolute rather than relative.
      np.testing.assert_allclose(grad, expected, atol=1e-6)


# --- Hand-computed values -------------------------------------------------------------------------

# 1-D points 0, 1 (class 0) and 0.5, 3 (class 1): d01 = 1, d02 = .5, d03 = 3, d12 = .5, d13 = 2,
# d23 = 2.5, all exact in float32.
LINE_X = [[0.0], [1.0], [0.5], [3.0]]
LINE_Y = [0, 0, 1, 1]


@functools.lru_cache(maxsize=None)
def _jitted_loss(name, options_items):
  return jax.jit(losses.get_loss(name, **dict(options_items)))


def _loss(name, x, y, **options):
  fn = _jitted_loss(name, tuple(sorted(options.items())))
  return float(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y)))


def test_hand_computed_triplets():
  # Semi-hard, margin 1: (0,1) picks 3 -> 0; (1,0) picks 2 -> 0; (2,3) has no negative beyond
  # 2.5 and takes the farthest, .5 -> 3; (3,2) picks 3 -> .5. Mean over 4 pairs.
  assert _loss("triplet_semihard", LINE_X, LINE_Y, margin=1.0) == pytest.approx(3.5 / 4, rel=1e-6)
  # Hard: anchors 0..3: 1 - .5 + 1, 1 - .5 + 1, 2.5 - .5 + 1, 2.5 - 2 + 1.
  assert _loss("triplet_hard", LINE_X, LINE_Y, margin=1.0) == pytest.approx(7.5 / 4, rel=1e-6)
  # All: active hinges 1.5 (0,1,2), 1.5 (1,0,2), 3 (2,3,0), 3 (2,3,1), .5 (3,2,0), 1.5 (3,2,1).
  assert _loss("triplet_all", LINE_X, LINE_Y, margin=1.0) == pytest.approx(11 / 6, rel=1e-6)
  # Soft all: gaps d_ap - d_an of the 8 triplets, averaged through softplus.
  gaps = [0.5, -2.0, 0.5, -1.0, 2.0, 2.0, -0.5, 0.5]
  assert _loss("triplet_all", LINE_X, LINE_Y, soft=True) == pytest.approx(
      np.mean(np.log1p(np.exp(gaps))), rel=1e-6)
  # Margin 0 semi-hard: the (2,3) fallback still counts 2.5 - .5; (3,2): 2.5 - 3 < 0.
  assert _loss("triplet_semihard", LINE_X, LINE_Y, margin=0.0) == pytest.approx(2.0 / 4, rel=1e-6)


def test_hand_computed_contrastive_and_lifted():
  # Pairs on the line: positives d01 = 1, d23 = 2.5 pulled with m+ = .5; negatives pushed to 1.
  pull = 2 * (0.5**2 + 2.0**2)
  push = 2 * (0.5**2 + 0.5**2)  # d02 = d12 = .5 < 1; d03, d13 >= 1 do not count
  assert _loss("contrastive", LINE_X, LINE_Y, pos_margin=0.5) == pytest.approx(
      (pull + push) / 12, rel=1e-6)
  # Lifted, margin 1: J01 = log(e^.5 + e^-2 + e^.5 + e^-1) + 1, J23 = log(e^.5 + e^.5 + e^-2
  # + e^-1) + 2.5 (negatives of 2: d20 = d21 = .5; of 3: d30 = 3, d31 = 2).
  j01 = np.log(2 * np.exp(0.5) + np.exp(-2.0) + np.exp(-1.0)) + 1.0
  j23 = np.log(2 * np.exp(0.5) + np.exp(-2.0) + np.exp(-1.0)) + 2.5
  assert _loss("lifted_structure", LINE_X, LINE_Y) == pytest.approx(
      (j01**2 + j23**2) / 4, rel=1e-6)


def test_hand_computed_pair_losses():
  # Two classes laid out as (anchor, positive) pairs along the axes.
  x = [[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]]
  y = [0, 1, 0, 1]
  # N-pairs: a0 = (1,0), p0 = (3,0), a1 = (0,2), p1 = (0,1); logits [[3, 0], [0, 2]].
  ce = (np.log(np.exp(3) + 1) - 3 + np.log(1 + np.exp(2)) - 2) / 2
  reg = 0.25 * 0.1 * ((1 + 4) / 2 + (9 + 1) / 2)
  assert _loss("npairs", x, y, l2_reg=0.1) == pytest.approx(ce + reg, rel=1e-6)
  # negatives="all": anchor 0 also sees (0,2), (0,1) with logits 0, 0; anchor 1 sees 0, 0.
  ce_all = (np.log(np.exp(3) + 2) - 3 + np.log(np.exp(2) + 2) - 2) / 2
  assert _loss("npairs", x, y, l2_reg=0.0, negatives="all") == pytest.approx(ce_all, rel=1e-6)
  # Angular, alpha = 45 (t = 1): normalised pairs coincide, f = 4 * 0 - 2 * 2 * 1 = -4.
  assert _loss("angular", x, y) == pytest.approx(np.log1p(np.exp(-4.0)), rel=1e-5)
  # alpha = 60 (t = 3): f = -2 * 4 = -8.
  assert _loss("angular", x, y, alpha_degrees=60.0) == pytest.approx(np.log1p(np.exp(-8.0)),
                                                                     rel=1e-4)


def test_hand_computed_multi_similarity():
  # S01 = .6, S02 = 0, S12 = .8. Anchor 0 keeps nothing (.6 >= 0 + .1; 0 <= .6 - .1); anchor 1
  # keeps p = 0 (.6 < .8 + .1) and n = 2 (.8 > .6 - .1); anchor 2 has no positive.
  x = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
  expected = (np.log1p(np.exp(-2 * 0.1)) / 2 + np.log1p(np.exp(10 * 0.3)) / 10) / 3
  assert _loss("multi_similarity", x, [0, 0, 1], beta=10.0) == pytest.approx(expected, rel=1e-6)


# --- Transformations: jit, grad, vmap -------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_vmap_over_batches_matches_loop(name):
  xs, ys = zip(*(random_batch(40 + i) for i in range(3)))
  xs = jnp.asarray(np.stack(xs), jnp.float32)
  ys = jnp.asarray(np.stack(ys))
  loss_fn = losses.get_loss(name)
  batched = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))(xs, ys)
  for i in range(3):
    value, grad = value_and_grad(name, xs[i], ys[i])
    np.testing.assert_allclose(batched[0][i], value, rtol=1e-5)
    assert_grad_close(np.asarray(batched[1][i]), grad)


def test_vmap_over_margins():
  x, y = random_batch(50)
  margins = jnp.array([0.0, 0.2, 0.7])
  values = jax.jit(jax.vmap(lambda m: losses.triplet_loss(jnp.asarray(x, jnp.float32), y, margin=m,
                                                          mining="all")))(margins)
  for m, value in zip([0.0, 0.2, 0.7], values):
    np.testing.assert_allclose(value, ref_triplet(x, y, margin=m, mining="all"), rtol=1e-5)


def test_gradients_with_respect_to_hyperparameters():
  x, y = random_batch(51)
  xj = jnp.asarray(x, jnp.float32)
  # Batch-all is sum(l) / #(l > 0), and each active l grows by 1 with the margin: slope 1.
  slope = jax.jit(jax.grad(lambda m: losses.triplet_loss(xj, y, margin=m, mining="all")))(0.3)
  np.testing.assert_allclose(slope, 1.0, rtol=1e-5)
  # N-pairs: d/d lambda = (mean |a|^2 + mean |p|^2) / 4 over the (first, second) pairs.
  pairs = _first_two(y)
  expected = 0.25 * (np.mean([x[a] @ x[a] for a, _ in pairs])
                     + np.mean([x[p] @ x[p] for _, p in pairs]))
  slope = jax.jit(jax.grad(lambda r: losses.npairs_loss(xj, y, l2_reg=r)))(0.1)
  np.testing.assert_allclose(slope, expected, rtol=1e-5)


# --- Edge cases: always finite, degenerate batches give 0 -----------------------------------------


def _finite_value_and_grad(name, x, y, **options):
  value, grad = value_and_grad(name, x, y, **options)
  assert np.isfinite(value), (name, value)
  assert np.all(np.isfinite(grad)), name
  return value, grad


EDGE_OPTIONS = [(name, {}) for name in ALL_NAMES] + [
    ("triplet_semihard", {"distance": "cosine"}), ("triplet_all", {"soft": True}),
    ("triplet_hard", {"distance": "squared_euclidean"}), ("npairs", {"negatives": "all"})]


@pytest.mark.parametrize("name,options", EDGE_OPTIONS,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in EDGE_OPTIONS])
def test_edge_cases_are_finite(name, options):
  x, _ = random_batch(60)
  x = jnp.asarray(x, jnp.float32)
  paired = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
  distinct = list(range(12))
  single = [5] * 12
  # No positive pair: nothing to compare except contrastive's pushes.
  value, _ = _finite_value_and_grad(name, x, distinct, **options)
  if name != "contrastive":
    assert value == 0.0
  # One class: nothing to contrast except contrastive's pulls and N-pairs' one pair.
  value, _ = _finite_value_and_grad(name, x, single, **options)
  if name not in ("contrastive", "npairs", "npairs_angular"):
    assert value == 0.0
  # Identical embeddings (every distance 0), zero vectors, huge norms, bfloat16.
  _finite_value_and_grad(name, jnp.ones((12, 4)), paired, **options)
  _finite_value_and_grad(name, jnp.zeros((12, 4)), paired, **options)
  _finite_value_and_grad(name, x.at[:3].set(0.0), paired, **options)
  _finite_value_and_grad(name, 1e4 * x / jnp.linalg.norm(x, axis=1, keepdims=True), paired,
                         **options)
  low, _ = _finite_value_and_grad(name, x.astype(jnp.bfloat16), paired, **options)
  full, _ = _finite_value_and_grad(name, x.astype(jnp.bfloat16).astype(jnp.float32), paired,
                                   **options)
  np.testing.assert_allclose(low, full, rtol=1e-6)  # bfloat16 inputs are upcast, not truncated
  # A batch of one.
  value, _ = _finite_value_and_grad(name, x[:1], [0], **options)
  assert value == 0.0


# --- Invariances ----------------------------------------------------------------------------------


def _order_preserving_permutation(y, rng):
  """A batch permutation that keeps each class's samples in their original relative order."""
  perm = rng.permutation(len(y))
  new_order = np.empty(len(y), int)
  for label in np.unique(y):
    slots = np.sort(np.flatnonzero(y[perm] == label))
    new_order[slots] = np.flatnonzero(y == label)
  return new_order


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permutation_and_rotation_invariance(name):
  x, y = random_batch(70)
  rng = np.random.default_rng(71)
  value, _ = value_and_grad(name, x, y)
  # N-pairs and angular pick pairs in batch order, so their permutations keep that order.
  if name in ("npairs", "angular", "npairs_angular"):
    perm = _order_preserving_permutation(y, rng)
  else:
    perm = rng.permutation(len(y))
  permuted, _ = value_and_grad(name, x[perm], y[perm])
  np.testing.assert_allclose(permuted, value, rtol=1e-5)
  rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  rotated, _ = value_and_grad(name, x @ rotation, y)
  np.testing.assert_allclose(rotated, value, rtol=1e-5)


@pytest.mark.parametrize("name", ["angular", "multi_similarity"])
def test_scale_invariance(name):
  x, y = random_batch(72)
  value, _ = value_and_grad(name, x, y)
  for scale in [0.01, 3.0, 250.0]:
    np.testing.assert_allclose(value_and_grad(name, scale * x, y)[0], value, rtol=1e-5)


# --- Errors ---------------------------------------------------------------------------------------


X = jnp.ones((4, 3))
Y = jnp.array([0, 0, 1, 1])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_input_errors_name_the_argument(name):
  fn = losses.get_loss(name)
  with pytest.raises(ValueError, match="embeddings must have rank 2"):
    fn(jnp.ones(4), Y)
  with pytest.raises(ValueError, match="labels must have rank 1"):
    fn(X, Y[:, None])
  with pytest.raises(ValueError, match="4 rows but labels has 3"):
    fn(X, Y[:3])
  with pytest.raises(ValueError, match="labels must be integers"):
    fn(X, Y.astype(jnp.float32))
  with pytest.raises(ValueError, match="embeddings must be floating point"):
    fn(X.astype(jnp.int32), Y)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.triplet_loss(X, Y, mining="hardest"), "mining='hardest'"),
    (lambda: losses.triplet_loss(X, Y, distance="manhattan"), "distance='manhattan'"),
    (lambda: losses.contrastive_loss(X, Y, distance="dot"), "distance='dot'"),
    (lambda: losses.triplet_loss(X, Y, margin=-0.1), "margin must be"),
    (lambda: losses.triplet_loss(X, Y, soft="yes"), "soft must be True or False"),
    (lambda: losses.contrastive_loss(X, Y, neg_margin=-1.0), "neg_margin must be"),
    (lambda: losses.contrastive_loss(X, Y, pos_margin=-1.0), "pos_margin must be"),
    (lambda: losses.lifted_structure_loss(X, Y, margin=-1.0), "margin must be"),
    (lambda: losses.npairs_loss(X, Y, l2_reg=-1.0), "l2_reg must be"),
    (lambda: losses.npairs_loss(X, Y, negatives="hard"), "negatives='hard'"),
    (lambda: losses.angular_loss(X, Y, alpha_degrees=90.0), "alpha_degrees must be in"),
    (lambda: losses.angular_loss(X, Y, alpha_degrees=0.0), "alpha_degrees must be in"),
    (lambda: losses.npairs_angular_loss(X, Y, angular_weight=-2.0), "angular_weight must be"),
    (lambda: losses.multi_similarity_loss(X, Y, alpha=0.0), "alpha must be"),
    (lambda: losses.multi_similarity_loss(X, Y, beta=-1.0), "beta must be"),
    (lambda: losses.multi_similarity_loss(X, Y, epsilon=-0.1), "epsilon must be"),
])
def test_option_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_options_are_keyword_only():
  with pytest.raises(TypeError):
    losses.triplet_loss(X, Y, 0.2)  # pylint: disable=too-many-function-args


def test_get_loss_names():
  # The config names' values are checked against the references above; here, the mapping.
  for name, mode in [("triplet_semihard", "semihard"), ("triplet_hard", "hard"),
                     ("triplet_all", "all")]:
    fn = losses.get_loss(name, margin=0.3)
    assert fn.func is losses.triplet_loss and fn.keywords == {"margin": 0.3, "mining": mode}
  for name in ["contrastive", "npairs", "angular", "npairs_angular", "lifted_structure",
               "multi_similarity"]:
    fn = getattr(losses, f"{name}_loss")
    assert losses.get_loss(name).func is fn
  assert losses.get_loss("npairs", l2_reg=0.5).keywords == {"l2_reg": 0.5}
  with pytest.raises(ValueError, match="Unknown loss 'tripplet'.*triplet_semihard"):
    losses.get_loss("tripplet")
  with pytest.raises(ValueError, match="does not take alpha"):
    losses.get_loss("triplet_hard", alpha=1.0)
  with pytest.raises(ValueError, match="means mining='hard'"):
    losses.get_loss("triplet_hard", mining="all")


# --- Memory: B = 4096, D = 512 under 1 GiB --------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from rankjax import losses
    name, layout = sys.argv[1:]
    batch, dim = 4096, 512
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, dim)) / np.sqrt(dim), jnp.float32)
    if layout == "balanced":  # P x K batches of 4 per class: positive slots
      labels = jnp.repeat(jnp.arange(batch // 4), 4)
    else:  # 16 classes of 256: sorted rows
      labels = jnp.arange(batch) % 16
    value, grad = jax.jit(jax.value_and_grad(losses.get_loss(name)))(x, labels)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad))), name
    # VmHWM: this process image's peak resident set. (ru_maxrss would not do: Linux carries it
    # over from the parent through fork and exec.)
    print([int(line.split()[1]) // 1024 for line in open("/proc/self/status")
           if line.startswith("VmHWM")][0])
""")


def test_memory_at_batch_4096_is_under_one_gib():
  # Each loss's jitted value-and-grad runs in a fresh process; VmHWM is its peak resident set.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = [(name, "balanced") for name in ALL_NAMES]
  runs += [("triplet_semihard", "few_classes"), ("triplet_all", "few_classes")]
  peaks = {}
  for start in range(0, len(runs), 3):  # three at a time
    procs = {run: subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, *run], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run in runs[start:start + 3]}
    for run, proc in procs.items():
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-2000:]
      peaks[run] = int(out.split()[-1])
  assert max(peaks.values()) < 1024, f"peak RSS in MiB: {peaks}"


def test_demo_prints_every_loss(capsys):
  from rankjax import demo  # pylint: disable=import-outside-toplevel
  demo.main(["--classes", "4", "--per-class", "3"])
  lines = capsys.readouterr().out.splitlines()
  rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()
          and line.split()[0] in demo.LOSS_NAMES}
  assert sorted(rows) == sorted(demo.LOSS_NAMES)
  for name, (pixels, chance, _) in rows.items():
    assert np.isfinite(float(pixels)) and np.isfinite(float(chance)), name
