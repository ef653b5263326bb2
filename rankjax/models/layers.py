"""Layers the encoders share: a freezable BatchNorm, explicitly padded convolutions, max-pooling.

Padding is explicit (``(k - 1) // 2`` on every side, as PyTorch and Keras' ``ZeroPadding2D`` do)
rather than ``"SAME"``: for an even input, XLA's ``"SAME"`` pads a 7x7 stride-2 convolution by
(2, 3) instead of (3, 3), which shifts every feature and breaks imported weights.

Convolutions whose output is at most 2x2 pixels run on the CPU as one matrix product over
explicit patches (:func:`conv_general_dilated`): there XLA's CPU convolution is 10 to 80 times
slower than the matrix product (benchmarks/small_convolutions.py), which made ResNet-18's last stage
at 64 px (2x2 maps of 512 channels) cost most of its train step; so do 1x1 convolutions, which
are a matrix product. Depthwise convolutions (one group per channel, as in MobileNets and
EfficientNets) run on the CPU as a sum of the kernel's shifted slices times the per-channel
weights: XLA:CPU's grouped convolution is several times slower (benchmarks/efficientnet.py).

Max-pooling is written as an elementwise maximum over strided slices instead of
``lax.reduce_window``. The forward pass is identical, but the gradient becomes a chain of selects:
XLA on the CPU lowers the gradient of ``reduce_window`` to ``select_and_scatter``, which is several
times slower than the convolutions around it (see ``benchmarks/encoder_downsampling.py``).
"""

from __future__ import annotations

import functools
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
  ``nnx.Param`` variables.
  """

  def __init__(self, num_features: int, *, frozen: bool = False, **kwargs):
    kwargs.setdefault("momentum", BATCHNORM_MOMENTUM)
    super().__init__(num_features, **kwargs)
    self.frozen = frozen

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.frozen:
      use_running_average = True
    return super().__call__(x, use_running_average, mask=mask)


class FrozenParam(nnx.Variable):
  """A weight that training leaves alone: not an ``nnx.Param``, so it gets no gradient, no
  optimizer state and no weight decay, yet saves, loads and checkpoints like any variable."""


def freeze_params(module: nnx.Module) -> None:
  """Turns every ``nnx.Param`` of ``module`` (and its submodules) into a :class:`FrozenParam`."""
  for _, submodule in nnx.iter_modules(module):
    for name, value in list(vars(submodule).items()):
      if isinstance(value, nnx.Param):
        setattr(submodule, name, FrozenParam(value.get_value()))


def apply_input_transform(images: jax.Array, input_transform) -> jax.Array:
  """``images * scale + offset`` per channel, then RGB -> BGR if asked; ``None`` leaves them.

  ``input_transform`` is ``(scale, offset, reverse_channels)``: how a pretrained network receives
  images in the convention it was trained with, from the standardised RGB the pipelines give.
  """
  if input_transform is None:
    return images
  scale, offset, reverse_channels = input_transform
  images = images * jnp.asarray(scale, images.dtype) + jnp.asarray(offset, images.dtype)
  return images[..., ::-1] if reverse_channels else images


def conv(in_features: int, out_features: int, kernel_size: int, *, strides: int = 1,
         dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A bias-free square convolution padded by ``(kernel_size - 1) // 2`` on every side."""
  pad = (kernel_size - 1) // 2
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size),
                  strides=(strides, strides), padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs,
                  conv_general_dilated=conv_general_dilated)


