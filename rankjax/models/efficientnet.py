r"""EfficientNet-Lite0 in Flax NNX: an ImageNet-pretrainable encoder light enough for a CPU.

M. Tan, Q. V. Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019; the Lite variants (TensorFlow's ``efficientnet-lite``, 2020) drop squeeze-and-excitation,
use ReLU6 and keep the stem (32 channels) and the head (1280) fixed, so that they quantise and run
fast on mobile CPUs.

The network: a 3x3 stride-2 stem convolution (32 channels), 16 MBConv blocks in seven stages, a
1x1 head convolution to 1280 channels, each convolution followed by BatchNorm (epsilon 1e-3) and
ReLU6 (the projections by BatchNorm alone). An MBConv block expands its input by a 1x1
convolution (``expand_ratio`` times the channels; none in the first stage), filters it with a
depthwise ``k x k`` convolution, projects it back with a 1x1 convolution, and adds its input where
the stride is 1 and the widths match:

=====  ======  ======  ======  ========  ==========
stage  expand  kernel  stride  channels  blocks
=====  ======  ======  ======  ========  ==========
1      1       3       1       16        1
2      6       3       2       24        2
3      6       5       2       40        2
4      6       3       2       80        3
5      6       5       1       112       3
6      6       5       2       192       4
7      6       3       1       320       1
=====  ======  ======  ======  ========  ==========

Padding is TensorFlow's ``"SAME"``, as the original was trained with: for a stride-2 convolution of
an even input it pads one pixel less on the top and left than on the bottom and right. The ImageNet
weights (:mod:`rankjax.models.efficientnet_import`) expect inputs ``(x - 127) / 128`` for pixels
``x`` in 0-255; a converted model carries the map from the standardised RGB that rankjax's
pipelines give (``input_transform``). The backbone maps ``f32[B, H, W, 3]`` to ``[B, ceil(H/32),
ceil(W/32), 1280]``; :meth:`EfficientNetLite0.logits` gives the ImageNet classifier's logits when
it is built with ``include_classifier=True``.

``frozen_blocks=n`` fine-tunes only the top of the network: the stem and the first ``n`` MBConv
blocks keep their weights (held as :class:`~rankjax.models.layers.FrozenParam`, outside the
optimizer) and BatchNorm statistics, and no gradient flows back through them
(``lax.stop_gradient`` on their output), so a train step does not compute their backward pass.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> EfficientNetLite0(rngs=nnx.Rngs(0))(jnp.zeros((2, 64, 64, 3))).shape
  (2, 2, 2, 1280)

A Lite network of other stages is ``EfficientNetLite(stages=...)`` (the tests use a tiny one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rankjax.models import layers

BN_EPSILON = 1e-3
# (expand ratio, kernel size, stride of the first block, output channels, blocks) per stage.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_FEATURES = 32
HEAD_FEATURES = 1280
NUM_CLASSES = 1000

# He et al.'s initialisation for a depthwise kernel: its fan is the k*k taps of one channel.
_depthwise_kernel_init = layers.scaled_normal_init(2.0, "fan_in")


def _conv(in_features, out_features, kernel_size, *, strides=1, groups=1, dtype, rngs):
  """A bias-free convolution with TensorFlow's "SAME" padding (asymmetric for stride 2)."""
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size),
                  strides=(strides, strides), padding="SAME", feature_group_count=groups,
                  use_bias=False, dtype=dtype, rngs=rngs,
                  kernel_init=(_depthwise_kernel_init if groups > 1 else layers.conv_kernel_init),
                  conv_general_dilated=layers.conv_general_dilated)


class MBConv(nnx.Module):
  """Inverted residual: 1x1 expansion, ``k x k`` depthwise, 1x1 projection (no SE: Lite)."""

  def __init__(self, in_features: int, out_features: int, *, expand_ratio: int,
               kernel_size: int, strides: int, dtype=jnp.float32, freeze_batchnorm: bool = False,
               rngs: nnx.Rngs):
    bn = functools.partial(layers.BatchNorm, frozen=freeze_batchnorm, epsilon=BN_EPSILON,
                           dtype=dtype, rngs=rngs)
    hidden = in_features * expand_ratio
    if expand_ratio != 1:
      self.expand_conv = _conv(in_features, hidden, 1, dtype=dtype, rngs=rngs)
      self.expand_bn = bn(hidden)
    else:
      self.expand_conv = self.expand_bn = None
    self.depthwise_conv = _conv(hidden, hidden, kernel_size, strides=strides, groups=hidden,
                                dtype=dtype, rngs=rngs)
    self.depthwise_bn = bn(hidden)
    self.project_conv = _conv(hidden, out_features, 1, dtype=dtype, rngs=rngs)
    self.project_bn = bn(out_features)
    self.residual = strides == 1 and in_features == out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    if self.expand_conv is not None:
      y = jax.nn.relu6(self.expand_bn(self.expand_conv(y)))
    y = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(y)))
    y = self.project_bn(self.project_conv(y))
    return x + y if self.residual else y


