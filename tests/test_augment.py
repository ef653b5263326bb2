"""On-device training augmentations: rankjax.augment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import augment
from rankjax import seeding
from rankjax import configs
from rankjax import train_state


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _warp(images, angle=0.0, scale=1.0, shift=(0.0, 0.0)):
  b = images.shape[0]
  return augment.affine_warp(images, jnp.full((b,), angle), jnp.full((b,), scale),
                             jnp.tile(jnp.asarray(shift, jnp.float32), (b, 1)))


def test_identity_warp_returns_the_images():
  x = _images((3, 9, 7, 2))
  np.testing.assert_allclose(_warp(x), x, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turns_equal_rot90(k):
  x = _images((2, 8, 8, 1))
  np.testing.assert_allclose(_warp(x, angle=k * math.pi / 2), jnp.rot90(x, k, axes=(1, 2)),
                             atol=1e-5)


def test_integer_shift_moves_content_and_extends_edges():
  x = _images((2, 6, 7, 3))
  out = _warp(x, shift=(1.0, -2.0))  # One row down, two columns left.
  np.testing.assert_allclose(out[:, 1:, :-2], x[:, :-1, 2:], atol=1e-6)
  np.testing.assert_allclose(out[:, 0, :-2], x[:, 0, 2:], atol=1e-6)  # Edge row repeated.


def test_scale_two_zooms_about_the_centre():
  x = _images((1, 9, 9, 1))
  out = _warp(x, scale=2.0)
  # Output pixel (4 + 2d) samples the input at 4 + d (the centre is pixel 4).
  for d in (-2, -1, 0, 1, 2):
    np.testing.assert_allclose(out[0, 4 + 2 * d, 4 + 2 * d], x[0, 4 + d, 4 + d], atol=1e-6)


def test_random_affine_is_deterministic_per_step_and_varies_per_image():
  x = jnp.tile(_images((1, 12, 12, 1)), (4, 1, 1, 1))
  batch = {"image": x, "label": jnp.arange(4)}
  kwargs = dict(key=jax.random.key(0), rotation_degrees=15.0, scale=0.1, shift=0.1)
  a = augment.random_affine(batch, 3, **kwargs)
  b = augment.random_affine(batch, 3, **kwargs)
  c = augment.random_affine(batch, 4, **kwargs)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], batch["label"])
  assert not np.allclose(a["image"], c["image"])
  assert not np.allclose(a["image"][0], a["image"][1])  # Same input, different draws.
  assert jax.jit(lambda b, s: augment.random_affine(b, s, **kwargs))(batch, 3)["image"].shape \
      == x.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(rotation_degrees=-1.0), "rotation_degrees"), (dict(rotation_degrees=181.0), "rotation"),
    (dict(scale=1.0), "scale"), (dict(shift=-0.1), "shift")])
def test_bad_ranges_are_errors_in_the_config_check(kwargs, match):
  config = configs.base_config()
  config.affine.update(kwargs)
  with pytest.raises(ValueError, match=f"config.affine: .*{match}"):
    configs.check_config(config)


def test_batch_transform_composes_affine_then_class_rotation():
  config = configs.base_config()
  assert train_state.make_batch_transform(config) is None
  config.rotate_classes = True
  config.affine.shift = 0.1
  transform = train_state.make_batch_transform(config)
  batch = {"image": _images((8, 10, 10, 1)), "label": jnp.repeat(jnp.arange(2), 4)}
  out = transform(batch, 5)
  rotated_only = augment.rotate_classes(
      batch, 5, key=seeding.stream_key(config.seed, "rotate_classes"))
  np.testing.assert_array_equal(out["label"], rotated_only["label"])
  assert not np.allclose(out["image"], rotated_only["image"])