# Outputs up to this many pixels a side take the patch-matrix route on the CPU. XLA:CPU (jaxlib
# 0.10), batch 64, 3x3 kernels, 512 -> 512 channels, forward + backward: a 2x2 output takes 747 ms
# as a convolution and 9.5 ms as patches @ kernel; 4x4 and 7x7 outputs take the same time either
# way (benchmarks/small_convolutions.py).
_PATCH_MATMUL_MAX_OUTPUT = 2
_NHWC = ("NHWC", "HWIO", "NHWC")
# The CPU routes of conv_general_dilated that are on: "patches" (outputs of at most 2x2),
# "depthwise" (shifted-slice sums) and "pointwise" (an unpadded 1x1 convolution as one matrix
# product: 1.3-5x faster than XLA:CPU's convolution at EfficientNet's shapes, forward + backward).
# Benchmarks switch them off to measure each against lax.
CPU_ROUTES = frozenset({"patches", "depthwise", "pointwise"})


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
  r"""``lax.conv_general_dilated``, computed as patches @ kernel where XLA:CPU is slow.

  For an NHWC input ``x: [B, H, W, C]`` (padded), an HWIO kernel ``w: [k_h, k_w, C, O]`` and
  strides ``(s_h, s_w)``, the output is

  .. math::

     y_{b, i, j, o} = \sum_{u, v, c} x_{b,\, s_h i + u,\, s_w j + v,\, c}\, w_{u, v, c, o},

  i.e. the ``k_h k_w`` strided slices of ``x`` concatenated along channels ``[B, H', W', k_h k_w
  C]`` times ``w`` reshaped to ``[k_h k_w C, O]``. That route is taken on the CPU backend for a
  plain convolution (no dilation, one group, NHWC / HWIO) whose output is at most 2x2 pixels, and
  for an unpadded 1x1 convolution (one strided slice times ``w``, whatever its size). A
  depthwise convolution (``feature_group_count == C``, kernel ``[k_h, k_w, 1, C]``) takes
  :func:`depthwise_shift_conv` on the CPU, whatever its size. Anything else calls
  ``lax.conv_general_dilated`` unchanged. String padding (``"SAME"``, ``"VALID"``) is resolved to
  lax's explicit pads first. Same values up to the order of the float sums, same gradients; the
  parameters are untouched.
  """
  if isinstance(padding, str) and _is_nhwc(lhs, rhs, dimension_numbers):
    padding = tuple(jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                            padding))
  route = _cpu_route(lhs, rhs, window_strides, padding, dimension_numbers,
                     dilations=tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()),
                     groups=feature_group_count, out_sharding=kwargs.get("out_sharding"))
  if route == "patches":
    return patch_matmul_conv(lhs, rhs, window_strides, padding, precision=precision,
                             preferred_element_type=preferred_element_type)
  if route == "depthwise":
    return depthwise_shift_conv(lhs, rhs, window_strides, padding,
                                preferred_element_type=preferred_element_type)
  if preferred_element_type is not None:
    kwargs["preferred_element_type"] = preferred_element_type
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kwargs)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or dimension_numbers is None:  # None is lax's NCHW / OIHW default.
    return False
  as_given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return as_given == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def _cpu_route(lhs, rhs, strides, padding, dimension_numbers, *, dilations, groups,
               out_sharding) -> str | None:
  """``"patches"``, ``"depthwise"`` or ``None`` (lax): how :func:`conv_general_dilated` runs."""
  if (jax.default_backend() != "cpu" or isinstance(padding, str) or out_sharding is not None
      or any(d != 1 for d in dilations) or not _is_nhwc(lhs, rhs, dimension_numbers)):
    return None
  kh, kw, kernel_in, kernel_out = rhs.shape
  if groups != 1:
    depthwise = groups == lhs.shape[3] == kernel_out and kernel_in == 1
    return "depthwise" if depthwise and kh * kw > 1 and "depthwise" in CPU_ROUTES else None
  (top, bottom), (left, right) = padding
  if kh * kw == 1:
    unpadded = top == bottom == left == right == 0
    return "patches" if unpadded and "pointwise" in CPU_ROUTES else None
  out_h = (lhs.shape[1] + top + bottom - kh) // strides[0] + 1
  out_w = (lhs.shape[2] + left + right - kw) // strides[1] + 1
  small = 0 < max(out_h, out_w) <= _PATCH_MATMUL_MAX_OUTPUT
  return "patches" if small and "patches" in CPU_ROUTES else None


