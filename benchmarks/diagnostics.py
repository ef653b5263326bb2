r"""The share of the batch diagnostics in a train step: inside every step, or outside it.

The train step (:func:`rankjax.train_state.make_train_step`) can report batch diagnostics (the
active-triplet fraction from a pairwise distance matrix and a sorted hinge count, mean distances
and norms) beside the loss. The trainer logs them every ``config.train.log_every`` steps and
computes them outside the step, on the embeddings the step returns, on those steps only. Each row
times the same step built three ways in the same process: with the diagnostics inside it
(``"step"``), without them (``"none"``), and without them followed by the separate jitted call
that computes them (``"separate"``: what a logged step costs). The three are timed in turns so that
a change of load on a shared machine falls on all of them. The share is (step - none) / step.
Best of ``--repeats`` x ``--steps`` steps, on one fixed batch::

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
VARIANTS = ("step", "none", "separate")


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
  print(f"{'model':<13} {'size':>4} {'batch':>5} {'in step':>8} {'none':>8} {'separate':>8} "
        f"{'share in step':>13}")
  for name in args.models:
    model_name, size, channels, batch = SHAPES[name]
    runs = {variant: train_step.jax_step(model_name, image_size=size, channels=channels,
                                         batch=batch, dtype="float32",
                                         diagnostics=variant)[0]
            for variant in VARIANTS}
    best = {variant: float("inf") for variant in runs}
    for _ in range(args.repeats):
      for variant, run in runs.items():
        best[variant] = min(best[variant], run(args.steps) / args.steps)
    step, none, separate = (best[v] * 1e3 for v in VARIANTS)
    print(f"{name:<13} {size:>4} {batch:>5} {step:>8.1f} {none:>8.1f} {separate:>8.1f} "
          f"{(step - none) / step:>13.1%}", flush=True)
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"load average after: {load}")


if __name__ == "__main__":
  main()
