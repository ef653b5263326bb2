r"""ImageNet ResNets in Flax NNX: a stage-size table and a block class.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

The network is a stem (7x7 convolution with stride 2, BatchNorm, ReLU, 3x3 max-pool with stride 2)
followed by four stages; stage ``i`` stacks ``stage_sizes[i]`` blocks of width ``64 * 2**i``, the
first block of every stage but the first halving the resolution. Variants are partial applications
over the table and the block class, as in the Flax ImageNet example:

======== ============ ============== ================
name     stage sizes  block          output features
======== ============ ============== ================
ResNet18 2, 2, 2, 2   BasicBlock     512
ResNet34 3, 4, 6, 3   BasicBlock     512
ResNet50 3, 4, 6, 3   Bottleneck     2048
======== ============ ============== ================

``ResNet50`` is ResNet v1 exactly as Keras' ``keras.applications.ResNet50`` builds it, so that its
ImageNet weights import without change (:mod:`rankjax.models.keras_import`): the stride of a
downsampling bottleneck sits on its first 1x1 convolution (torchvision's "v1.5" puts it on the 3x3),
BatchNorm uses Keras' ``epsilon=1.001e-5``, and the stem pads explicitly by 3 (Keras'
``ZeroPadding2D(3)`` before a valid convolution). Keras' convolutions carry a bias; every one of
them feeds a BatchNorm, so the import folds it into the running mean and these convolutions have
none.

The backbone maps ``f32[B, H, W, C]`` images to the last feature map ``[B, ceil(H/32), ceil(W/32),
F]``; pooling and projection live in :class:`rankjax.models.head.EmbeddingHead`.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> net = ResNet18(rngs=nnx.Rngs(0))
  >>> net(jnp.zeros((2, 64, 64, 3))).shape
  (2, 2, 2, 512)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rankjax.models import layers

KERAS_BN_EPSILON = 1.001e-5


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions and an identity (or 1x1 projection) shortcut; stride on the first."""

  expansion = 1

  def __init__(self, in_features: int, features: int, *, strides: int = 1, dtype=jnp.float32,
               freeze_batchnorm: bool = False, bn_epsilon: float = 1e-5, rngs: nnx.Rngs):
    bn = functools.partial(layers.BatchNorm, frozen=freeze_batchnorm, epsilon=bn_epsilon,
                           dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_features, features, 3, strides=strides, dtype=dtype, rngs=rngs)
    self.bn1 = bn(features)
    self.conv2 = layers.conv(features, features, 3, dtype=dtype, rngs=rngs)
    # Zero-initialised last scale: every block starts as the identity (Goyal et al., 2017).
    self.bn2 = bn(features, scale_init=nnx.initializers.zeros)
    if strides != 1 or in_features != features:
      self.shortcut_conv = layers.conv(in_features, features, 1, strides=strides, dtype=dtype,
                                       rngs=rngs)
      self.shortcut_bn = bn(features)
    else:
      self.shortcut_conv = self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x))
    return nnx.relu(x + y)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) with a projection shortcut; ResNet v1 as Keras builds it.

  ``stride_in_1x1=True`` (Keras, the original paper) puts a block's stride on its first 1x1
  convolution; ``False`` puts it on the 3x3 (torchvision's "v1.5").
  """

  expansion = 4

  def __init__(self, in_features: int, features: int, *, strides: int = 1, dtype=jnp.float32,
               freeze_batchnorm: bool = False, bn_epsilon: float = 1e-5,
               stride_in_1x1: bool = True, rngs: nnx.Rngs):
    bn = functools.partial(layers.BatchNorm, frozen=freeze_batchnorm, epsilon=bn_epsilon,
                           dtype=dtype, rngs=rngs)
    out_features = features * self.expansion
    s1, s3 = (strides, 1) if stride_in_1x1 else (1, strides)
    self.conv1 = layers.conv(in_features, features, 1, strides=s1, dtype=dtype, rngs=rngs)
    self.bn1 = bn(features)
    self.conv2 = layers.conv(features, features, 3, strides=s3, dtype=dtype, rngs=rngs)
    self.bn2 = bn(features)
    self.conv3 = layers.conv(features, out_features, 1, dtype=dtype, rngs=rngs)
    self.bn3 = bn(out_features, scale_init=nnx.initializers.zeros)
    if strides != 1 or in_features != out_features:
      self.shortcut_conv = layers.conv(in_features, out_features, 1, strides=strides, dtype=dtype,
                                       rngs=rngs)
      self.shortcut_bn = bn(out_features)
    else:
      self.shortcut_conv = self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x))
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """ResNet backbone: ImageNet stem, then ``len(stage_sizes)`` stages of ``block_cls``.

  Args:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck` (or a partial of one).
    num_filters: width of the stem and of the first stage (doubled at every stage).
    num_channels: channels of the input images.
    dtype: compute dtype (``jnp.bfloat16`` on accelerators); parameters stay float32.
    freeze_batchnorm: normalise with the running averages in training mode too.
    bn_epsilon: BatchNorm epsilon (Keras' 1.001e-5 for the importable ResNet-50).
    input_transform: ``None``, or ``(scale, offset, reverse_channels)`` applied to the images
      before the stem (``x * scale + offset`` per channel, then RGB -> BGR if asked): how a
      pretrained network receives images in the convention it was trained with.
    rngs: parameter initialisation keys.
  """

  def __init__(self, *, stage_sizes: Sequence[int], block_cls, num_filters: int = 64,
               num_channels: int = 3, dtype=jnp.float32, freeze_batchnorm: bool = False,
               bn_epsilon: float = 1e-5, input_transform=None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.input_transform = input_transform
    self.stem_conv = layers.conv(num_channels, num_filters, 7, strides=2, dtype=dtype, rngs=rngs)
    self.stem_bn = layers.BatchNorm(num_filters, frozen=freeze_batchnorm, epsilon=bn_epsilon,
                                    dtype=dtype, rngs=rngs)
    stages = []
    in_features = num_filters
    for i, num_blocks in enumerate(stage_sizes):
      blocks = []
      for j in range(num_blocks):
        block = block_cls(in_features, num_filters * 2**i,
                          strides=2 if i > 0 and j == 0 else 1, dtype=dtype,
                          freeze_batchnorm=freeze_batchnorm, bn_epsilon=bn_epsilon, rngs=rngs)
        in_features = num_filters * 2**i * block.expansion
        blocks.append(block)
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = in_features
    # The height and width the last stage divides an image by.
    self.downsampling = 4 * 2**(len(stage_sizes) - 1)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = layers.apply_input_transform(images, self.input_transform).astype(self.dtype)
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    # Padding with -inf equals Keras' zero padding here: the input is a ReLU output, >= 0.
    x = layers.max_pool(x, 3, 2, padding=1)
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck,
                             bn_epsilon=KERAS_BN_EPSILON)
# Only for fast tests: the ResNet-18 layout at 1/8 of the width, one block per stage.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock,
                               num_filters=8)
