r"""Encoders for small images (28-64 px: Omniglot, digits, MNIST-like data).

* :class:`Conv4`: the classic four-block convolutional encoder of few-shot and metric learning on
  Omniglot (Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; Snell et al.,
  "Prototypical Networks for Few-shot Learning", NeurIPS 2017): four times
  conv3x3(64)-BatchNorm-ReLU-maxpool2, so a 28 px image becomes a 1x1x64 map. With
  ``downsample="strided_conv"`` each block is instead a stride-2 conv3x3-BatchNorm-ReLU, which
  computes every convolution at the reduced resolution and trains several times faster on a CPU.
* :class:`SmallResNet`: a ResNet for small inputs, as He et al. built for CIFAR: a 3x3 stride-1
  stem without max-pooling, then stages of :class:`~rankjax.models.resnet.BasicBlock`\ s, every
  stage after the first halving the resolution.

Both map ``f32[B, H, W, C]`` to the last feature map ``[B, h, w, F]``.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> Conv4(num_channels=1, rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
  (2, 1, 1, 64)
  >>> SmallResNet(num_channels=1, rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
  (2, 4, 4, 256)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rankjax.models import layers
from rankjax.models.resnet import BasicBlock

DOWNSAMPLING = ("max_pool", "strided_conv")


class Conv4(nnx.Module):
  """``num_blocks`` x (conv3x3(``width``)-BatchNorm-ReLU-maxpool2), or stride-2 convolutions.

  Args:
    num_channels: channels of the input images (1 for Omniglot).
    width: channels of every convolution (64 in the papers).
    num_blocks: 4 in the papers.
    pool_last: downsample after the last block too (the papers). With 28 px max-pooling
      inputs the last pooling keeps only the top-left 2x2 of the 3x3 map (floor division); with
      ``False`` the map stays 3x3 and the head's global pooling sees all of it.
    widths: channels of each block, overriding ``width`` and ``num_blocks``; e.g.
      ``(64, 64, 128, 256)`` widens only the blocks at 7x7 and 3x3 (for 28 px inputs), where a
      channel costs a fraction of what it costs at 28x28.
    downsample: ``"max_pool"`` (the classic encoder: 2x2 max-pooling, floor division of the size)
      or ``"strided_conv"`` (the convolution itself has stride 2; padding 1, ceil division).
    dtype: compute dtype; parameters stay float32.
    freeze_batchnorm: normalise with the running averages in training mode too.
    rngs: parameter initialisation keys.
  """

  def __init__(self, *, num_channels: int = 1, width: int = 64, num_blocks: int = 4,
               widths: Sequence[int] | None = None, downsample: str = "max_pool",
               pool_last: bool = True, dtype=jnp.float32, freeze_batchnorm: bool = False,
               rngs: nnx.Rngs):
    if downsample not in DOWNSAMPLING:
      raise ValueError(f"downsample={downsample!r} is not one of {DOWNSAMPLING}.")
    widths = tuple(widths) if widths is not None else (width,) * num_blocks
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
      raise ValueError(f"widths must be positive integers, one per block; got {widths!r}.")
    self.downsample = downsample
    self.pool_last = pool_last
    self.dtype = dtype
    convs, bns = [], []
    in_features = num_channels
    for i, block_width in enumerate(widths):
      downsamples = pool_last or i < len(widths) - 1
      strides = 2 if downsample == "strided_conv" and downsamples else 1
      convs.append(layers.conv(in_features, block_width, 3, strides=strides, dtype=dtype,
                               rngs=rngs))
      bns.append(layers.BatchNorm(block_width, frozen=freeze_batchnorm, dtype=dtype, rngs=rngs))
      in_features = block_width
    self.convs = nnx.List(convs)
    self.bns = nnx.List(bns)
    self.num_features = in_features
    self.num_blocks = len(widths)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = nnx.relu(bn(conv(x)))
      if self.downsample == "max_pool" and (self.pool_last or i < self.num_blocks - 1):
        x = layers.max_pool(x, 2, 2)
    return x

  def output_size(self, size: int) -> int:
    """Height (or width) of the last feature map for an input of ``size`` pixels."""
    for _ in range(self.num_blocks if self.pool_last else self.num_blocks - 1):
      size = size // 2 if self.downsample == "max_pool" else (size + 1) // 2
    return size


class SmallResNet(nnx.Module):
  """3x3 stem (no max-pool), then stages of basic residual blocks.

  Args:
    num_channels: channels of the input images.
    widths: channels of each stage (the stem has ``widths[0]``).
    stage_sizes: residual blocks per stage.
    dtype: compute dtype; parameters stay float32.
    freeze_batchnorm: normalise with the running averages in training mode too.
    rngs: parameter initialisation keys.
  """

  def __init__(self, *, num_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 256),
               stage_sizes: Sequence[int] = (1, 1, 1, 1), dtype=jnp.float32,
               freeze_batchnorm: bool = False, rngs: nnx.Rngs):
    if len(widths) != len(stage_sizes):
      raise ValueError(f"widths {tuple(widths)} and stage_sizes {tuple(stage_sizes)} must have "
                       "one entry per stage.")
    self.dtype = dtype
    self.stem_conv = layers.conv(num_channels, widths[0], 3, dtype=dtype, rngs=rngs)
    self.stem_bn = layers.BatchNorm(widths[0], frozen=freeze_batchnorm, dtype=dtype, rngs=rngs)
    stages = []
    in_features = widths[0]
    for i, (width, num_blocks) in enumerate(zip(widths, stage_sizes)):
      blocks = []
      for j in range(num_blocks):
        blocks.append(BasicBlock(in_features, width, strides=2 if i > 0 and j == 0 else 1,
                                 dtype=dtype, freeze_batchnorm=freeze_batchnorm, rngs=rngs))
        in_features = width
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = in_features
    self.downsampling = 2**(len(widths) - 1)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return x
