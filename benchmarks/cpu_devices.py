r"""Train-step throughput on the CPU with the host split into 1, 2, ... JAX devices.

``python -m rankjax.main --cpu_devices=N`` makes XLA present the CPU as N devices; the train step
then runs data-parallel over them (each computes its share of the global batch; the loss sees all
of it), which keeps more cores busy than one device's intra-op threading does on small images.
This script times the full training step (forward, semi-hard triplet loss, backward, Adam) of
the Omniglot encoders at 28 px (``--image_size``), batch 128, for each device count in a fresh
process (XLA's device count is fixed when the backend starts); the first count is the reference::

  python benchmarks/cpu_devices.py                  # 1 and 2 devices
  python benchmarks/cpu_devices.py --devices=1,2,4
  python benchmarks/cpu_devices.py --devices=2 --encoders=wide --image_size=40

``--xla_flags=FLAGS`` (repeatable) adds rows with ``XLA_FLAGS=FLAGS`` set in the child process,
beside the reference without flags, e.g. XLA's experimental oneDNN and XNNPACK kernels::

  python benchmarks/cpu_devices.py --devices=2 --encoders=wide --image_size=40 \
      --xla_flags=--xla_cpu_use_onednn=true --xla_flags=--xla_cpu_use_xnnpack=true
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# name -> (label, conv4 options).
ENCODERS = {
    "classic": ("conv4 64 (classic)", {}),
    "wide": ("conv4 64-128-256-512 (omniglot ,wide)",
             {"widths": (64, 128, 256, 512), "pool_last": False}),
}

_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
sys.path.insert(0, sys.argv[4])
import train_step
run, _ = train_step.jax_step("conv4", image_size=int(sys.argv[5]), channels=1,
                             batch=int(sys.argv[2]), dtype="float32",
                             backbone_options=json.loads(sys.argv[3]),
                             num_devices=len(jax.devices()))
steps = 30
seconds = min(run(steps) for _ in range(2))
print(json.dumps({"devices": len(jax.devices()), "steps_per_s": steps / seconds}))
"""


def measure(devices: int, batch: int, options: dict, image_size: int, xla_flags: str = "") -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  out = subprocess.run(
      [sys.executable, "-c", _CHILD, str(devices), str(batch), json.dumps(options),
       os.path.dirname(os.path.abspath(__file__)), str(image_size)],
      capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise RuntimeError(f"the {devices}-device run (XLA_FLAGS={xla_flags!r}) failed:\n"
                       f"{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2", help="comma-separated device counts")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=28)
  parser.add_argument("--encoders", default=",".join(ENCODERS),
                      help=f"comma-separated, of {', '.join(ENCODERS)}")
  parser.add_argument("--xla_flags", action="append", default=[],
                      help="XLA_FLAGS of an extra row (repeatable); the reference has none")
  args = parser.parse_args()
  encoders = args.encoders.split(",")
  if not set(encoders) <= set(ENCODERS):
    parser.error(f"--encoders={args.encoders}: choose from {', '.join(ENCODERS)}.")
  if args.image_size < 16:
    parser.error(f"--image_size={args.image_size}: conv4 needs at least 16 px.")
  counts = [int(n) for n in args.devices.split(",")]
  bad = [n for n in counts if n < 1 or args.batch % n]
  if bad:
    parser.error(f"--devices {bad}: each count must be >= 1 and divide --batch={args.batch}.")
  print(f"CPU cores: {os.cpu_count()}; batch {args.batch} at {args.image_size} px; the train step "
        f"of rankjax.train (semi-hard triplets, Adam); best of 2 x 30 steps.\n")
  flag_sets = [""] + args.xla_flags
  flags_column = "| XLA_FLAGS " if args.xla_flags else ""
  print(f"| encoder | devices {flags_column}| steps/s | images/s | vs 1st |")
  print("|---|---|" + ("---|" if args.xla_flags else "") + "---|---|---|")
  for name in encoders:
    label, options = ENCODERS[name]
    reference = None
    for n in counts:
      for flags in flag_sets:
        rate = measure(n, args.batch, options, args.image_size, flags)["steps_per_s"]
        reference = reference or rate
        cell = f"| {flags or '(none)'} " if args.xla_flags else ""
        print(f"| {label} | {n} {cell}| {rate:.2f} | {rate * args.batch:.0f} | "
              f"{rate / reference:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