class EfficientNetLite(nnx.Module):
  """An EfficientNet-Lite feature extractor (and, optionally, its ImageNet classifier).

  Args:
    stages: ``(expand ratio, kernel size, stride of the first block, channels, blocks)`` per
      stage; :data:`LITE0_STAGES` for Lite0.
    stem_features: channels of the stem (32 in every Lite variant).
    head_features: channels of the head convolution (1280 in every Lite variant).
    num_channels: channels of the input images (3 for the ImageNet weights).
    dtype: compute dtype; parameters stay float32.
    freeze_batchnorm: normalise with the running averages in training mode too.
    frozen_blocks: train only what follows the stem and the first ``frozen_blocks`` MBConv blocks
      (0 to 16 for Lite0; 0 trains everything). The frozen part keeps its weights and its BatchNorm
      statistics, and no gradient flows through it.
    include_classifier: also hold the 1000-way ImageNet classifier (:meth:`logits`); an embedding
      model leaves it out (its weights are then skipped on loading).
    input_transform: ``None``, or ``(scale, offset, reverse_channels)`` applied to the images
      first (:func:`rankjax.models.layers.apply_input_transform`).
    rngs: parameter initialisation keys.
  """

  def __init__(self, *, stages=LITE0_STAGES, stem_features: int = STEM_FEATURES,
               head_features: int = HEAD_FEATURES, num_channels: int = 3, dtype=jnp.float32,
               freeze_batchnorm: bool = False, frozen_blocks: int = 0,
               include_classifier: bool = False, input_transform=None, rngs: nnx.Rngs):
    num_blocks = sum(stage[-1] for stage in stages)
    if (not isinstance(frozen_blocks, int) or isinstance(frozen_blocks, bool)
        or not 0 <= frozen_blocks <= num_blocks):
      raise ValueError(f"frozen_blocks must be an integer from 0 to {num_blocks} (the MBConv "
                       f"blocks to keep fixed); got {frozen_blocks!r}.")
    self.dtype = dtype
    self.input_transform = input_transform
    self.frozen_blocks = frozen_blocks
    frozen_bn = freeze_batchnorm or frozen_blocks > 0
    self.stem_conv = _conv(num_channels, stem_features, 3, strides=2, dtype=dtype, rngs=rngs)
    self.stem_bn = layers.BatchNorm(stem_features, frozen=frozen_bn, epsilon=BN_EPSILON,
                                    dtype=dtype, rngs=rngs)
    blocks = []
    in_features = stem_features
    for expand_ratio, kernel_size, strides, features, repeats in stages:
      for i in range(repeats):
        frozen_bn = freeze_batchnorm or len(blocks) < frozen_blocks
        blocks.append(MBConv(in_features, features, expand_ratio=expand_ratio,
                             kernel_size=kernel_size, strides=strides if i == 0 else 1,
                             dtype=dtype, freeze_batchnorm=frozen_bn, rngs=rngs))
        in_features = features
    self.blocks = nnx.List(blocks)
    self.head_conv = _conv(in_features, head_features, 1, dtype=dtype, rngs=rngs)
    self.head_bn = layers.BatchNorm(head_features, frozen=freeze_batchnorm, epsilon=BN_EPSILON,
                                    dtype=dtype, rngs=rngs)
    if include_classifier:
      self.classifier = nnx.Linear(head_features, NUM_CLASSES, dtype=jnp.float32,
                                   kernel_init=layers.linear_kernel_init, rngs=rngs)
    else:
      self.classifier = None
    if frozen_blocks:
      for module in (self.stem_conv, self.stem_bn, *blocks[:frozen_blocks]):
        layers.freeze_params(module)
    self.num_features = head_features
    self.downsampling = 2 * 2**sum(stage[2] == 2 for stage in stages)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.frozen_prefix(images)
    if self.frozen_blocks:
      x = jax.lax.stop_gradient(x)
    return self.from_frozen(x)

  def frozen_prefix(self, images: jax.Array) -> jax.Array:
    """The stem and the first ``frozen_blocks`` blocks: ``f32[B, H, W, C] -> [B, h, w, c]``.

    With ``frozen_blocks > 0`` its output depends on the image alone (fixed weights, BatchNorm on
    its running averages), which is what lets :mod:`rankjax.frozen_cache` compute it once.
    """
    x = layers.apply_input_transform(images, self.input_transform).astype(self.dtype)
    x = jax.nn.relu6(self.stem_bn(self.stem_conv(x)))
    for block in self.blocks[:self.frozen_blocks]:
      x = block(x)
    return x

  def frozen_modules(self) -> list[tuple[str, nnx.Module]]:
    """``(name, module)`` of what :meth:`frozen_prefix` runs: the stem and the frozen blocks."""
    return [("stem_conv", self.stem_conv), ("stem_bn", self.stem_bn),
            *((f"blocks/{i}", self.blocks[i]) for i in range(self.frozen_blocks))]

  def from_frozen(self, activations: jax.Array) -> jax.Array:
    """The part that trains, on the output of :meth:`frozen_prefix`: ``-> [B, h', w', 1280]``."""
    x = jnp.asarray(activations).astype(self.dtype)
    for block in self.blocks[self.frozen_blocks:]:
      x = block(x)
    return jax.nn.relu6(self.head_bn(self.head_conv(x)))

  def logits(self, images: jax.Array) -> jax.Array:
    """``f32[B, 1000]``: the ImageNet classifier on the globally average-pooled features."""
    if self.classifier is None:
      raise ValueError("logits() needs the ImageNet classifier: build the model with "
                       "include_classifier=True (backbone_options={'include_classifier': True}).")
    pooled = jnp.mean(self(images).astype(jnp.float32), axis=(1, 2))
    return self.classifier(pooled)


EfficientNetLite0 = functools.partial(EfficientNetLite, stages=LITE0_STAGES)
