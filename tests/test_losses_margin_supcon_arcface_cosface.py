"""The later baselines (margin, SupCon, ArcFace, CosFace, sub-center ArcFace) against float64
references written from their papers' formulas, loop by loop, with no code shared with rankjax.

Values must match to 1e-5 relative in float32 and gradients to central finite differences of the
references (elementwise ``rtol=1e-5`` with an absolute floor of 1e-5 x the largest entry, as in
test_losses.py). The margin loss samples its negatives: its reference takes the sampled indices
as input, and the sampling itself is checked against the paper's weights (the probabilities
before sampling, and the frequencies of many draws).
"""

import doctest
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.extend import core as jax_core

from rankjax import configs
from rankjax import losses
from rankjax import similarity
from rankjax.losses import arcface as arcface_module
from rankjax.losses import cosface as cosface_module
from rankjax.losses import margin as margin_module
from rankjax.losses import supcon as supcon_module
from test_losses import assert_grad_close, numeric_grad  # pylint: disable=g-bad-import-order

# --- Float64 references, straight from the formulas ----------------------------------------------


def unit(v):
  norm = np.linalg.norm(v)
  return v / norm if norm > 0 else v


def references_of(x, y, refs, ref_y):
  """(reference vectors, their labels, whether anchor i and reference i are the same sample)."""
  if refs is None:
    return x, y, True
  return refs, ref_y, False


