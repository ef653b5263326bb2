"""Tests of rankjax.models: shapes, head formula, BatchNorm modes, dtypes, errors, Keras import."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rankjax import models
from rankjax.models import keras_import, layers, resnet, weights

# Width-8 versions of the real layouts: the same code path, fast enough for a test.
TINY = {"resnet18": {"num_filters": 8}, "resnet34": {"num_filters": 8},
        "resnet50": {"num_filters": 8}, "small_resnet": {"widths": (4, 8, 8, 16)},
        "conv4": {"width": 8}, "conv4_strided": {"width": 8}, "resnet_tiny": {},
        "efficientnet_lite0": {}}


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _param_count(module):
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


# ---------------------------------------------------------------- shapes and architecture


def test_model_names_cover_the_spec():
  assert {"resnet18", "resnet34", "resnet50", "small_resnet", "conv4"} <= set(models.MODEL_NAMES)
  assert set(TINY) == set(models.MODEL_NAMES)


@pytest.mark.parametrize("name,size,feature_map", [
    ("resnet18", 64, (2, 2, 64)), ("resnet34", 33, (2, 2, 64)), ("resnet50", 64, (2, 2, 256)),
    ("small_resnet", 28, (4, 4, 16)), ("conv4", 28, (1, 1, 8)), ("conv4_strided", 28, (2, 2, 8)),
    ("resnet_tiny", 32, (1, 1, 64))])
def test_output_shapes(name, size, feature_map):
  model = models.get_model(name, embedding_dim=24, num_channels=1, rngs=nnx.Rngs(0),
                           backbone_options=TINY[name])
  x = _images((3, size, size, 1))
  assert nnx.eval_shape(lambda m, x: m.backbone(x), model, x).shape == (3,) + feature_map
  out = nnx.jit(lambda m, x: m(x))(model, x)  # One compilation beats many eager ones here.
  assert out.shape == (3, 24) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_imagenet_resnets_match_the_published_parameter_counts():
  # torchvision's totals (11,689,512 / 21,797,672 / 25,557,032) minus the 1000-way classifier.
  for build, expected in ((resnet.ResNet18, 11_176_512), (resnet.ResNet34, 21_284_672),
                          (resnet.ResNet50, 23_508_032)):
    assert _param_count(nnx.eval_shape(lambda b=build: b(rngs=nnx.Rngs(0)))) == expected


def test_imagenet_resnet_feature_map_at_224():
  net = nnx.eval_shape(lambda: resnet.ResNet50(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(net)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert out.shape == (1, 7, 7, 2048)


def test_resnet_stage_table_and_bottleneck_stride_placement():
  net = nnx.eval_shape(lambda: resnet.ResNet50(rngs=nnx.Rngs(0)))
  assert [len(stage) for stage in net.stages] == [3, 4, 6, 3]
  first = net.stages[1][0]
  # Keras / original ResNet v1: the downsampling stride sits on the first 1x1 convolution.
  assert first.conv1.strides == (2, 2) and first.conv2.strides == (1, 1)
  assert first.shortcut_conv.strides == (2, 2)
  assert net.stem_conv.padding == ((3, 3), (3, 3)) and net.stem_bn.epsilon == 1.001e-5
  r18 = nnx.eval_shape(lambda: resnet.ResNet18(rngs=nnx.Rngs(0)))
  assert [len(stage) for stage in r18.stages] == [2, 2, 2, 2]
  assert isinstance(r18.stages[0][0], resnet.BasicBlock) and r18.stages[0][0].shortcut_conv is None


def test_backbone_and_head_are_separate_parameter_paths():
  model = models.get_model("conv4", num_channels=1, rngs=nnx.Rngs(0), backbone_options={"width": 8})
  roots = {path[0] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert roots == {"backbone", "head"}
  assert model.head.projection.kernel.shape == (8, 128)


def test_conv4_per_block_widths():
  model = models.get_model("conv4", num_channels=1, rngs=nnx.Rngs(0),
                           backbone_options={"widths": (4, 4, 8, 16)})
  assert [conv.kernel.shape for conv in model.backbone.convs] == [
      (3, 3, 1, 4), (3, 3, 4, 4), (3, 3, 4, 8), (3, 3, 8, 16)]
  assert model.head.projection.kernel.shape == (16, 128)
  assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 128)
  three = models.get_model("conv4", num_channels=1, rngs=nnx.Rngs(0),
                           backbone_options={"widths": (4, 8, 8)})
  assert three.backbone.output_size(28) == 3  # 28 -> 14 -> 7 -> 3: one pooling fewer.
  with pytest.raises(ValueError, match="widths must be positive integers"):
    models.get_model("conv4", num_channels=1, rngs=nnx.Rngs(0), backbone_options={"widths": (4, 0)})


@pytest.mark.parametrize("name,pooled,unpooled", [("conv4", 1, 3), ("conv4_strided", 2, 4)])
def test_conv4_without_the_last_downsampling_keeps_the_whole_map(name, pooled, unpooled):
  x = _images((2, 28, 28, 1))
  for pool_last, size in ((True, pooled), (False, unpooled)):
    backbone = models.get_model(name, num_channels=1, rngs=nnx.Rngs(0), backbone_options={
        "width": 4, "pool_last": pool_last}).backbone
    assert backbone(x).shape == (2, size, size, 4) and backbone.output_size(28) == size


# ---------------------------------------------------------------- convolutions


def _primitives(fn, *args):
  return {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.parametrize("size,kernel,stride,route", [
    ((2, 2), 3, 1, "patches"), ((4, 4), 3, 2, "patches"), ((3, 3), 3, 2, "patches"),
    ((1, 1), 3, 1, "patches"), ((2, 1), 7, 2, "patches"), ((4, 4), 3, 1, "conv"),
    ((2, 5), 3, 1, "conv"), ((2, 2), 1, 1, "patches"), ((5, 4), 1, 2, "patches")])
def test_conv_matches_lax_on_both_routes(size, kernel, stride, route):
  # Outputs of at most 2x2 run as patches @ kernel on the CPU (layers.conv_general_dilated).
  pad = ((kernel - 1) // 2,) * 2
  numbers = jax.lax.conv_dimension_numbers((1, 1, 1, 6), (1, 1, 6, 5), ("NHWC", "HWIO", "NHWC"))
  ref = lambda w, x: jax.lax.conv_general_dilated(x, w, (stride, stride), (pad, pad),
                                                  dimension_numbers=numbers)
  ours = lambda w, x: layers.conv_general_dilated(x, w, (stride, stride), (pad, pad),
                                                  dimension_numbers=numbers)
  x, w = _images((3, *size, 6)), _images((kernel, kernel, 6, 5), seed=1)
  expected = "dot_general" if route == "patches" else "conv_general_dilated"
  assert expected in _primitives(ours, w, x)
  np.testing.assert_allclose(ours(w, x), ref(w, x), rtol=1e-5, atol=1e-5)
  cotangent = _images(ref(w, x).shape, seed=2)
  for arg in (0, 1):
    g_ours = jax.grad(lambda w, x: jnp.sum(ours(w, x) * cotangent), argnums=arg)(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(ref(w, x) * cotangent), argnums=arg)(w, x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def test_conv_layer_takes_the_patch_route_for_small_outputs():
  conv = layers.conv(4, 3, 3, strides=2, rngs=nnx.Rngs(0))
  x = _images((2, 4, 4, 4))
  assert "dot_general" in _primitives(conv, x)
  assert "conv_general_dilated" in _primitives(conv, _images((2, 8, 8, 4)))
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_patch_route_keeps_bfloat16_compute():
  conv = layers.conv(4, 3, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = _images((2, 2, 2, 4))
  y = conv(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 2, 2, 3)
  assert "dot_general" in _primitives(conv, x)
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=3e-2, atol=3e-2)


def test_patch_route_accepts_dimension_numbers_as_strings():
  x, w = _images((2, 2, 2, 4)), _images((3, 3, 4, 3), seed=1)
  ours = lambda x: layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert "dot_general" in _primitives(ours, x)
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(ours(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,padding", [
    ((9, 8), 3, 1, "SAME"), ((8, 8), 3, 2, "SAME"), ((7, 9), 3, 2, "SAME"),
    ((8, 10), 5, 2, "SAME"), ((6, 6), 5, 1, "SAME"), ((8, 8), 3, 2, ((0, 1), (0, 1))),
    ((7, 7), 5, 2, ((1, 2), (2, 1))), ((5, 6), 3, 1, "VALID")])
def test_depthwise_route_matches_lax_grouped_conv_values_and_gradients(size, kernel, stride,
                                                                       padding):
  # On the CPU a depthwise convolution is a sum of shifted slices times per-channel weights.
  channels = 6
  x, w = _images((3, *size, channels)), _images((kernel, kernel, 1, channels), seed=1)
  args = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
  ref = lambda w, x: jax.lax.conv_general_dilated(x, w, (stride, stride), padding, **args)
  ours = lambda w, x: layers.conv_general_dilated(x, w, (stride, stride), padding, **args)
  assert "conv_general_dilated" not in _primitives(ours, w, x)
  out = ref(w, x)
  if isinstance(padding, str) and padding == "SAME":  # TensorFlow's output size, ceil(n / s).
    assert out.shape[1:3] == tuple(-(-n // stride) for n in size)
  np.testing.assert_allclose(ours(w, x), out, rtol=1e-5, atol=1e-5)
  cotangent = _images(out.shape, seed=2)
  for arg in (0, 1):
    g_ours = jax.grad(lambda w, x: jnp.sum(ours(w, x) * cotangent), argnums=arg)(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(ref(w, x) * cotangent), argnums=arg)(w, x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_route_matches_lax_and_can_be_switched_off(monkeypatch, stride):
  x, w = _images((2, 7, 6, 5)), _images((1, 1, 5, 3), seed=1)
  numbers = ("NHWC", "HWIO", "NHWC")
  ours = lambda w, x: layers.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                  dimension_numbers=numbers)
  ref = lambda w, x: jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                  dimension_numbers=numbers)
  # A fresh function for each check: JAX caches traces by function.
  assert "conv_general_dilated" not in _primitives(lambda w, x: ours(w, x), w, x)
  np.testing.assert_allclose(ours(w, x), ref(w, x), rtol=1e-5, atol=1e-5)
  cotangent = _images(ref(w, x).shape, seed=2)
  for arg in (0, 1):
    g_ours = jax.grad(lambda w, x: jnp.sum(ours(w, x) * cotangent), argnums=arg)(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(ref(w, x) * cotangent), argnums=arg)(w, x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(layers, "CPU_ROUTES", layers.CPU_ROUTES - {"pointwise"})
  assert "conv_general_dilated" in _primitives(lambda w, x: ours(w, x), w, x)


def test_depthwise_route_takes_only_depthwise_convolutions():
  x = _images((2, 6, 6, 4))
  args = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for w, groups in ((_images((3, 3, 2, 4)), 2), (_images((3, 3, 1, 8)), 4)):  # grouped; x2
    ours = lambda x, w=w, g=groups: layers.conv_general_dilated(x, w, (1, 1), "SAME",
                                                                feature_group_count=g, **args)
    assert "conv_general_dilated" in _primitives(ours, x)
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups, **args)
    np.testing.assert_allclose(ours(x), ref, rtol=1e-5, atol=1e-5)
  # bfloat16 stays bfloat16.
  w = _images((3, 3, 1, 4)).astype(jnp.bfloat16)
  y = layers.conv_general_dilated(x.astype(jnp.bfloat16), w, (1, 1), "SAME",
                                  feature_group_count=4, **args)
  ref = jax.lax.conv_general_dilated(x, w.astype(jnp.float32), (1, 1), "SAME",
                                     feature_group_count=4, **args)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- pooling and the head


@pytest.mark.parametrize("window,stride,padding,size", [(2, 2, 0, 7), (2, 2, 0, 8), (3, 2, 1, 9),
                                                       (3, 2, 1, 10), (3, 3, 0, 11)])
def test_max_pool_matches_reduce_window_values_and_gradients(window, stride, padding, size):
  x = _images((2, size, size + 1, 3))  # Continuous values: no ties, so gradients are unique.
  ref = lambda x: nnx.max_pool(x, (window, window), (stride, stride),
                               padding=((padding, padding), (padding, padding)))
  ours = lambda x: layers.max_pool(x, window, stride, padding)
  np.testing.assert_array_equal(ours(x), ref(x))
  w = _images(ref(x).shape, seed=1)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
  g_ours = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
  # Overlapping windows sum several contributions per input, in a different order.
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pooling", ["avg", "avg_max"])
@pytest.mark.parametrize("normalize", [False, True])
def test_head_matches_numpy_formula(pooling, normalize):
  head = models.EmbeddingHead(5, 3, pooling=pooling, normalize=normalize, rngs=nnx.Rngs(0))
  f = np.asarray(_images((4, 3, 2, 5)))
  pooled = f.mean(axis=(1, 2)) + (f.max(axis=(1, 2)) if pooling == "avg_max" else 0.0)
  expected = pooled @ np.asarray(head.projection.kernel[...]) + np.asarray(
      head.projection.bias[...])
  if normalize:
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(head(jnp.asarray(f)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["avg", "avg_max"])
def test_head_without_projection_gives_the_pooled_features(pooling):
  head = models.EmbeddingHead(5, None, pooling=pooling, normalize=True, rngs=nnx.Rngs(0))
  assert head.embedding_dim == 5 and not nnx.state(head, nnx.Param)
  f = np.asarray(_images((4, 3, 2, 5)))
  pooled = f.mean(axis=(1, 2)) + (f.max(axis=(1, 2)) if pooling == "avg_max" else 0.0)
  expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(head(jnp.asarray(f)), expected, rtol=1e-5, atol=1e-6)
  model = models.get_model("conv4", num_channels=1, embedding_dim=None, rngs=nnx.Rngs(0),
                           backbone_options={"width": 8})
  assert model(_images((2, 28, 28, 1))).shape == (2, model.backbone.num_features)
  assert model.head.embedding_dim == model.backbone.num_features


def test_normalized_embeddings_have_unit_norm():
  model = models.get_model("conv4", num_channels=1, normalize=True, rngs=nnx.Rngs(0),
                           backbone_options={"width": 8})
  np.testing.assert_allclose(np.linalg.norm(model(_images((5, 28, 28, 1))), axis=1), 1.0,
                             rtol=1e-5)


def test_normalization_is_safe_at_zero():
  head = models.EmbeddingHead(4, 3, normalize=True, rngs=nnx.Rngs(0))
  head.projection.kernel[...] = jnp.zeros((4, 3))
  head.projection.bias[...] = jnp.zeros((3,))
  features = _images((2, 3, 3, 4))
  np.testing.assert_array_equal(head(features), np.zeros((2, 3)))
  grads = nnx.grad(lambda h: jnp.sum(h(features) * jnp.arange(3.0)))(head)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_head_is_float32_and_rejects_bad_options():
  head = models.EmbeddingHead(4, 3, rngs=nnx.Rngs(0))
  assert head(jnp.ones((2, 2, 2, 4), jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(ValueError, match="pooling='max'"):
    models.EmbeddingHead(4, 3, pooling="max", rngs=nnx.Rngs(0))
  for bad in (0, True, 2.0):
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer or None"):
      models.EmbeddingHead(4, bad, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- BatchNorm modes


def test_batchnorm_train_updates_running_averages_by_the_momentum_formula():
  bn = layers.BatchNorm(3, rngs=nnx.Rngs(0))
  x = np.asarray(_images((4, 5, 5, 3))) * 2.0 + 1.0
  y = bn(jnp.asarray(x))
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-7)  # momentum 0.9
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, rtol=1e-5)
  # Evaluation mode: normalise with the running averages, which stay put.
  bn.eval()
  np.testing.assert_allclose(bn(jnp.asarray(x)), (x - 0.1 * mean) / np.sqrt(
      0.9 + 0.1 * var + 1e-5), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-7)


def _batch_stats(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


def test_eval_mode_is_per_example_and_train_mode_is_per_batch():
  model = models.get_model("small_resnet", num_channels=1, rngs=nnx.Rngs(0),
                           backbone_options=TINY["small_resnet"])
  x = _images((6, 28, 28, 1))
  model.train()
  train_full, train_part = model(x), model(x[:3])
  assert not np.allclose(train_full[:3], train_part, atol=1e-3)  # batch statistics differ
  model.eval()
  stats = _batch_stats(model)
  np.testing.assert_allclose(model(x)[:3], model(x[:3]), rtol=1e-5, atol=1e-6)
  for k, v in _batch_stats(model).items():
    np.testing.assert_array_equal(v, stats[k])


def test_freeze_batchnorm_keeps_statistics_in_train_mode():
  model = models.get_model("small_resnet", num_channels=1, freeze_batchnorm=True,
                           rngs=nnx.Rngs(0), backbone_options=TINY["small_resnet"])
  # Non-trivial running averages, as a pretrained network has.
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    v[...] = v[...] + 0.3 if path[-1] == "mean" else v[...] * 1.7
  before = _batch_stats(model)
  x = _images((6, 28, 28, 1))
  model.train()
  out_train = model(x)
  nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(model, x)
  for k, v in _batch_stats(model).items():
    np.testing.assert_array_equal(v, before[k])
  model.eval()
  np.testing.assert_allclose(out_train, model(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model(x)[:2], model(x[:2]), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_gives_float32_output():
  kwargs = dict(num_channels=1, backbone_options={"widths": (8, 8, 16, 16)})
  m32 = models.get_model("small_resnet", rngs=nnx.Rngs(0), **kwargs)
  m16 = models.get_model("small_resnet", dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kwargs)
  x = _images((4, 28, 28, 1))
  m16.eval(), m32.eval()  # Running averages on both sides: the same normalisation.
  assert m16.backbone(x).dtype == jnp.bfloat16
  assert all(v[...].dtype == jnp.float32
             for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param)))
  e16, e32 = m16(x), m32(x)
  assert e16.dtype == jnp.float32
  # Same parameters; bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9 per operation).
  np.testing.assert_allclose(e16, e32, atol=0.02 * float(jnp.abs(e32).max()))
  assert not np.array_equal(e16, e32)  # It did compute in bfloat16.


def test_train_step_gradients_are_finite_under_jit():
  model = models.get_model("conv4_strided", num_channels=1, normalize=True, rngs=nnx.Rngs(0),
                           backbone_options={"width": 8})

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: jnp.sum(m(x)[:, 0]))(model)

  g = grads(model, _images((4, 28, 28, 1)))
  leaves = jax.tree.leaves(g)
  assert leaves and all(np.all(np.isfinite(v)) for v in leaves)


# ---------------------------------------------------------------- errors


def test_check_image_size():
  assert models.check_image_size("conv4", 28) == (28, 28)
  assert models.check_image_size("resnet50", (224, 160)) == (224, 160)
  with pytest.raises(ValueError, match=r"at least 16x16 pixels; got 15x15"):
    models.check_image_size("conv4", 15)
  with pytest.raises(ValueError, match=r"'resnet18' downsamples by 32.*got 28x28.*'small_resnet'"):
    models.check_image_size("resnet18", 28)
  with pytest.raises(ValueError, match=r"got 64x7"):
    models.check_image_size("small_resnet", (64, 7))
  for bad in (28.5, "28", (28, 28, 3)):
    with pytest.raises(ValueError, match="image_size must be"):
      models.check_image_size("conv4", bad)


def test_unknown_names_and_bad_options():
  with pytest.raises(ValueError, match=r"unknown model name 'resnet101'.*resnet18"):
    models.get_model("resnet101", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown model name"):
    models.check_image_size("vgg16", 224)
  with pytest.raises(ValueError, match="pooling="):
    models.get_model("conv4", pooling="gem", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"backbone_options \['depth'\]"):
    models.get_model("conv4", backbone_options={"depth": 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_channels"):
    models.get_model("conv4", num_channels=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype"):
    models.get_model("conv4", dtype=jnp.int32, rngs=nnx.Rngs(0))


def test_model_call_rejects_bad_images():
  model = models.get_model("conv4", num_channels=1, rngs=nnx.Rngs(0), backbone_options={"width": 4})
  with pytest.raises(ValueError, match=r"\[batch, height, width, 1\].*\(2, 28, 28, 3\)"):
    model(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"\(28, 28\)"):
    model(jnp.zeros((28, 28)))
  with pytest.raises(ValueError, match="floating point"):
    model(jnp.zeros((2, 28, 28, 1), jnp.uint8))
  with pytest.raises(ValueError, match="at least 16x16"):
    model(jnp.zeros((2, 12, 12, 1)))


# ---------------------------------------------------------------- weights files


def test_weights_round_trip_and_mismatch_errors(tmp_path):
  a = models.get_model("resnet_tiny", rngs=nnx.Rngs(0))
  for _, v in nnx.to_flat_state(nnx.state(a, nnx.BatchStat)):
    v[...] = v[...] + 0.5  # So that the statistics are checked too, not only the parameters.
  path = tmp_path / "tiny.npz"
  weights.save_weights(a.backbone, path, architecture="resnet_tiny")
  with np.load(path, allow_pickle=False) as f:  # Loadable without pickle.
    assert "stages/0/0/conv1/kernel" in f.files
  b = models.get_model("resnet_tiny", pretrained=path, rngs=nnx.Rngs(1))
  a.eval(), b.eval()
  x = _images((2, 32, 32, 3))
  np.testing.assert_array_equal(a.backbone(x), b.backbone(x))
  with pytest.raises(ValueError, match="holds weights for 'resnet_tiny', not for model 'resnet18'"):
    models.get_model("resnet18", pretrained=path, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not exist"):
    models.get_model("resnet_tiny", pretrained=tmp_path / "missing.npz", rngs=nnx.Rngs(0))
  wider = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, num_filters=16,
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="wrong shape: stages/0/0/bn1/bias: \\(8,\\) instead of"):
    weights.load_weights(wider, path)


# ---------------------------------------------------------------- Keras import


@pytest.fixture(scope="module")
def keras_resnet50():
  """A Keras ResNet50 with random weights, and random BatchNorm statistics and conv biases.

  Keras initialises the statistics to (0, 1) and the biases to 0; randomising them makes the test
  see the bias folding, the epsilon and the statistics mapping. Keras is in the ``test`` extra, so
  these tests run wherever the test suite does (an import error, not a skip, when it is missing).
  """
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")
  rng = np.random.default_rng(0)
  for layer in model.layers:
    w = layer.get_weights()
    if layer.name.endswith("_bn"):
      c = w[0].shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c),
                         rng.uniform(0.5, 2.0, c)])
    elif layer.name.endswith("_conv"):
      layer.set_weights([w[0], rng.normal(0, 0.1, w[1].shape)])
  return keras, model


@pytest.fixture(scope="module")
def converted_file(keras_resnet50, tmp_path_factory):
  path = tmp_path_factory.mktemp("keras") / "resnet50.npz"
  keras_import.convert_keras_resnet50(keras_resnet50[1], path)
  return path


def test_keras_resnet50_import_reproduces_keras_features(keras_resnet50, converted_file):
  keras, keras_model = keras_resnet50
  # Odd, non-square images exercise the padding and the floor of every stride-2 layer.
  x = np.asarray(_images((2, 67, 75, 3)))  # standardised RGB, as rankjax's pipelines produce
  pixels = 255.0 * (x * np.array(keras_import.IMAGENET_STD) + np.array(keras_import.IMAGENET_MEAN))
  expected = np.asarray(keras_model(keras.applications.resnet50.preprocess_input(pixels),
                                    training=False))
  model = models.get_model("resnet50", pretrained=converted_file, embedding_dim=16,
                           rngs=nnx.Rngs(0))
  model.eval()
  features = np.asarray(models.global_pool(model.backbone(jnp.asarray(x))))
  assert features.shape == expected.shape == (2, 2048)
  scale = np.abs(expected).max()
  assert scale > 1.0  # A collapsed network would make the comparison empty.
  np.testing.assert_allclose(features / scale, expected / scale, atol=1e-4)
  assert model(jnp.asarray(x)).shape == (2, 16)
  with np.load(converted_file, allow_pickle=False) as f:
    assert str(f["__meta__/input_convention"]) == keras_import.KERAS_CAFFE
  # The convention the converted model assumes is the one rankjax's pipelines produce.
  from rankjax.data import preprocessing  # pylint: disable=g-import-not-at-top
  assert keras_import.IMAGENET_MEAN == tuple(preprocessing.IMAGENET_MEAN)
  assert keras_import.IMAGENET_STD == tuple(preprocessing.IMAGENET_STD)


def test_pretrained_imagenet_offline_error_and_cache(monkeypatch, tmp_path, converted_file):
  import keras  # pylint: disable=g-import-not-at-top

  def no_internet(*args, **kwargs):
    raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                    "[Errno -2] Name or service not known")

  monkeypatch.setattr(keras.applications, "ResNet50", no_internet)
  monkeypatch.setenv("RANKJAX_CACHE_DIR", str(tmp_path))
  with pytest.raises(RuntimeError, match=r"could not fetch.*internet.*pretrained='path/to"):
    models.get_model("resnet50", pretrained="imagenet", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'resnet50' and 'efficientnet_lite0' only"):
    models.get_model("resnet18", pretrained="imagenet", rngs=nnx.Rngs(0))
  # A converted file in the cache is used without asking Keras.
  os.symlink(converted_file, tmp_path / keras_import.IMAGENET_FILE)
  model = models.get_model("resnet50", pretrained="imagenet", rngs=nnx.Rngs(0))
  expected = np.load(converted_file, allow_pickle=False)["stem_conv/kernel"]
  np.testing.assert_array_equal(model.backbone.stem_conv.kernel[...], expected)


# ---------------------------------------------------------------- registering an encoder


@pytest.fixture
def registered_model(monkeypatch):
  """An encoder added from outside the library (a narrow conv4), removed afterwards."""
  from rankjax.models import model as model_lib, small  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(model_lib, "_SPECS", dict(model_lib._SPECS))  # pylint: disable=protected-access
  return models.register_model(models.ModelSpec(
      name="narrow_conv4", build=lambda **kw: small.Conv4(width=4, **kw), min_image_size=16,
      why="halves the image four times", small_images=True))


def test_a_registered_encoder_builds_by_name_and_checks_its_size(registered_model):
  assert "narrow_conv4" in models.model_names() and "narrow_conv4" not in models.MODEL_NAMES
  model = models.get_model("narrow_conv4", num_channels=1, embedding_dim=8, rngs=0)
  assert model(_images((2, 16, 16, 1))).shape == (2, 8)
  assert model.backbone.num_features == 4
  with pytest.raises(ValueError, match="halves the image four times.*at least 16x16"):
    models.check_image_size("narrow_conv4", 12)
  with pytest.raises(ValueError, match="For small images use .*'narrow_conv4'"):
    models.check_image_size("resnet18", 16)
  with pytest.raises(ValueError, match="pretrained='imagenet' is available for 'resnet50' and "
                                       "'efficientnet_lite0' only"):
    models.get_model("narrow_conv4", num_channels=1, pretrained="imagenet", rngs=0)
  with pytest.raises(ValueError, match="already registered"):
    models.register_model(registered_model)


def test_a_registered_encoder_trains_end_to_end(registered_model, tmp_path):
  # The "adding an encoder" recipe: one spec, then config.model.name names it.
  import importlib.util  # pylint: disable=g-import-not-at-top
  from rankjax import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "configs", "digits.py")
  spec = importlib.util.spec_from_file_location("digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("contrastive,runlocal")
  config.model.name = "narrow_conv4"
  config.model.backbone_options = {}
  config.train.steps = 3
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0.0 < metrics["recall@1"] <= 1.0
  assert train.build_model(config, type("Info", (), {"num_channels": 1})).backbone.num_features == 4
