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

import jax

import train_step  # benchmarks/train_step.py: the shared train-step harness.

# (model, image size, channels, batch): the small encoder of the digits / Omniglot runs, and
# ResNet-50 at a CPU-sized 64 px.
SHAPES = {
    "small_resnet": ("small_resnet", 28, 1, 128),
    "resnet50": ("resnet50", 64, 3, 32),
}
NEVER = 10**9


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
    runs = {every: train_step.jax_step(model_name, image_size=size, channels=channels,
                                       batch=batch, dtype="float32",
                                       diagnostics_every=every)[0]
            for every in (1, NEVER, None)}
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