def _shifted_slices(x, kh: int, kw: int, strides, padding):
  """Yields ``(u, v, x_pad[:, u::s_h, v::s_w][:, :H', :W'])`` for every kernel offset."""
  (top, bottom), (left, right) = padding
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  batch, height, width, channels = x.shape
  out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
  for u in range(kh):
    for v in range(kw):
      yield u, v, jax.lax.slice(
          x, (0, u, v, 0), (batch, u + sh * (out_h - 1) + 1, v + sw * (out_w - 1) + 1, channels),
          (1, sh, sw, 1))


def patch_matmul_conv(x, kernel, strides, padding, *, precision=None, preferred_element_type=None):
  """An NHWC / HWIO convolution with explicit ``padding`` as patches @ kernel (any output size).

  ``x: [B, H, W, C]``, ``kernel: [k_h, k_w, C, O]``, ``strides: (s_h, s_w)``, ``padding:
  ((top, bottom), (left, right))`` -> ``[B, H', W', O]``; see :func:`conv_general_dilated`.
  """
  kh, kw, cin, cout = kernel.shape
  patches = jnp.concatenate(
      [piece for _, _, piece in _shifted_slices(x, kh, kw, strides, padding)], axis=-1)
  return jax.lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                             (((3,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


def depthwise_shift_conv(x, kernel, strides, padding, *, preferred_element_type=None):
  r"""A depthwise NHWC convolution as a sum of shifted slices times per-channel weights.

  ``x: [B, H, W, C]``, ``kernel: [k_h, k_w, 1, C]`` (HWIO with one input channel per group),
  ``strides: (s_h, s_w)``, ``padding: ((top, bottom), (left, right))`` -> ``[B, H', W', C]``:

  .. math::

     y_{b, i, j, c} = \sum_{u, v} x_{b,\, s_h i + u,\, s_w j + v,\, c}\, w_{u, v, 0, c}

  over the zero-padded ``x``: ``lax.conv_general_dilated(..., feature_group_count=C)``. Elementwise
  products and sums, which XLA:CPU fuses, instead of its slow grouped convolution. The kernel's
  gradient :math:`\partial w_{u, v, 0, c} = \sum_{b, i, j} \bar y_{b, i, j, c}\, x_{b,\, s_h i + u,
  \, s_w j + v,\, c}` is computed one offset :math:`(u, v)` at a time, in a loop: XLA:CPU runs the
  :math:`k_h k_w` reductions 2-3 times slower when it fuses them together.
  """
  dtype = jnp.dtype(preferred_element_type or jnp.result_type(x, kernel))
  return _depthwise(x, kernel, tuple(strides), tuple(map(tuple, padding)), dtype)


def _depthwise_sum(x, kernel, strides, padding, dtype):
  kh, kw = kernel.shape[:2]
  out = None
  for u, v, piece in _shifted_slices(x, kh, kw, strides, padding):
    term = (piece * kernel[u, v, 0]).astype(dtype)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, strides, padding, dtype):
  return _depthwise_sum(x, kernel, strides, padding, dtype)


def _depthwise_forward(x, kernel, strides, padding, dtype):
  return _depthwise_sum(x, kernel, strides, padding, dtype), (x, kernel)


def _depthwise_backward(strides, padding, dtype, residuals, cotangent):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _depthwise_sum(x, kernel, strides, padding, dtype), x)
  (dx,) = input_vjp(cotangent)
  (top, bottom), (left, right) = padding
  kh, kw, _, channels = kernel.shape
  sh, sw = strides
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  batch, out_h, out_w, _ = cotangent.shape
  window = (batch, sh * (out_h - 1) + 1, sw * (out_w - 1) + 1, channels)

  def tap(offset):
    piece = jax.lax.dynamic_slice(padded, (0, offset[0], offset[1], 0), window)[:, ::sh, ::sw]
    return jnp.sum(cotangent * piece, axis=(0, 1, 2), dtype=jnp.float32)

  offsets = jnp.array([(u, v) for u in range(kh) for v in range(kw)], jnp.int32)
  dkernel = jax.lax.map(tap, offsets).reshape(kh, kw, 1, channels)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_forward, _depthwise_backward)


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
