r"""Which encoder for Omniglot on a CPU? Short runs of candidate encoders under one recipe.

Each candidate trains for ``--steps`` (default 1,000) with the Omniglot config's recipe
(experiments/configs/omniglot.py: semi-hard triplets, rotated classes, Adam 1e-3 with cosine decay,
32 classes x 4) and only the encoder changed, then evaluates once on the 659 test characters. It
prints a table of Recall@1, MAP@R and the wall time, and writes it to ``OUTPUT_DIR/encoders.md``.
Wall times are only comparable within one run of this script on an otherwise idle machine::

  python experiments/omniglot_encoders.py --data_dir=/tmp/tfds --output_dir=/tmp/omniglot_encoders

This is how the encoder of the ``wide`` Omniglot recipe was chosen (README, "the best loss within
15 minutes").
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> config overrides of the encoder.
CANDIDATES = {
    "conv4": {},
    "conv4_strided_w128": {"model.name": "conv4_strided", "model.backbone_options.width": 128},
    "small_resnet_16-128": {"model.name": "small_resnet",
                            "model.backbone_options.widths": (16, 32, 64, 128)},
    "conv4_32-64-128-256": {"model.backbone_options.widths": (32, 64, 128, 256)},
    "conv4_64-64-128-256": {"model.backbone_options.widths": (64, 64, 128, 256)},
    "conv4_64-128-256-512": {"model.backbone_options.widths": (64, 128, 256, 512)},
}

FLAGS = flags.FLAGS
flags.DEFINE_list("candidates", list(CANDIDATES), "Encoders to train.")
flags.DEFINE_integer("steps", 1000, "Training steps per candidate.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding omniglot.")
flags.DEFINE_string("output_dir", "/tmp/omniglot_encoders", "Run directories and encoders.md.")


def candidate_config(name: str, steps: int, data_dir: str | None):
  if name not in CANDIDATES:
    raise app.UsageError(f"Unknown candidate {name!r}; the candidates are {', '.join(CANDIDATES)}.")
  config = sweep.load_config("omniglot", "triplet_semihard")
  sweep.apply_overrides(config, CANDIDATES[name].items())
  config.train.steps = steps
  config.train.checkpoint_every = steps
  config.eval.every = 0
  config.data_dir = data_dir
  return config


def main(argv):
  del argv
  from rankjax import train  # pylint: disable=g-import-not-at-top
  rows = []
  for name in FLAGS.candidates:
    config = candidate_config(name, FLAGS.steps, FLAGS.data_dir)
    workdir = os.path.join(FLAGS.output_dir, name)
    start = time.time()
    metrics = sweep.read_metrics(workdir) or train.train_and_evaluate(config, workdir)
    rows.append(f"| {name} | {metrics['recall@1']:.4f} | {metrics['map@r']:.4f} | "
                f"{time.time() - start:.0f} |")
    print(rows[-1], flush=True)
  table = "\n".join([f"Omniglot, {FLAGS.steps} steps per encoder (`{sweep.command_line()}`)", "",
                     "| encoder | R@1 | MAP@R | wall (s) |", "|---|---|---|---|", *rows])
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, "encoders.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
