r"""Validation curves of training runs, as a markdown table: where each starts, peaks and ends.

For each run directory (a ``workdir`` of ``python -m rankjax.main``) it reads the validation
scalars the trainer wrote (``val/<metric>`` in TensorBoard; step 0 is the network before
training) and prints one row: the metric at step 0, its best and the step of the best, its last
value, and the first step that reached 90% of the way from the step-0 value to the best (how fast
the run got there; a run whose best is its start has none). The final evaluation of a run on
the validation split itself (``config.eval.split="val"``) is written as ``final/val/`` and is not
part of the curve. Recipe choices are read from these rows, which come from the validation
classes alone::

  python experiments/validation_curves.py --metric=map@r RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import math
import os

from rankjax import run_log


def curve_row(workdir: str, metric: str) -> dict:
  """``{"run", "start", "best", "best_step", "last", "last_step", "steps_to_90"}`` of a run."""
  curve = run_log.read_scalars(workdir, f"val/{metric}")
  if not curve:
    raise ValueError(f"{workdir} has no val/{metric} scalars (was config.eval.every > 0?).")
  steps = sorted(curve)
  start = curve.get(0, float("nan"))
  best_step = max(steps, key=lambda s: (curve[s], -s))
  best = curve[best_step]
  target = start + 0.9 * (best - start)
  reached = [s for s in steps if s > 0 and curve[s] >= target] if best > start else []
  return {"run": os.path.basename(os.path.normpath(workdir)), "start": start, "best": best,
          "best_step": best_step, "last": curve[steps[-1]], "last_step": steps[-1],
          "steps_to_90": reached[0] if reached else None}


def table(workdirs: list[str], metric: str) -> str:
  lines = ["| run | step 0 | best (step) | last (step) | steps to 90% of the gain |",
           "|---|---:|---:|---:|---:|"]
  for workdir, label in zip(workdirs, _labels(workdirs)):
    if not run_log.read_scalars(workdir, f"val/{metric}"):  # A baseline: evaluated, not trained.
      lines.append(f"| {label} | no validation evaluations | | | |")
      continue
    r = curve_row(workdir, metric)
    start = "-" if math.isnan(r["start"]) else f"{r['start']:.4f}"  # A run without step 0.
    lines.append(f"| {label} | {start} | {r['best']:.4f} ({r['best_step']}) | "
                 f"{r['last']:.4f} ({r['last_step']}) | {r['steps_to_90'] or '-'} |")
  return "\n".join(lines)


def _labels(workdirs: list[str]) -> list[str]:
  """Each run's path below the runs' common folder (``contrastive/seed0`` in a sweep's runs)."""
  paths = [os.path.normpath(w) for w in workdirs]
  if len(set(paths)) < 2:
    return [os.path.basename(p) for p in paths]
  root = os.path.commonpath([os.path.abspath(p) for p in paths])
  return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--metric", default="map@r")
  args = parser.parse_args()
  print(f"Validation {args.metric}:\n")
  print(table(args.workdirs, args.metric))


if __name__ == "__main__":
  main()