def ref_supcon(x, y, temperature=0.1, refs=None, ref_y=None):
  r, ry, is_self = references_of(x, y, refs, ref_y)
  u = [unit(v) for v in x]
  w = [unit(v) for v in r]
  per_anchor = []
  for i in range(len(y)):
    others = [a for a in range(len(ry)) if not (is_self and a == i)]
    positives = [p for p in others if ry[p] == y[i]]
    if not positives:
      continue
    logits = {a: u[i] @ w[a] / temperature for a in others}
    peak = max(logits.values())
    log_normaliser = peak + np.log(sum(np.exp(v - peak) for v in logits.values()))
    per_anchor.append(-np.mean([logits[p] - log_normaliser for p in positives]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def ref_margin_softmax(x, y, cosines_fn, target_fn, scale):
  total = 0.0
  for i in range(len(y)):
    cosines = cosines_fn(unit(x[i]))
    logits = [scale * (target_fn(c) if j == y[i] else c) for j, c in enumerate(cosines)]
    peak = max(logits)
    total -= logits[y[i]] - (peak + np.log(sum(np.exp(z - peak) for z in logits)))
  return total / len(y)


def ref_arcface_target(c, margin):
  # Deng et al.: cos(theta + m) while theta + m stays below pi; beyond, insightface's
  # cos(theta) - m sin(m). Written in angles here (the implementation works with cosines).
  theta = np.arccos(np.clip(c, -1.0, 1.0))
  return np.cos(theta + margin) if theta < np.pi - margin else c - margin * np.sin(margin)


def ref_arcface(x, y, proxies, scale=64.0, margin_degrees=28.6):
  m = np.deg2rad(margin_degrees)
  return ref_margin_softmax(x, y, lambda u: [u @ unit(w) for w in proxies],
                            lambda c: ref_arcface_target(c, m), scale)


def ref_subcenter_arcface(x, y, proxies, scale=64.0, margin_degrees=28.6, sub_centers=3):
  m = np.deg2rad(margin_degrees)
  return ref_margin_softmax(
      x, y, lambda u: [max(u @ unit(proxies[j, k]) for k in range(sub_centers))
                       for j in range(len(proxies))],
      lambda c: ref_arcface_target(c, m), scale)


def ref_cosface(x, y, proxies, scale=64.0, margin=0.35):
  return ref_margin_softmax(x, y, lambda u: [u @ unit(w) for w in proxies], lambda c: c - margin,
                            scale)


def q_inverse(d, n):
  """1 / q(d), q(d) = d^(n-2) (1 - d^2/4)^((n-3)/2): the density of distances on the sphere."""
  with np.errstate(divide="ignore"):
    return d ** (2.0 - n) * (1.0 - d * d / 4.0) ** (-(n - 3.0) / 2.0)


def ref_probabilities(x, y, cutoff=0.5, nonzero_loss_cutoff=1.4, refs=None, ref_y=None):
  """Pr(n | a) proportional to min(lambda, q(d_an)^-1) over negatives closer than the cutoff."""
  r, ry, _ = references_of(x, y, refs, ref_y)
  n = x.shape[1]
  cap = q_inverse(cutoff, n)  # lambda: the weight at the cutoff distance
  out = np.zeros((len(y), len(ry)))
  for a in range(len(y)):
    for k in range(len(ry)):
      d = np.linalg.norm(unit(x[a]) - unit(r[k]))
      if ry[k] != y[a] and d < nonzero_loss_cutoff:
        out[a, k] = min(cap, q_inverse(d, n))
    if out[a].sum() > 0:
      out[a] /= out[a].sum()
  return out


def ref_margin(x, y, negatives, margin=0.2, beta=1.2, nu=0.0, cutoff=0.5,
               nonzero_loss_cutoff=1.4, refs=None, ref_y=None):
  """Wu et al.'s margin loss over every positive pair and its given negative ``negatives[a, p]``."""
  r, ry, is_self = references_of(x, y, refs, ref_y)
  u = [unit(v) for v in x]
  w = [unit(v) for v in r]
  total, active = 0.0, 0
  for a in range(len(y)):
    b = beta if np.ndim(beta) == 0 else beta[y[a]]
    distances = [np.linalg.norm(u[a] - w[k]) for k in range(len(ry))]
    has_negative = any(ry[k] != y[a] and max(distances[k], cutoff) < nonzero_loss_cutoff
                       for k in range(len(ry)))
    for p in range(len(ry)):
      if (is_self and p == a) or ry[p] != y[a]:
        continue
      pull = max(0.0, margin + distances[p] - b)
      total += pull + nu * b
      active += pull > 0
      if has_negative:
        n = negatives[a, p]
        assert ry[n] != y[a]
        push = max(0.0, margin - distances[n] + b)
        total += push
        active += push > 0
  return total / active if active else 0.0


# --- Batches --------------------------------------------------------------------------------------


def random_batch(seed, batch=12, dim=4, classes=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32).astype(np.float64)
  y = rng.integers(0, classes, size=batch)
  return x, y


def random_proxies(seed, classes=6, dim=4, sub_centers=None):
  shape = (classes, dim) if sub_centers is None else (classes, sub_centers, dim)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32).astype(np.float64)


def f32(x):
  return jnp.asarray(x, jnp.float32)


# --- SupCon ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_matches_reference_values_and_gradients(temperature):
  fn = jax.jit(jax.value_and_grad(
      lambda x, y: losses.supcon_loss(x, y, temperature=temperature)))
  for seed in range(3):
    x, y = random_batch(seed)
    y[0] = 99  # one anchor without a positive: it does not count
    value, grad = fn(f32(x), jnp.asarray(y))
    expected = ref_supcon(x, y, temperature)
    assert expected > 0
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert_grad_close(np.asarray(grad), numeric_grad(lambda z: ref_supcon(z, y, temperature), x))


def test_supcon_with_one_positive_per_anchor_is_optax_ntxent():
  # optax.losses.ntxent: per positive pair, -log(e^s_ip / (e^s_ip + sum_n e^s_in)), averaged over
  # the pairs: SupCon's L_out when P(i) = {p} (A(i) is then {p} and the negatives).
  ours = jax.jit(jax.value_and_grad(
      lambda x, y, t: losses.supcon_loss(x, y, temperature=t)))
  theirs = jax.jit(jax.value_and_grad(optax.losses.ntxent))
  for seed in range(3):
    x, _ = random_batch(seed, batch=10)
    y = jnp.asarray(np.random.default_rng(seed).permutation(np.arange(10) // 2))
    for temperature in [0.07, 0.3]:
      value, grad = ours(f32(x), y, temperature)
      expected, expected_grad = theirs(f32(x), y, temperature)
      np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
      assert_grad_close(np.asarray(grad), np.asarray(expected_grad))


def test_supcon_hand_computed_and_empty():
  x = f32([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  expected = (np.log(np.exp(0.6) + 1.0) - 0.6 + np.log(np.exp(0.6) + np.exp(0.8)) - 0.6) / 2
  assert float(losses.supcon_loss(x, jnp.array([0, 0, 1]), temperature=1.0)) == pytest.approx(
      expected, rel=1e-6)
  assert float(losses.supcon_loss(x, jnp.array([0, 1, 2]))) == 0.0  # no anchor has a positive


# --- The proxy losses: ArcFace, CosFace, sub-center ArcFace ---------------------------------------

PROXY_CASES = [
    ("arcface", {}, ref_arcface, None),
    ("arcface", {"scale": 8.0, "margin_degrees": 40.0}, ref_arcface, None),
    ("cosface", {}, ref_cosface, None),
    ("cosface", {"scale": 16.0, "margin": 0.1}, ref_cosface, None),
    ("subcenter_arcface", {}, ref_subcenter_arcface, 3),
    ("subcenter_arcface", {"scale": 8.0, "margin_degrees": 20.0, "sub_centers": 2},
     ref_subcenter_arcface, 2),
]


@pytest.mark.parametrize("name,options,reference,sub_centers", PROXY_CASES)
def test_proxy_losses_match_reference_values_and_gradients(name, options, reference,
                                                            sub_centers):
  fn = jax.jit(jax.value_and_grad(
      lambda x, y, p: losses.get_loss(name, **options)(x, y, proxies=p), argnums=(0, 2)))
  for seed in range(3):
    x, y = random_batch(seed, batch=10)
    proxies = random_proxies(seed + 10, sub_centers=sub_centers)
    if seed == 2:  # two samples almost opposite their proxy: theta + m > pi (the linear branch)
      true = proxies[y[:2]] if sub_centers is None else proxies[y[:2]].mean(axis=1)
      x[:2] = -true + 0.05 * x[:2]
    value, (gx, gp) = fn(f32(x), jnp.asarray(y), f32(proxies))
    expected = reference(x, y, proxies, **options)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert_grad_close(np.asarray(gx), numeric_grad(lambda z: reference(z, y, proxies, **options),
                                                   x))
    assert_grad_close(np.asarray(gp), numeric_grad(lambda z: reference(x, y, z, **options),
                                                   proxies))


def test_arcface_branch_beyond_pi_minus_m_is_the_papers_code():
  # cos(theta) <= cos(pi - m): psi = cos(theta) - m sin(m), not cos(theta + m) (which would rise).
  m = np.deg2rad(28.6)
  for theta in [np.pi - m - 0.1, np.pi - m + 0.1, np.pi - 1e-3, np.pi]:
    got = float(arcface_module.additive_angular_margin(jnp.float32(np.cos(theta)), jnp.float32(m)))
    expected = (np.cos(theta + m) if theta < np.pi - m else np.cos(theta) - m * np.sin(m))
    assert got == pytest.approx(expected, abs=2e-6), theta
  # Monotone: the target logit decreases with the angle over [0, pi].
  thetas = np.linspace(0.0, np.pi, 2001)
  psi = np.asarray(arcface_module.additive_angular_margin(f32(np.cos(thetas)), jnp.float32(m)))
  assert np.all(np.diff(psi) <= 1e-6)


def test_subcenter_with_one_center_is_arcface():
  x, y = random_batch(5, batch=10)
  proxies = random_proxies(6)
  one = losses.subcenter_arcface_loss(f32(x), y, proxies=f32(proxies[:, None]), sub_centers=1)
  np.testing.assert_allclose(float(one), float(losses.arcface_loss(f32(x), y,
                                                                   proxies=f32(proxies))),
                             rtol=1e-6)


def test_arcface_at_theta_zero_and_pi_is_finite():
  proxies = jnp.eye(3, 4)
  labels = jnp.array([0, 1, 2])
  for name in ["arcface", "subcenter_arcface", "cosface"]:
    p = proxies[:, None].repeat(3, 1) if name == "subcenter_arcface" else proxies
    fn = jax.jit(jax.value_and_grad(
        lambda x, p, name=name: losses.get_loss(name)(x, labels, proxies=p), argnums=(0, 1)))
    for sign, offset in [(-1.0, 0.0), (-1.0, 1e-4), (1.0, 0.0), (1.0, 1e-4)]:
      value, grads = fn(sign * proxies + offset, p)
      assert np.isfinite(float(value)), (name, sign, offset)
      assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), (name, sign, offset)


# --- Margin loss and distance-weighted sampling ---------------------------------------------------


@pytest.mark.parametrize("dim", [3, 8, 64])
def test_sampling_probabilities_are_the_papers_weights(dim):
  for seed in range(3):
    x, y = random_batch(seed, batch=12, dim=dim)
    for options in [{}, {"cutoff": 0.9, "nonzero_loss_cutoff": 1.6}]:
      got = np.asarray(losses.negative_sampling_probabilities(f32(x), y, **options))
      expected = ref_probabilities(x, y, **options)
      assert expected.sum() > 3  # several anchors can draw
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  # Against references: anchors from the batch, candidates from the references.
  refs, ref_y = random_batch(99, batch=9, dim=dim)
  got = losses.negative_sampling_probabilities(f32(x), y, ref_embeddings=f32(refs),
                                               ref_labels=ref_y)
  np.testing.assert_allclose(np.asarray(got), ref_probabilities(x, y, refs=refs, ref_y=ref_y),
                             rtol=1e-4, atol=1e-6)


def test_sampled_frequencies_follow_the_probabilities():
  # 40,000 draws per row: each frequency is binomial with sd sqrt(p(1-p)/N) <= 0.0025; a 5 sd
  # band misses with probability 6e-7 per cell (under 1e-4 over the 144 cells), and the key is
  # fixed, so the test is deterministic. Zero-probability cells must never be drawn.
  x, y = random_batch(3, batch=12, dim=3)
  probabilities = losses.negative_sampling_probabilities(f32(x), y)
  draws = 40_000
  index = np.asarray(jax.jit(losses.sample_negatives, static_argnums=2)(
      jax.random.key(7), probabilities, draws))
  p = np.asarray(probabilities, np.float64)
  counts = np.stack([np.bincount(row, minlength=p.shape[1]) for row in index]) / draws
  for a in range(len(p)):
    if p[a].sum() == 0:
      continue  # no candidate: the loss masks these draws
    band = 5 * np.sqrt(p[a] * (1 - p[a]) / draws)
    assert np.all(np.abs(counts[a] - p[a]) <= band + 1e-12), (a, counts[a], p[a])
    assert np.all(counts[a][p[a] == 0] == 0)
  assert (p > 0).sum() > 20


def test_sampling_never_draws_a_zero_weight_entry():
  # Many zero entries between small ones (the cumulative sum is flat over them).
  p = np.zeros((4, 4096), np.float32)
  p[0, ::97] = 1.0
  p[1, 5] = 1.0
  p[2, -1] = 1e-3
  p[2, 0] = 1.0
  p = p / np.maximum(p.sum(1, keepdims=True), 1e-30)
  index = np.asarray(losses.sample_negatives(jax.random.key(0), jnp.asarray(p), 20_000))
  assert np.all(p[np.arange(3)[:, None], index[:3]] > 0)
  assert np.all(index[3] == 0)  # an empty row draws index 0, masked by the loss


@functools.partial(jax.jit, static_argnames=("cutoff", "nonzero_loss_cutoff"))
def _jitted_negatives(key, x, y, refs, ref_y, **options):
  kwargs = {} if refs is None else {"ref_embeddings": refs, "ref_labels": ref_y}
  probabilities = losses.negative_sampling_probabilities(x, y, **options, **kwargs)
  return losses.sample_negatives(key, probabilities, probabilities.shape[1])


def _sampled_negatives(key, x, y, refs=None, ref_y=None, **options):
  """The negatives ``margin_loss(x, y, key=key, ...)`` draws: sample_negatives on its weights."""
  refs = None if refs is None else f32(refs)
  return np.asarray(_jitted_negatives(key, f32(x), jnp.asarray(y), refs, ref_y, **options))


MARGIN_CASES = [
    {},
    {"margin": 0.1, "beta": 1.0, "nu": 0.01},
    {"cutoff": 0.8, "nonzero_loss_cutoff": 1.8, "beta": 1.4},
    {"beta": "per_class", "nu": 0.05},
]


@pytest.mark.parametrize("options", MARGIN_CASES, ids=[str(o) for o in MARGIN_CASES])
def test_margin_matches_reference_values_and_gradients(options):
  options = dict(options)
  per_class = options.get("beta") == "per_class"
  cutoffs = {k: options[k] for k in ("cutoff", "nonzero_loss_cutoff") if k in options}
  fn = jax.jit(jax.value_and_grad(
      lambda x, y, b, key: losses.margin_loss(x, y, key=key, **{**options, "beta": b}),
      argnums=(0, 2)))
  for seed in range(3):
    x, y = random_batch(seed)
    beta = (np.random.default_rng(seed).uniform(0.9, 1.4, size=4) if per_class
            else options.get("beta", 1.2))
    kwargs = {**options, "beta": beta}
    key = jax.random.key(seed)
    negatives = _sampled_negatives(key, x, y, **cutoffs)
    value, (gx, gb) = fn(f32(x), jnp.asarray(y), f32(beta), key)
    expected = ref_margin(x, y, negatives, **kwargs)
    assert expected > 0
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert_grad_close(np.asarray(gx), numeric_grad(lambda z: ref_margin(z, y, negatives, **kwargs),
                                                   x))
    numeric_beta = numeric_grad(
        lambda b: ref_margin(x, y, negatives, **{**kwargs, "beta": b if per_class else b[0]}),
        np.atleast_1d(np.asarray(beta, np.float64)))
    assert_grad_close(np.atleast_1d(np.asarray(gb)), numeric_beta)


def test_margin_hand_computed():
  # On a circle: 0 and 1 at d = 1 (class 0), 2 at d = 1.3 from 0 and 0.366 from 1 (class 1): the
  # only negative, drawn by both pairs. Pulls 0; pushes 0.1 and 1.034.
  angles = np.array([0.0, np.pi / 3, 2 * np.arcsin(0.65)])
  x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  d12 = 2 * np.sin((angles[2] - angles[1]) / 2)
  value = losses.margin_loss(f32(x), jnp.array([0, 0, 1]), key=jax.random.key(1))
  assert float(value) == pytest.approx((0.1 + 0.2 - d12 + 1.2) / 2, rel=1e-5)
  # nu: + nu * beta per positive pair, over the same two active terms.
  value = losses.margin_loss(f32(x), jnp.array([0, 0, 1]), key=jax.random.key(1), nu=0.1)
  assert float(value) == pytest.approx((0.1 + 0.2 - d12 + 1.2 + 2 * 0.12) / 2, rel=1e-5)


def test_margin_keys_give_reproducible_and_different_samples():
  x, y = random_batch(11, batch=24, classes=4)
  fn = jax.jit(lambda key: losses.margin_loss(f32(x), y, key=key))
  values = [float(fn(jax.random.key(k))) for k in range(6)]
  assert float(fn(jax.random.key(0))) == values[0]
  assert len(set(values)) > 1
  # vmap over keys (e.g. several draws at once) equals the loop.
  batched = jax.vmap(fn)(jax.random.split(jax.random.key(5), 3))
  for value, key in zip(batched, jax.random.split(jax.random.key(5), 3)):
    np.testing.assert_allclose(float(value), float(fn(key)), rtol=1e-6)


# --- Reference sets -------------------------------------------------------------------------------


def test_reference_sets_equal_the_formula_over_batch_by_references():
  supcon = jax.jit(jax.value_and_grad(
      lambda x, y, r, ry: losses.supcon_loss(x, y, ref_embeddings=r, ref_labels=ry),
      argnums=(0, 2)))
  margin = jax.jit(jax.value_and_grad(
      lambda x, y, r, ry, key: losses.margin_loss(x, y, key=key, ref_embeddings=r,
                                                  ref_labels=ry)))
  for seed in range(3):
    x, y = random_batch(seed, batch=8)
    refs, ref_y = random_batch(seed + 50, batch=11)
    # SupCon: value and gradients with respect to both batch and references.
    value, (gx, gr) = supcon(f32(x), y, f32(refs), ref_y)
    np.testing.assert_allclose(float(value), ref_supcon(x, y, refs=refs, ref_y=ref_y), rtol=1e-5)
    assert_grad_close(np.asarray(gx), numeric_grad(
        lambda z: ref_supcon(z, y, refs=refs, ref_y=ref_y), x))
    assert_grad_close(np.asarray(gr), numeric_grad(
        lambda z: ref_supcon(x, y, refs=z, ref_y=ref_y), refs))
    # Margin: the sampled negatives index the references.
    key = jax.random.key(seed)
    negatives = _sampled_negatives(key, x, y, refs, ref_y)
    value, gx = margin(f32(x), y, f32(refs), ref_y, key)
    expected = ref_margin(x, y, negatives, refs=refs, ref_y=ref_y)
    assert expected > 0
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert_grad_close(np.asarray(gx), numeric_grad(
        lambda z: ref_margin(z, y, negatives, refs=refs, ref_y=ref_y), x))


def test_given_references_are_a_separate_set():
  # With the batch passed as references, each sample meets its own copy (a positive at cosine 1),
  # unlike ref_embeddings=None, which leaves the diagonal out.
  x, y = random_batch(4, batch=10)
  as_refs = losses.supcon_loss(f32(x), y, ref_embeddings=f32(x), ref_labels=y)
  np.testing.assert_allclose(float(as_refs), ref_supcon(x, y, refs=x, ref_y=y), rtol=1e-5)
  assert abs(float(as_refs) - float(losses.supcon_loss(f32(x), y))) > 1e-3


@pytest.mark.parametrize("call,match", [
    (lambda: losses.supcon_loss(jnp.ones((4, 3)), jnp.arange(4), ref_embeddings=jnp.ones((5, 3))),
     "both ref_embeddings and ref_labels"),
    (lambda: losses.margin_loss(jnp.ones((4, 3)), jnp.arange(4), key=jax.random.key(0),
                                ref_embeddings=jnp.ones((5, 2)), ref_labels=jnp.arange(5)),
     "dimension 2 but embeddings have 3"),
    (lambda: losses.supcon_loss(jnp.ones((4, 3)), jnp.arange(4), ref_embeddings=jnp.ones((5, 3)),
                                ref_labels=jnp.arange(4)), "5 rows but ref_labels has 4"),
    (lambda: losses.supcon_loss(jnp.ones((4, 3)), jnp.arange(4), ref_embeddings=jnp.ones((5, 3)),
                                ref_labels=jnp.ones(5)), "ref_labels must be integers"),
])
def test_reference_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --- Precision of the pairwise and proxy dot products ---------------------------------------------


def _dot_precisions(jaxpr):
  """The precision of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else [param]):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += _dot_precisions(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += _dot_precisions(sub)
  return found


def _loss_call(name, precision_kwargs):
  x = jnp.ones((6, 4)).at[:, 0].set(jnp.arange(6.0))
  y = jnp.array([0, 0, 1, 1, 2, 2])
  fn = losses.get_loss(name)
  if name == "margin":
    return lambda x: fn(x, y, key=jax.random.key(0), **precision_kwargs), x
  if name in ("arcface", "cosface", "subcenter_arcface"):
    p = jnp.ones((3, 3, 4) if name == "subcenter_arcface" else (3, 4))
    return lambda x: fn(x, y, proxies=p, **precision_kwargs), x
  return lambda x: fn(x, y, **precision_kwargs), x


@pytest.mark.parametrize("name", ["margin", "supcon", "arcface", "cosface", "subcenter_arcface"])
def test_precision_reaches_every_dot_product(name):
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  default = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)
  for kwargs, expected in [({}, highest), ({"precision": "highest"}, highest),
                           ({"precision": jax.lax.Precision.DEFAULT}, default),
                           ({"precision": None}, None)]:
    fn, x = _loss_call(name, kwargs)
    precisions = _dot_precisions(jax.make_jaxpr(jax.value_and_grad(fn))(x).jaxpr)
    assert len(precisions) >= 2, precisions  # the forward product and its transpose
    assert all(p == expected for p in precisions), (kwargs, precisions)
  with pytest.raises(ValueError, match="precision='fast' is not a matmul precision"):
    _loss_call(name, {"precision": "fast"})[0](x)


# --- Labels outside the proxies' (or betas') range ------------------------------------------------


def _out_of_range_losses():
  p = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  sub = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 4)), jnp.float32)
  return {
      "proxy_anchor": lambda x, y: losses.proxy_anchor_loss(x, y, proxies=p),
      "normalized_softmax": lambda x, y: losses.normalized_softmax_loss(x, y, proxies=p),
      "arcface": lambda x, y: losses.arcface_loss(x, y, proxies=p),
      "cosface": lambda x, y: losses.cosface_loss(x, y, proxies=p),
      "subcenter_arcface": lambda x, y: losses.subcenter_arcface_loss(x, y, proxies=sub),
      "margin_per_class_beta": lambda x, y: losses.margin_loss(
          x, y, key=jax.random.key(0), beta=jnp.full((3,), 1.2)),
  }


@pytest.mark.parametrize("name", list(_out_of_range_losses()))
def test_labels_outside_the_range_raise_eagerly_and_are_nan_or_a_checkify_error_under_jit(name):
  fn = _out_of_range_losses()[name]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  bad = jnp.array([0, 1, 2, 3, 4, 5])  # 3 proxies (or betas), labels up to 5
  good = jnp.array([0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 0 to 5"):
    fn(x, bad)
  # Under jit: the loss and all its gradients are NaN (the documented rule), never a number.
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  value, grad = value_and_grad(x, bad)
  assert np.isnan(float(value)) and bool(jnp.all(jnp.isnan(grad)))
  value, grad = value_and_grad(x, good)
  assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
  # checkify: an error naming the range, usable by the caller; none for good labels.
  checked = checkify.checkify(jax.jit(fn))
  err, _ = checked(x, bad)
  with pytest.raises(checkify.JaxRuntimeError, match=r"labels must lie in \[0, 3\).*0 to 5"):
    err.throw()
  err, value = checked(x, good)
  assert err.get() is None and np.isfinite(float(value))
  err, _ = checkify.checkify(value_and_grad)(x, jnp.array([0, 0, 1, 1, 2, -1]))
  assert err.get() is not None and "from -1 to 2" in err.get()


def test_proxy_gradients_are_nan_too_for_an_out_of_range_label():
  p = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  for fn in [losses.proxy_anchor_loss, losses.normalized_softmax_loss, losses.arcface_loss,
             losses.cosface_loss]:
    grad = jax.jit(jax.grad(lambda p, y, fn=fn: fn(x, y, proxies=p)))(p, jnp.array([0, 1, 2, 3, 4,
                                                                                     5]))
    assert bool(jnp.all(jnp.isnan(grad))), fn.__name__


# --- Edge cases: always finite --------------------------------------------------------------------

NEW_LOSSES = ["margin", "supcon", "arcface", "cosface", "subcenter_arcface"]


def _value_and_grad_fn(name):
  fn = losses.get_loss(name)
  if name == "margin":
    return jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, key=jax.random.key(3))))
  if name in ("arcface", "cosface", "subcenter_arcface"):
    shape = (12, 3, 4) if name == "subcenter_arcface" else (12, 4)
    p = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)
    return jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, proxies=p)))
  return jax.jit(jax.value_and_grad(fn))


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_edge_cases_are_finite(name):
  fn = _value_and_grad_fn(name)

  def finite(x, y):
    value, grad = fn(x, jnp.asarray(y))
    assert np.isfinite(float(value)), (name, value)
    assert bool(jnp.all(jnp.isfinite(grad))), name
    return float(value)

  x, _ = random_batch(60)
  x = f32(x)
  paired = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
  distinct = list(range(12))
  single = [5] * 12
  value = finite(x, distinct)  # no positive pair
  if name in ("margin", "supcon"):
    assert value == 0.0
  finite(x, single)  # one class: margin and supcon still have their positive terms
  finite(jnp.ones((12, 4)), paired)  # identical embeddings
  finite(jnp.zeros((12, 4)), paired)
  finite(x.at[:3].set(0.0), paired)
  finite(1e4 * x / jnp.linalg.norm(x, axis=1, keepdims=True), paired)
  low = finite(x.astype(jnp.bfloat16), paired)
  full = finite(x.astype(jnp.bfloat16).astype(jnp.float32), paired)
  np.testing.assert_allclose(low, full, rtol=1e-6)  # bfloat16 inputs are upcast, not truncated
  value = finite(x[:1], [0])
  if name in ("margin", "supcon"):
    assert value == 0.0


def test_margin_beta_gradient_is_finite_on_degenerate_batches():
  grad_fn = jax.jit(jax.grad(lambda b, x, y: losses.margin_loss(x, y, beta=b, nu=0.1,
                                                                 key=jax.random.key(0))))
  for x in [jnp.zeros((8, 4)), jnp.ones((8, 4)), 1e4 * jnp.eye(8, 4)]:
    g = grad_fn(jnp.full((4,), 1.2), x, jnp.arange(8) // 2)
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_vmap_over_batches_matches_loop(name):
  fn = _value_and_grad_fn(name)
  xs, ys = zip(*(random_batch(40 + i) for i in range(3)))
  xs, ys = f32(np.stack(xs)), jnp.asarray(np.stack(ys))
  batched = jax.jit(jax.vmap(fn))(xs, ys)
  for i in range(3):
    value, grad = fn(xs[i], ys[i])
    np.testing.assert_allclose(batched[0][i], value, rtol=1e-5)
    assert_grad_close(np.asarray(batched[1][i]), np.asarray(grad))


# --- Registry, configs, options -------------------------------------------------------------------


def test_registry_and_config_tables():
  for name, fn in [("margin", losses.margin_loss), ("supcon", losses.supcon_loss),
                   ("arcface", losses.arcface_loss), ("cosface", losses.cosface_loss),
                   ("subcenter_arcface", losses.subcenter_arcface_loss)]:
    assert losses.get_loss(name).func is fn
    # The options the loss takes: the table less the keys of its learned parameters.
    options = configs.loss_kwargs(configs.with_loss(configs.base_config(), name))
    assert losses.get_loss(name, **options).keywords == options
    assert losses.get_spec(name).normalize
  proxy_losses = {n for n, s in losses.CATALOGUE.items() if s.learns_proxies}
  assert proxy_losses == {"proxy_anchor", "normalized_softmax", "arcface", "cosface",
                          "subcenter_arcface"}
  assert {n for n, s in losses.CATALOGUE.items() if s.takes_key} == {"margin"}
  assert set(losses.get_spec("margin").params) == {"beta"}
  with pytest.raises(TypeError, match="key"):
    losses.get_loss("margin")(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]))


@pytest.mark.parametrize("call,match", [
    (lambda: losses.arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]), proxies=jnp.eye(2, 3),
                                 margin_degrees=180.0), r"margin_degrees must be in \[0, 180\)"),
    (lambda: losses.arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]), proxies=jnp.eye(2, 3),
                                 scale=0.0), "scale must be"),
    (lambda: losses.arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]), proxies=jnp.eye(2, 4)),
     r"proxies must have shape \[num_classes, 3\]"),
    (lambda: losses.cosface_loss(jnp.ones((2, 3)), jnp.array([0, 1]), proxies=jnp.eye(2, 3),
                                 margin=-0.1), "margin must be"),
    (lambda: losses.subcenter_arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]),
                                           proxies=jnp.ones((2, 3))),
     r"proxies must have shape \[num_classes, sub_centers=3, 3\]"),
    (lambda: losses.subcenter_arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]),
                                           proxies=jnp.ones((2, 2, 3))), "sub_centers=3"),
    (lambda: losses.subcenter_arcface_loss(jnp.ones((2, 3)), jnp.array([0, 1]),
                                           proxies=jnp.ones((2, 2, 3)), sub_centers=0),
     "sub_centers must be a positive integer"),
    (lambda: losses.supcon_loss(jnp.ones((2, 3)), jnp.array([0, 1]), temperature=0.0),
     "temperature must be"),
    (lambda: losses.margin_loss(jnp.ones((2, 3)), jnp.array([0, 1]), key=jax.random.key(0),
                                cutoff=0.0), "cutoff must be"),
    (lambda: losses.margin_loss(jnp.ones((2, 3)), jnp.array([0, 1]), key=jax.random.key(0),
                                nu=-1.0), "nu must be"),
    (lambda: losses.margin_loss(jnp.ones((2, 3)), jnp.array([0, 1]), key=jax.random.key(0),
                                beta=jnp.ones((2, 2))), r"beta must be a scalar or have shape"),
    (lambda: losses.margin_loss(jnp.ones((2, 3)), jnp.array([0, 1]), key=jax.random.key(0),
                                margin=-0.2), "margin must be"),
])
def test_option_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_options_are_keyword_only():
  with pytest.raises(TypeError):
    # pylint: disable-next=too-many-function-args
    losses.supcon_loss(jnp.ones((2, 3)), jnp.array([0, 1]), 0.1)


@pytest.mark.parametrize("module", [margin_module, supcon_module, arcface_module, cosface_module,
                                    losses.proxies, similarity])
def test_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


# --- Memory: B = 4096, D = 512 under 1 GiB --------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from rankjax import losses
    name = sys.argv[1]
    batch, dim, per_class = 4096, 512, 4
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, dim)) / np.sqrt(dim), jnp.float32)
    labels = jnp.arange(batch) // per_class
    classes = batch // per_class
    fn = losses.get_loss(name)
    if name == "margin":
      loss = lambda x, p: fn(x, labels, key=jax.random.key(0), beta=p)
      p = jnp.full((classes,), 1.2)
    elif name == "supcon":
      loss = lambda x, p: fn(x, labels) + 0.0 * p
      p = jnp.zeros(())
    else:
      shape = (classes, 3, dim) if name == "subcenter_arcface" else (classes, dim)
      p = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
      loss = lambda x, p: fn(x, labels, proxies=p)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, p)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads), name
    # VmHWM: this process image's peak resident set (ru_maxrss would carry the parent's over).
    print([int(line.split()[1]) // 1024 for line in open("/proc/self/status")
           if line.startswith("VmHWM")][0])
""")


def test_memory_at_batch_4096_is_under_one_gib():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  peaks = {}
  for start in range(0, len(NEW_LOSSES), 3):  # three at a time
    procs = {name: subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, name], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in NEW_LOSSES[start:start + 3]}
    for name, proc in procs.items():
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-2000:]
      peaks[name] = int(out.split()[-1])
  assert max(peaks.values()) < 1024, f"peak RSS in MiB: {peaks}"
