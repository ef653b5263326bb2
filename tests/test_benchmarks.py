"""Tests of the benchmarks' own arithmetic (the FLOP count behind train_step.py's MFU) and
settings (the OpenBLAS kernel evaluation.py asks of faiss)."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rankjax import models

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
_SPEC = importlib.util.spec_from_file_location("train_step_benchmark", _PATH)
train_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_step)


@functools.cache  # Once per process: the scripts define their absl flags at import.
def _load_benchmark(name):
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("cpu_flags,expected", [
    ("fpu sse2 avx2 avx512f avx512bw avx512vl amx_tile", "SkylakeX"),
    ("fpu sse2 avx2 avx512f", "Haswell"),  # AVX-512 without BW / VL: not a SkylakeX kernel.
    ("fpu sse2 sse3", None),
])
def test_faiss_openblas_coretype_follows_the_cpu_flags(tmp_path, monkeypatch, cpu_flags,
                                                       expected):
  evaluation = _load_benchmark("evaluation")
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
  real_open = open
  monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
      cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
  assert evaluation.openblas_coretype("auto") == expected
  assert evaluation.openblas_coretype("none") is None
  assert evaluation.openblas_coretype("Zen") == "Zen"


def test_matmul_flops_counts_convolutions_products_and_scan_bodies():
  x = jnp.ones((2, 8, 8, 3))
  kernel = jnp.ones((3, 3, 3, 5))          # HWIO
  depthwise = jnp.ones((1, 1, 1, 3))       # 3 groups of one input channel
  dense = jnp.ones((320, 4))
  square = jnp.ones((4, 4))

  @jax.jit
  def f(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))   # [2, 8, 8, 5]
    z = jax.lax.conv_general_dilated(x, depthwise, (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=3)                         # [2, 4, 4, 3]
    h = y.reshape(2, 320) @ dense                                                   # [2, 4]
    h, _ = jax.lax.scan(lambda c, _: (c @ square, None), h, None, length=3)         # 3 x [2, 4]
    return h.sum() + z.sum()

  expected = (2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)      # each output: a 3x3x3 window
              + 2 * (2 * 4 * 4 * 3) * 1              # depthwise: one input channel per output
              + 2 * 2 * 4 * 320                      # [2, 320] @ [320, 4]
              + 3 * 2 * 2 * 4 * 4)                   # the scan body, three times
  assert train_step.matmul_flops(jax.make_jaxpr(f)(x)) == expected


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.81), ("resnet34", 3.66)])
def test_matmul_flops_of_resnets_match_published_counts(name, gmacs):
  # Multiply-adds at 224 px as torchvision lists them (ResNet-18 1.81, ResNet-34 3.66 "GFLOPS",
  # which count multiply-adds), plus the 512 x 128 head instead of the 1000-way classifier.
  model = models.get_model(name, embedding_dim=128, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.ones((1, 224, 224, 3)))
  np.testing.assert_allclose(train_step.matmul_flops(jaxpr) / 2e9, gmacs, rtol=0.01)
