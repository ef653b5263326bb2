r"""The share of the batch diagnostics in a train step: computed on every step, or on none.

The train step (:func:`rankjax.train_state.make_train_step`) reports batch diagnostics (the
active-triplet fraction from a pairwise distance matrix and a sorted hinge count, mean distances
and norms) beside the loss. They are logged every ``config.train.log_every`` steps; this measures
what computing them on every step costs. Each row times the same step, built twice in the same
process: with the diagnostics on every step (``diagnostics_every=1``), behind a ``lax.cond`` that
is false on every timed step (``diagnostics_every`` larger than the run: what logging every n
steps costs on the other steps), and not built at all (``None``); the three are timed in turns so
that a change of load on a shared machine falls on all of them. The share is (every step - none)
/ every step. Best of ``--repeats`` x ``--steps`` steps, on
one fixed batch::

  python benchmarks/diagnostics.py
  python benchmarks/diagnostics.py --models small_resnet --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import os
import time
import types

import jax
import numpy as np

from rankjax import configs
from rankjax import losses
from rankjax import optim
from rankjax import parallel
from rankjax import train
from rankjax import train_state

# (model, image size, channels, batch): the small encoder of the digits / Omniglot runs, and
# ResNet-50 at a CPU-sized 64 px.
SHAPES = {
    "small_resnet": ("small_resnet", 28, 1, 128),
    "resnet50": ("resnet50", 64, 3, 32),
}
NEVER = 10**9


def make_run(model_name, *, image_size, channels, batch, diagnostics_every):
  """``run(n) -> seconds`` for ``n`` train steps of the semi-hard triplet loss with Adam."""
  config = configs.base_config()
  config.model.name = model_name
  config.image_size = image_size
  configs.with_loss(config, "triplet_semihard")
  model = train.build_model(config, types.SimpleNamespace(num_channels=channels))
  graphdef, _, params, model_state = train_state.split_model(model)
  tx, schedules = optim.make_optimizer(config.optimizer, params, total_steps=1000)
  loss_fn = losses.get_loss("triplet_semihard", **configs.loss_kwargs(config))
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = train_state.init_state(params, model_state, tx)
  step, sharding = parallel.jit_data_parallel(
      train_state.make_train_step(graphdef, loss_fn, tx, schedules,
                                  train_state.diagnostics_kwargs(config),
                                  diagnostics_every=diagnostics_every),
      state, mesh)
  holder = {"state": jax.device_put(state, sharding)}
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, image_size, image_size, channels)).astype(np.float32)
  labels = np.repeat(np.arange(batch // 4, dtype=np.int32), 4)
  device_batch = parallel.global_batch({"image": images, "label": labels}, mesh)

  def run(n):
    state = holder["state"]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, device_batch)
    jax.block_until_ready((state, metrics))
    holder["state"] = state
    return time.perf_counter() - start

  run(2)  # Compile and warm up.
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores); "
        f"load average before: {load}")
  print(f"\nTrain step (semi-hard triplet, Adam), ms per step, best of {args.repeats} x "
        f"{args.steps} steps, the variants timed in turns")
  print(f"{'model':<13} {'size':>4} {'batch':>5} {'every step':>10} {'cond off':>8} "
        f"{'none':>8} {'diagnostics share':>17}")
  for name in args.models:
    model_name, size, channels, batch = SHAPES[name]
    runs = {every: make_run(model_name, image_size=size, channels=channels, batch=batch,
                            diagnostics_every=every) for every in (1, NEVER, None)}
    best = {every: float("inf") for every in runs}
    for _ in range(args.repeats):
      for every, run in runs.items():
        best[every] = min(best[every], run(args.steps) / args.steps)
    on, off, none = best[1] * 1e3, best[NEVER] * 1e3, best[None] * 1e3
    print(f"{name:<13} {size:>4} {batch:>5} {on:>10.1f} {off:>8.1f} {none:>8.1f} "
          f"{(on - none) / on:>16.1%}", flush=True)
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"load average after: {load}")


if __name__ == "__main__":
  main()
