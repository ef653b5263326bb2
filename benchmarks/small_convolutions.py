r"""XLA's convolution beside the patch-matrix route on tiny feature maps, forward + backward.

``rankjax.models.layers.conv_general_dilated`` computes a convolution whose output is at most 2x2
pixels as one matrix product over the kernel's shifted slices (``layers.patch_matmul_conv``) on
the CPU, because XLA:CPU's convolution is far slower there. This script times both routes for
the 3x3 convolutions of ResNet-18's last stages (batch 64, float32, stride 1 unless the row says
stride 2), value and gradients with respect to the input and the kernel, best of 3 x 3 calls,
and prints which route rankjax takes on this backend::

  python benchmarks/small_convolutions.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from rankjax.models import layers

# (input size, in channels, out channels, stride).
CASES = [(7, 512, 512, 1), (4, 512, 512, 1), (3, 512, 512, 1), (2, 512, 512, 1),
         (4, 256, 512, 2), (2, 128, 128, 1), (1, 512, 512, 1)]
_NHWC = ("NHWC", "HWIO", "NHWC")


def seconds(fn, *args, calls=3, repeats=3):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def value_and_grads(conv):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))


def main():
  rng = np.random.default_rng(0)
  print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}; batch 64, 3x3 kernels, "
        "forward + backward, ms")
  print(f"{'input':>6} {'channels':>10} {'stride':>6} {'output':>6} {'XLA conv':>9} "
        f"{'patches':>8} {'speed-up':>8} {'rankjax uses':>13}")
  for size, cin, cout, stride in CASES:
    x = jnp.asarray(rng.normal(size=(64, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    padding = ((1, 1), (1, 1))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
    xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                    dimension_numbers=numbers)
    patches = lambda x, w: layers.patch_matmul_conv(x, w, (stride, stride), padding)
    ours = lambda x, w: layers.conv_general_dilated(x, w, (stride, stride), padding,
                                                    dimension_numbers=numbers)
    np.testing.assert_allclose(patches(x, w), xla(x, w), rtol=1e-3, atol=1e-3)
    primitives = {str(e.primitive) for e in jax.make_jaxpr(ours)(x, w).jaxpr.eqns}
    route = "patches" if "dot_general" in primitives else "XLA conv"
    t_xla, t_patches = (seconds(value_and_grads(f), x, w) * 1e3 for f in (xla, patches))
    out = (size + 2 - 3) // stride + 1
    print(f"{size:>4}px {cin:>4}->{cout:<4} {stride:>6} {out:>4}px {t_xla:>9.1f} "
          f"{t_patches:>8.1f} {t_xla / t_patches:>7.1f}x {route:>13}", flush=True)


if __name__ == "__main__":
  main()
