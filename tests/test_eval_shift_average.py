"""Tests of rankjax.evaluation.shift_average: shift offsets, shifted views, the mean over views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rankjax import checks
from rankjax import configs
from rankjax import models
from rankjax import parallel
from rankjax.evaluation import embed as eval_embed
from rankjax import train_state
from rankjax.evaluation import shift_average


def _numpy_shift(images, dy, dx, s):
  """Reference: pad by ``s`` repeating the edge, then read the window that moves content by
  ``(dy, dx)``: out[i, j] = padded[i + s - dy, j + s - dx]."""
  padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  return padded[:, s - dy:s - dy + h, s - dx:s - dx + w]


def test_shift_offsets_cover_the_square_once():
  np.testing.assert_array_equal(shift_average.shift_offsets(0), [[0, 0]])
  for s in (1, 2):
    offsets = shift_average.shift_offsets(s)
    assert offsets.shape == ((2 * s + 1) ** 2, 2) and offsets.dtype == np.int32
    assert len({tuple(o) for o in offsets}) == len(offsets)
    assert np.abs(offsets).max() == s and [0, 0] in offsets.tolist()


def test_shifted_moves_content_and_repeats_the_edge():
  image = np.zeros((1, 6, 7, 1), np.float32)
  image[0, 2, 3, 0] = 1.0
  moved = np.asarray(shift_average.shifted(jnp.asarray(image), jnp.array([1, -2]), 2))
  assert moved[0, 3, 1, 0] == 1.0 and moved.sum() == 1.0  # Down 1, left 2.
  ramp = np.arange(6 * 7, dtype=np.float32).reshape(1, 6, 7, 1)
  down = np.asarray(shift_average.shifted(jnp.asarray(ramp), jnp.array([1, 0]), 1))
  np.testing.assert_array_equal(down[0, 0], ramp[0, 0])    # The uncovered top row: the edge.
  np.testing.assert_array_equal(down[0, 1:], ramp[0, :-1])
  for dy, dx in shift_average.shift_offsets(2):
    np.testing.assert_array_equal(
        shift_average.shifted(jnp.asarray(ramp), jnp.array([dy, dx]), 2),
        _numpy_shift(ramp, dy, dx, 2))


@pytest.mark.parametrize("normalize", [True, False])
def test_mean_over_shifts_matches_a_loop_over_views(normalize):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  weights = rng.normal(size=(8 * 8 * 2, 5)).astype(np.float32)

  def embed(x):  # Not shift-invariant, so every view gives a different embedding.
    return jnp.tanh(jnp.reshape(x, (x.shape[0], -1)) @ weights)

  got = jax.jit(lambda x: shift_average.mean_over_shifts(embed, x, 1, normalize=normalize))(images)
  views = []
  for dy, dx in shift_average.shift_offsets(1):
    e = np.tanh(_numpy_shift(images, dy, dx, 1).reshape(3, -1).astype(np.float64) @ weights)
    views.append(e / np.linalg.norm(e, axis=1, keepdims=True) if normalize else e)
  np.testing.assert_allclose(got, np.mean(views, axis=0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, embed(images), atol=1e-3)
  np.testing.assert_array_equal(shift_average.mean_over_shifts(embed, images, 0, normalize=True),
                                embed(images))


@pytest.mark.parametrize("bad", [-1, 1.5, "1", None])
def test_bad_shifts_are_errors(bad):
  with pytest.raises(ValueError, match="integer >= 0"):
    checks.check_max_shift(bad)


def test_a_shift_of_half_the_image_is_an_error():
  assert checks.check_max_shift(3, 8) == 3
  with pytest.raises(ValueError, match="less than half the image size"):
    checks.check_max_shift(4, 8)
  with pytest.raises(ValueError, match="less than half"):
    shift_average.mean_over_shifts(lambda x: x, jnp.zeros((1, 6, 9, 1)), 3, normalize=False)


def test_check_config_names_the_key():
  config = configs.base_config()
  config.eval.test_time_shift = -2
  with pytest.raises(ValueError, match="config.eval.test_time_shift: .*integer >= 0"):
    configs.check_config(config)


def test_eval_embed_fn_on_a_device_mesh_averages_the_model_over_views():
  model = models.get_model("conv4", embedding_dim=6, num_channels=1, normalize=False,
                           rngs=nnx.Rngs(0), backbone_options={"width": 8})
  _, eval_graphdef, params, model_state = train_state.split_model(model)
  variables = {"params": params, "model_state": model_state}
  images = np.random.default_rng(1).normal(size=(8, 20, 20, 1)).astype(np.float32)
  config = configs.base_config()
  config.eval.test_time_shift = 1
  mesh = parallel.make_mesh()
  got = eval_embed.make_eval_embed_fn(eval_graphdef, config, mesh)(
      variables, parallel.global_batch({"image": images}, mesh)["image"])
  plain = eval_embed.make_embed_fn(eval_graphdef)
  views = [np.asarray(plain(variables, _numpy_shift(images, dy, dx, 1)))
           for dy, dx in shift_average.shift_offsets(1)]
  views = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in views]  # distance="cosine"
  np.testing.assert_allclose(np.asarray(got), np.mean(views, axis=0), rtol=1e-4, atol=1e-5)
