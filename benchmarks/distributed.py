r"""The cost of JAX's distributed runtime: one process x 2 devices against 2 processes x 1 device.

Both layouts train the same config on the same 2 devices' worth of CPU, with the same global
batches (``config.data_shards=2``); only the launch line differs::

  python -m rankjax.main --cpu_devices=2 ...                               # 1 process x 2
  python -m rankjax.launch --num_processes=2 --cpu_devices=1 -- ...        # 2 processes x 1

In the first, XLA's in-process collectives combine the two devices' gradients; in the second the
processes meet through ``jax.distributed`` and every all-reduce goes through gloo over TCP on
127.0.0.1. The steps/s are the median of the job's logged training rates (TensorBoard
``perf/steps_per_s``, compilation and evaluation excluded), best of ``--repeats`` jobs each::

  python benchmarks/distributed.py                      # digits, small ResNet, 300 steps
  python benchmarks/distributed.py --steps=100 --repeats=1 \
      --flags=--config=experiments/configs/digits.py:npairs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FLAGS = ("--config=experiments/configs/digits.py:triplet_semihard",
                 "--config.classes_per_batch=4", "--config.eval.metrics=('recall@1',)",
                 "--config.eval.best_metric=recall@1")


def steps_per_second(workdir: str) -> float:
  """Median of the ``perf/steps_per_s`` scalars a job wrote, its first window left out."""
  from rankjax import run_log  # pylint: disable=g-import-not-at-top
  rates = run_log.read_scalars(workdir, "perf/steps_per_s")
  steps = sorted(rates)[1:]
  if not steps:
    raise RuntimeError(f"{workdir}: fewer than two logged training windows; raise --steps.")
  return float(np.median([rates[s] for s in steps]))


def run_job(layout: str, flags: list[str], workdir: str) -> float:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  main_flags = [*flags, f"--workdir={workdir}"]
  if layout == "1x2":
    command = [sys.executable, "-m", "rankjax.main", "--cpu_devices=2", *main_flags]
  else:
    command = [sys.executable, "-m", "rankjax.launch", "--num_processes=2", "--cpu_devices=1",
               "--", *main_flags]
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"the {layout} job failed:\n{(out.stdout + out.stderr)[-3000:]}")
  return steps_per_second(workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log_every", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--flags", action="append", default=None,
                      help="rankjax.main flags (repeatable; default: digits, semi-hard triplets, "
                           "4 classes x 8)")
  args = parser.parse_args()
  flags = list(args.flags or DEFAULT_FLAGS) + [
      f"--config.train.steps={args.steps}", f"--config.train.log_every={args.log_every}",
      f"--config.train.checkpoint_every={args.steps}", "--config.data_shards=2"]
  print(f"CPU cores: {os.cpu_count()}; {' '.join(flags)}; median logged steps/s, best of "
        f"{args.repeats} jobs each; layouts alternate.\n")
  best = {"1x2": 0.0, "2x1": 0.0}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      for layout in best:
        rate = run_job(layout, flags, os.path.join(tmp, f"{layout}_{r}"))
        best[layout] = max(best[layout], rate)
  reference = best["1x2"]
  print("| layout | launch | steps/s | vs 1 process |")
  print("|---|---|---|---|")
  print(f"| 1 process x 2 devices | `rankjax.main --cpu_devices=2` | {best['1x2']:.2f} | 1.00x |")
  print(f"| 2 processes x 1 device | `rankjax.launch --num_processes=2 --cpu_devices=1` | "
        f"{best['2x1']:.2f} | {best['2x1'] / reference:.2f}x |")


if __name__ == "__main__":
  main()
