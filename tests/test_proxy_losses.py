"""The proxy losses against float64 references written from their papers' formulas, loop by loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import losses
from test_losses import numeric_grad  # pylint: disable=g-bad-import-order


def ref_proxy_anchor(x, y, proxies, alpha=32.0, delta=0.1):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  q = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
  pull, push, present = 0.0, 0.0, 0
  for c in range(len(q)):
    pos = [u[i] @ q[c] for i in range(len(y)) if y[i] == c]
    neg = [u[i] @ q[c] for i in range(len(y)) if y[i] != c]
    if pos:
      present += 1
      pull += np.log(1.0 + sum(np.exp(-alpha * (s - delta)) for s in pos))
    push += np.log(1.0 + sum(np.exp(alpha * (s + delta)) for s in neg))
  return pull / present + push / len(q)


def ref_normalized_softmax(x, y, proxies, temperature=0.05):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  q = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
  total = 0.0
  for i in range(len(y)):
    logits = [u[i] @ q[c] / temperature for c in range(len(q))]
    total -= logits[y[i]] - np.log(sum(np.exp(z) for z in logits))
  return total / len(y)


def batch(seed, size=10, dim=4, classes=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, dim)).astype(np.float32).astype(np.float64)
  # Classes 0..3 only: proxies 4 and 5 are absent from the batch (negatives only).
  y = rng.integers(0, 4, size=size)
  proxies = rng.normal(size=(classes, dim)).astype(np.float32).astype(np.float64)
  return x, y, proxies


CASES = [("proxy_anchor", {}), ("proxy_anchor", {"alpha": 4.0, "delta": 0.3}),
         ("proxy_anchor", {"alpha": 1.0, "delta": 0}), ("normalized_softmax", {}),
         ("normalized_softmax", {"temperature": 0.5})]


@pytest.mark.parametrize("name,options", CASES)
def test_matches_reference_values_and_gradients(name, options):
  reference = {"proxy_anchor": ref_proxy_anchor,
               "normalized_softmax": ref_normalized_softmax}[name]
  fn = jax.jit(jax.value_and_grad(
      lambda x, y, p: losses.get_loss(name, **options)(x, y, proxies=p), argnums=(0, 2)))
  for seed in range(3):
    x, y, proxies = batch(seed)
    value, (gx, gp) = fn(jnp.asarray(x, jnp.float32), jnp.asarray(y),
                         jnp.asarray(proxies, jnp.float32))
    np.testing.assert_allclose(float(value), reference(x, y, proxies, **options), rtol=1e-5)
    for grad, numeric in [
        (gx, numeric_grad(lambda z: reference(z, y, proxies, **options), x)),
        (gp, numeric_grad(lambda z: reference(x, y, z, **options), proxies))]:
      np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-5,
                                 atol=1e-5 * np.abs(numeric).max())
    assert np.abs(np.asarray(gp)[4:]).max() > 0  # absent classes' proxies still learn


def test_hand_computed():
  # Both samples are class 0: proxy 0 pulls s = 1 and s = 0; proxy 1 (absent) pushes s = 0 and 1.
  value = losses.proxy_anchor_loss(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 0]),
                                   proxies=jnp.eye(2), alpha=1.0)
  expected = (np.log(1 + np.exp(-0.9) + np.exp(0.1))
              + (0.0 + np.log(1 + np.exp(0.1) + np.exp(1.1))) / 2)
  assert float(value) == pytest.approx(expected, rel=1e-6)


def test_scale_and_rotation_invariance():
  x, y, proxies = batch(7)
  value = float(losses.proxy_anchor_loss(x, y, proxies=proxies))
  rotation, _ = np.linalg.qr(np.random.default_rng(8).normal(size=(4, 4)))
  for xs, ps in [(3.0 * x, 0.01 * proxies), (x @ rotation, proxies @ rotation)]:
    assert float(losses.proxy_anchor_loss(xs, y, proxies=ps)) == pytest.approx(value, rel=1e-5)


def test_edge_cases_are_finite():
  fn = jax.jit(jax.value_and_grad(lambda x, p: losses.proxy_anchor_loss(
      x, jnp.array([0, 0, 1, 1]), proxies=p), argnums=(0, 1)))
  for x, p in [(jnp.zeros((4, 3)), jnp.ones((5, 3))), (jnp.ones((4, 3)), jnp.zeros((5, 3))),
               (1e4 * jnp.ones((4, 3)), jnp.eye(5, 3)),
               (jnp.ones((4, 3), jnp.bfloat16), jnp.ones((5, 3)))]:
    value, grads = fn(x, p)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]),
                                      proxies=jnp.ones((2, 5))), r"proxies must have shape \[num"),
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1, 2]),
                                      proxies=jnp.ones((2, 3))), r"labels must lie in \[0, 2\)"),
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]),
                                      proxies=jnp.ones((2, 3)), alpha=0.0), "alpha must be"),
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]),
                                      proxies=jnp.ones((2, 3)), delta=-0.1), "delta must be"),
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]),
                                      proxies=jnp.ones((2, 3), jnp.int32)), "floating point"),
    (lambda: losses.proxy_anchor_loss(jnp.ones((4, 3)), jnp.array([0, 0, 1]),
                                      proxies=jnp.ones((2, 3))), "4 rows but labels has 3"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_registry():
  fn = losses.get_loss("proxy_anchor", alpha=16.0)
  assert fn.func is losses.proxy_anchor_loss and fn.keywords == {"alpha": 16.0}
  assert losses.get_loss("normalized_softmax").func is losses.normalized_softmax_loss
  assert losses.get_spec("proxy_anchor").learns_proxies
  assert not losses.get_spec("triplet_hard").learns_proxies


def test_normalized_softmax_hand_computed_and_errors():
  value = losses.normalized_softmax_loss(jnp.array([[1.0, 0.0]]), jnp.array([0]),
                                         proxies=jnp.eye(2), temperature=1.0)
  assert float(value) == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)
  with pytest.raises(ValueError, match="temperature must be"):
    losses.normalized_softmax_loss(jnp.ones((2, 2)), jnp.array([0, 1]), proxies=jnp.eye(2),
                                   temperature=0.0)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    losses.normalized_softmax_loss(jnp.ones((2, 2)), jnp.array([0, 5]), proxies=jnp.eye(2))
  value, grads = jax.value_and_grad(
      lambda x, p: losses.normalized_softmax_loss(x, jnp.array([0, 1]), proxies=p),
      argnums=(0, 1))(jnp.zeros((2, 2)), jnp.zeros((3, 2)))
  assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
