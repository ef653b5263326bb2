r"""CPU time of an encoder train step: max-pooling implementations vs strided convolutions.

XLA on the CPU lowers the gradient of ``lax.reduce_window`` max-pooling (what ``nnx.max_pool``
uses) to ``select_and_scatter``, which is slow. This script times a full train step (forward,
backward through a contrastive loss, SGD update, BatchNorm statistics) of the small encoders at
28 px, batch 128, one channel, for:

* ``conv4`` with ``nnx.max_pool`` (``reduce_window``): the reference;
* ``conv4`` with rankjax's max-pool (same forward values; reshape / strided slices + ``maximum``);
* ``conv4_strided`` (stride-2 convolutions, no pooling);
* ``small_resnet`` (and a wider variant);
* optionally ``resnet18`` at 64 px with either max-pool (``--resnet18``).

Run: ``python benchmarks/encoder_downsampling.py [--steps=10] [--resnet18] [--pools]``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rankjax import models, similarity
from rankjax.models import layers

_fast_max_pool = layers.max_pool


def _reduce_window_max_pool(x, window, stride, padding=0):
  return nnx.max_pool(x, (window, window), (stride, stride),
                      padding=((padding, padding), (padding, padding)))


def _contrastive(embeddings, labels, margin=0.5):
  d = similarity.pairwise_distances(embeddings)
  pos = similarity.positive_mask(labels)
  neg = similarity.negative_mask(labels)
  loss = jnp.where(pos, d**2, 0.0) + jnp.where(neg, jax.nn.relu(margin - d)**2, 0.0)
  return jnp.sum(loss) / labels.shape[0]**2


def time_train_step(name, *, image_size, batch, channels, steps, max_pool_impl,
                    backbone_options=None):
  layers.max_pool = max_pool_impl  # Looked up at trace time by the encoders.
  try:
    model = models.get_model(name, num_channels=channels, embedding_dim=128, normalize=True,
                             rngs=nnx.Rngs(0), backbone_options=backbone_options)

    @nnx.jit
    def step(model, images, labels):
      loss, grads = nnx.value_and_grad(lambda m: _contrastive(m(images), labels))(model)
      params = nnx.state(model, nnx.Param)
      nnx.update(model, jax.tree.map(lambda p, g: p - 0.01 * g, params, grads))
      return loss

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, image_size, image_size, channels)), jnp.float32)
    labels = jnp.asarray(np.repeat(np.arange(batch // 4), 4), jnp.int32)
    t0 = time.perf_counter()
    loss = step(model, images, labels)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      loss = step(model, images, labels)
      loss.block_until_ready()
      times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times)), float(loss)
  finally:
    layers.max_pool = _fast_max_pool


def time_pools(reps=20):
  """Forward + backward of the pooling alone: (reference ms, rankjax ms) per shape, best of reps."""
  rows = []
  for label, shape, (window, stride, padding) in (
      ("max-pool 2x2 of 128x28x28x64 (conv4)", (128, 28, 28, 64), (2, 2, 0)),
      ("max-pool 3x3/2 of 128x32x32x64 (stem)", (128, 32, 32, 64), (3, 2, 1))):
    x = jax.random.normal(jax.random.key(0), shape)
    timings = []
    for impl in (_reduce_window_max_pool, _fast_max_pool):
      grad = jax.jit(jax.grad(lambda x, impl=impl: jnp.sum(jnp.sin(impl(x, window, stride,
                                                                         padding)))))
      grad(x).block_until_ready()
      best = np.inf
      for _ in range(reps):
        t0 = time.perf_counter()
        grad(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
      timings.append(1e3 * best)
    rows.append((label, *timings))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--resnet18", action="store_true", help="also time resnet18 at 64 px")
  parser.add_argument("--only", default="", help="time only the rows whose label contains this")
  parser.add_argument("--pools", action="store_true", help="also time the max-pools alone")
  args = parser.parse_args()
  rows = [
      ("conv4, nnx.max_pool (reference)", "conv4", 28, 1, _reduce_window_max_pool, None),
      ("conv4, rankjax max_pool", "conv4", 28, 1, _fast_max_pool, None),
      ("conv4_strided", "conv4_strided", 28, 1, _fast_max_pool, None),
      ("small_resnet (32-64-128-256)", "small_resnet", 28, 1, _fast_max_pool, None),
      ("small_resnet (64-128-256-512)", "small_resnet", 28, 1, _fast_max_pool,
       {"widths": (64, 128, 256, 512)}),
  ]
  if args.resnet18:
    rows += [
        ("resnet18 64px, nnx.max_pool", "resnet18", 64, 3, _reduce_window_max_pool, None),
        ("resnet18 64px, rankjax max_pool", "resnet18", 64, 3, _fast_max_pool, None),
    ]
  print(f"train step, batch {args.batch}, median of {args.steps} steps, "
        f"{jax.devices()[0].device_kind} x{len(jax.devices())}")
  if args.pools:
    print(f"| {'max-pool forward + backward':42s} | nnx.max_pool ms | rankjax ms | speed-up |")
    print(f"|{'-' * 44}|-----------------|------------|----------|")
    for label, ref_ms, ours_ms in time_pools():
      print(f"| {label:42s} | {ref_ms:15.1f} | {ours_ms:10.1f} | {ref_ms / ours_ms:7.2f}x |")
    print()
  print(f"| {'encoder':34s} | px | compile s | step ms | images/s | vs reference |")
  print(f"|{'-' * 36}|----|-----------|---------|----------|--------------|")
  reference = None
  for label, name, size, channels, impl, options in rows:
    if args.only not in label:
      continue
    compile_s, step_s, _ = time_train_step(name, image_size=size, batch=args.batch,
                                           channels=channels, steps=args.steps,
                                           max_pool_impl=impl, backbone_options=options)
    if impl is _reduce_window_max_pool or reference is None:
      reference = step_s  # Each group is compared with its own nnx.max_pool row.
    print(f"| {label:34s} | {size:2d} | {compile_s:9.1f} | {1e3 * step_s:7.1f} | "
          f"{args.batch / step_s:8.0f} | {reference / step_s:11.2f}x |", flush=True)


if __name__ == "__main__":
  main()
