"""Tests of rankjax.similarity: distances against numpy loops, masks, input checks, safe math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import similarity


def ref_distance(u, v, distance):
  diff = u - v
  if distance == "euclidean":
    return np.sqrt(diff @ diff)
  if distance == "squared_euclidean":
    return diff @ diff
  norms = np.linalg.norm(u) * np.linalg.norm(v)
  return 1.0 - (u @ v / norms if norms > 0 else 0.0)


@pytest.mark.parametrize("distance", similarity.DISTANCES)
def test_pairwise_distances_match_loops(distance):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5))
  y = rng.normal(size=(4, 5))
  x[3] = 0.0  # a zero vector: cosine 0 with everything, so cosine distance 1
  d = np.asarray(similarity.pairwise_distances(jnp.asarray(x, jnp.float32), distance=distance))
  expected = np.array([[ref_distance(u, v, distance) if i != j else 0.0
                        for j, v in enumerate(x)] for i, u in enumerate(x)])
  np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.diag(d) == 0.0)
  cross = similarity.pairwise_distances(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                        distance=distance)
  expected = np.array([[ref_distance(u, v, distance) for v in y] for u in x])
  np.testing.assert_allclose(cross, expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_distances():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
  np.testing.assert_allclose(similarity.pairwise_distances(x)[0, 1], 5.0)
  np.testing.assert_allclose(
      similarity.pairwise_distances(x, distance="squared_euclidean")[1, 2], 9.0 + 4.0)
  # cos((3, 4), (0, 2)) = 8 / 10.
  np.testing.assert_allclose(similarity.pairwise_distances(x, distance="cosine")[1, 2], 0.2,
                             rtol=1e-6)
  np.testing.assert_allclose(similarity.cosine_similarities(x)[1, 2], 0.8, rtol=1e-6)


@pytest.mark.parametrize("distance", similarity.DISTANCES)
def test_distance_gradients_are_finite_at_identical_and_zero_points(distance):
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
  grad = jax.grad(lambda z: jnp.sum(similarity.pairwise_distances(z, distance=distance)))(x)
  assert np.all(np.isfinite(grad))


def test_euclidean_gradient_is_zero_at_identical_points():
  x = jnp.array([[1.0, 2.0], [1.0, 2.0]])
  grad = jax.grad(lambda z: similarity.pairwise_distances(z)[0, 1])(x)
  np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_euclidean_gradient_matches_formula():
  # d d_01 / d x_0 = (x_0 - x_1) / d_01.
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  grad = jax.grad(lambda z: similarity.pairwise_distances(z)[0, 1])(x)
  np.testing.assert_allclose(grad, [[-0.6, -0.8], [0.6, 0.8]], rtol=1e-6)


def test_label_masks():
  labels = jnp.array([3, 1, 3, 2, 1])
  pos = np.asarray(similarity.positive_mask(labels))
  neg = np.asarray(similarity.negative_mask(labels))
  same = np.asarray(similarity.same_label_mask(labels))
  for i in range(5):
    for j in range(5):
      assert same[i, j] == (labels[i] == labels[j])
      assert pos[i, j] == (i != j and labels[i] == labels[j])
      assert neg[i, j] == (labels[i] != labels[j])
  cross = similarity.same_label_mask(labels, jnp.array([1, 2]))
  np.testing.assert_array_equal(cross, np.asarray(labels)[:, None] == np.array([1, 2])[None, :])


def test_check_embeddings_and_labels():
  x, y = similarity.check_embeddings_and_labels(jnp.ones((3, 2), jnp.bfloat16), np.array([1, 2, 3]))
  assert x.dtype == jnp.float32 and y.dtype == jnp.int32
  with pytest.raises(ValueError, match="embeddings must have rank 2"):
    similarity.check_embeddings_and_labels(jnp.ones((3,)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="labels must have rank 1"):
    similarity.check_embeddings_and_labels(jnp.ones((3, 2)), jnp.zeros((3, 1), jnp.int32))
  with pytest.raises(ValueError, match="3 rows but labels has 2"):
    similarity.check_embeddings_and_labels(jnp.ones((3, 2)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="labels must be integers"):
    similarity.check_embeddings_and_labels(jnp.ones((3, 2)), jnp.zeros(3))
  with pytest.raises(ValueError, match="queries must be floating point"):
    similarity.check_embeddings_and_labels(jnp.ones((3, 2), jnp.int32), jnp.zeros(3, jnp.int32),
                                           name="queries")
  # Only shapes and dtypes are read, so it works on tracers.
  out = jax.jit(lambda a, b: similarity.check_embeddings_and_labels(a, b)[0].sum())(
      jnp.ones((3, 2)), jnp.zeros(3, jnp.int32))
  assert float(out) == 6.0


def test_option_checks():
  with pytest.raises(ValueError, match="distance='l1'"):
    similarity.check_distance("l1")
  with pytest.raises(ValueError, match="distance='l1'"):
    similarity.pairwise_distances(jnp.ones((2, 2)), distance="l1")
  with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
    similarity.check_nonnegative(-0.5, "margin")
  with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
    similarity.check_nonnegative(float("nan"), "margin")
  similarity.check_nonnegative(0.0, "margin")
  jax.jit(lambda m: similarity.check_nonnegative(m, "margin"))(-1.0)  # traced: not checkable


def test_l2_normalize_and_safe_sqrt():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(similarity.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(similarity.l2_normalize(z)))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(similarity.safe_sqrt(jnp.array([4.0, 0.0, -1.0])), [2.0, 0.0, 0.0])
  grad = jax.grad(lambda v: jnp.sum(similarity.safe_sqrt(v)))(jnp.array([4.0, 0.0, -1.0]))
  np.testing.assert_allclose(grad, [0.25, 0.0, 0.0])


def test_self_distance_gradient_matches_plain_autodiff():
  # The self-distance matrix has a hand-written (symmetrised) backward pass; check it against
  # autodiff of the formula, with a random (asymmetric) cotangent, ties at zero included.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32).at[4].set(0.0)
  x = x.at[7].set(x[2])
  cotangent = jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)

  def plain(z):
    n = jnp.sum(z * z, axis=1)
    sq = jnp.maximum(n[:, None] + n[None, :] - 2.0 * z @ z.T, 0.0)
    return jnp.where(jnp.eye(10, dtype=bool), 0.0, sq)

  value, pullback = jax.vjp(similarity.squared_euclidean_distances, x)
  expected_value, expected_pullback = jax.vjp(plain, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pullback(cotangent)[0], expected_pullback(cotangent)[0], rtol=1e-5,
                             atol=1e-5)


def test_cross_distance_gradient_matches_plain_autodiff():
  # Between two sets the squared distances also have a hand-written backward pass (it keeps one
  # mask instead of autodiff's intermediates); check both gradients, coincident points included.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32).at[2].set(0.0)
  y = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32).at[3].set(x[1])
  cotangent = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)

  def plain(a, b):
    sq = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(sq, 0.0)

  value, pullback = jax.vjp(similarity.squared_euclidean_distances, x, y)
  expected_value, expected_pullback = jax.vjp(plain, x, y)
  np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
  for got, want in zip(pullback(cotangent), expected_pullback(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
