"""Layers the encoders share: a freezable BatchNorm, explicitly padded convolutions, max-pooling.

Padding is explicit (``(k - 1) // 2`` on every side, as PyTorch and Keras' ``ZeroPadding2D`` do)
rather than ``"SAME"``: for an even input, XLA's ``"SAME"`` pads a 7x7 stride-2 convolution by
(2, 3) instead of (3, 3), which shifts every feature and breaks imported weights.

Max-pooling is written as an elementwise maximum over strided slices instead of
``lax.reduce_window``. The forward pass is identical, but the gradient becomes a chain of selects:
XLA on the CPU lowers the gradient of ``reduce_window`` to ``select_and_scatter``, which is several
times slower than the convolutions around it (see ``benchmarks/encoder_downsampling.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Random numbers are drawn in blocks of this fixed size, see `scaled_normal_init`.
_BLOCK = 2**16


@jax.jit
def _normal_block(key):
  return jax.random.normal(key, (_BLOCK,), jnp.float32)


def scaled_normal_init(scale: float, mode: str):
  r"""A variance-scaling initialiser: :math:`\mathcal{N}(0, \text{scale} / \text{fan})`.

  ``mode`` is ``"fan_in"`` or ``"fan_out"``, with fans as ``jax.nn.initializers.variance_scaling``
  computes them for ``[..., in, out]`` kernels. The numbers come from fixed-size blocks of
  ``jax.random.normal`` (one block per ``fold_in(key, i)``), so XLA compiles the random number
  generator once instead of once per kernel shape: on a 2-core CPU that compilation takes
  0.5-3 s a shape, which made building a ResNet take tens of seconds.
  """

  def init(key, shape, dtype=jnp.float32):
    receptive = math.prod(shape[:-2])
    fan = shape[-2] * receptive if mode == "fan_in" else shape[-1] * receptive
    n = math.prod(shape)
    blocks = [_normal_block(jax.random.fold_in(key, i)) for i in range(-(-n // _BLOCK))]
    flat = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)
    return (flat[:n].reshape(shape) * math.sqrt(scale / fan)).astype(dtype)

  return init


# He et al. (2015) initialisation, fan-out, as torchvision's ResNets use.
conv_kernel_init = scaled_normal_init(2.0, "fan_out")
# LeCun normal (NNX's default for Linear, untruncated here).
linear_kernel_init = scaled_normal_init(1.0, "fan_in")

# Flax's ImageNet example (and PyTorch's 0.1) rather than NNX's default 0.99: short DML runs need
# the running averages to catch up within a few hundred steps.
BATCHNORM_MOMENTUM = 0.9


class BatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` whose statistics can be frozen.

  With ``frozen=True`` the layer always normalises with its running averages and never updates
  them, whatever ``model.train()`` / ``model.eval()`` / ``nnx.view`` set: the standard recipe for
  fine-tuning a pretrained encoder on small retrieval datasets (CUB, Cars, SOP), where batches of a
  few classes give poor batch statistics. The affine ``scale`` and ``bias`` stay trainable
  ``Param``s.
  """

  def __init__(self, num_features: int, *, frozen: bool = False, **kwargs):
    kwargs.setdefault("momentum", BATCHNORM_MOMENTUM)
    super().__init__(num_features, **kwargs)
    self.frozen = frozen

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.frozen:
      use_running_average = True
    return super().__call__(x, use_running_average, mask=mask)


def conv(in_features: int, out_features: int, kernel_size: int, *, strides: int = 1,
         dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A bias-free square convolution padded by ``(kernel_size - 1) // 2`` on every side."""
  pad = (kernel_size - 1) // 2
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size),
                  strides=(strides, strides), padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max-pooling of ``x: [B, H, W, C]`` with a square window, as ``nnx.max_pool`` computes it.

  Output size ``floor((H + 2 * padding - window) / stride) + 1``, padding with ``-inf``. Windows
  that tile the input (``window == stride``) use a reshape; overlapping ones a separable maximum,
  first over ``window`` strided row slices, then over column slices. Both have cheap gradients on
  the CPU. Where a window holds several equal maxima the gradient is shared between them
  (``reduce_window`` gives it to one); both are valid subgradients.

  Example:
    >>> import jax.numpy as jnp
    >>> max_pool(jnp.arange(16.).reshape(1, 4, 4, 1), 2, 2)[0, ..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
  """
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
  out_h = (x.shape[1] - window) // stride + 1
  out_w = (x.shape[2] - window) // stride + 1
  if window == stride:
    b, _, _, c = x.shape
    x = x[:, :out_h * window, :out_w * window]
    return jnp.max(x.reshape(b, out_h, window, out_w, window, c), axis=(2, 4))
  rows = None
  for i in range(window):
    piece = x[:, i:i + stride * (out_h - 1) + 1:stride]
    rows = piece if rows is None else jnp.maximum(rows, piece)
  out = None
  for j in range(window):
    piece = rows[:, :, j:j + stride * (out_w - 1) + 1:stride]
    out = piece if out is None else jnp.maximum(out, piece)
  return out
