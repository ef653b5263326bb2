r"""Short Omniglot runs comparing one choice at a time: the encoder, or the loss on the wide recipe.

Each candidate trains for ``--steps`` (default 1,000) and evaluates once on the 659 test
characters; the script prints a table of Recall@1, MAP@R and the wall time and writes it to
``OUTPUT_DIR/<study>.md``. A candidate whose run directory already holds ``metrics.json`` is
read back, not retrained. Wall times are only comparable within one run on an idle machine.

``--study=encoders``: the Omniglot config's recipe (experiments/configs/omniglot.py: semi-hard
triplets, rotated classes, Adam 1e-3 with cosine decay, 32 classes x 4) with only the encoder
changed. This is how the encoder of the ``wide`` recipe was chosen (README, "the best loss within
15 minutes")::

  python experiments/omniglot_probes.py --study=encoders --data_dir=/tmp/tfds

``--study=losses``: the ``wide`` recipe (``omniglot.py:<loss>,wide``) at 28 px with the loss,
its learning rates or the class rotation changed::

  python experiments/omniglot_probes.py --study=losses --data_dir=/tmp/tfds

``--study=sizes``: the ``wide`` recipe with the images resized to 28, 32 or 40 px::

  python experiments/omniglot_probes.py --study=sizes --data_dir=/tmp/tfds
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

_NO_ROTATION = {"rotate_classes": False}
# The studies measure training choices: embeddings of the test images alone, as they were measured
# before the wide recipe gained its test-time shifts.
_NO_TEST_TIME_SHIFTS = {"eval.test_time_shift": 0}
_PROXY_LR_1E2 = {"optimizer.proxy_learning_rate": 1e-2}

# study -> (config argument, overrides of every candidate, {candidate -> its own overrides}).
STUDIES = {
    "encoders": ("triplet_semihard", {}, {
        "conv4": {},
        "conv4_strided_w128": {"model.name": "conv4_strided",
                               "model.backbone_options.width": 128},
        "small_resnet_16-128": {"model.name": "small_resnet",
                                "model.backbone_options.widths": (16, 32, 64, 128)},
        "conv4_32-64-128-256": {"model.backbone_options.widths": (32, 64, 128, 256)},
        "conv4_64-64-128-256": {"model.backbone_options.widths": (64, 64, 128, 256)},
        "conv4_64-128-256-512": {"model.backbone_options.widths": (64, 128, 256, 512)},
    }),
    "losses": ("triplet_semihard,wide", {"image_size": 28, **_NO_TEST_TIME_SHIFTS}, {
        "triplet_semihard": {},
        "triplet_semihard_lr2e-3": {"optimizer.learning_rate": 2e-3},
        "triplet_semihard_margin0.1": {"loss.triplet_semihard.margin": 0.1},
        "triplet_semihard_margin0.3": {"loss.triplet_semihard.margin": 0.3},
        "multi_similarity": {"loss.name": "multi_similarity"},
        "proxy_anchor": {"loss.name": "proxy_anchor"},
        "proxy_anchor_no_rotation": {"loss.name": "proxy_anchor", **_NO_ROTATION},
        "proxy_anchor_no_rotation_proxy_lr1e-2": {"loss.name": "proxy_anchor", **_NO_ROTATION,
                                                  **_PROXY_LR_1E2},
        "normalized_softmax_proxy_lr1e-2": {"loss.name": "normalized_softmax", **_PROXY_LR_1E2},
        "normalized_softmax_no_rotation_proxy_lr1e-2": {"loss.name": "normalized_softmax",
                                                        **_NO_ROTATION, **_PROXY_LR_1E2},
    }),
    "sizes": ("triplet_semihard,wide", _NO_TEST_TIME_SHIFTS, {
        "28px": {"image_size": 28},
        "32px": {"image_size": 32},
        "40px": {"image_size": 40},
    }),
}

_ROW_LABEL = {"encoders": "encoder", "losses": "loss and changes", "sizes": "image size"}

FLAGS = flags.FLAGS
flags.DEFINE_enum("study", "encoders", list(STUDIES), "What the candidates vary.")
flags.DEFINE_list("candidates", None, "Candidates to train (default: all of the study's).")
flags.DEFINE_integer("steps", 1000, "Training steps per candidate.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding omniglot.")
flags.DEFINE_string("output_dir", "/tmp/omniglot_probes",
                    "Run directories (OUTPUT_DIR/<study>/<candidate>) and <study>.md.")


def candidate_config(study: str, name: str, steps: int, data_dir: str | None):
  arg, common, candidates = STUDIES[study]
  if name not in candidates:
    raise app.UsageError(f"Unknown candidate {name!r} of --study={study}; the candidates are "
                         f"{', '.join(candidates)}.")
  config = sweep.load_config("omniglot", arg)
  sweep.apply_overrides(config, {**common, **candidates[name]}.items())
  config.train.steps = steps
  config.train.checkpoint_every = steps
  config.eval.every = 0
  config.data_dir = data_dir
  return config


def main(argv):
  del argv
  from rankjax import train  # pylint: disable=g-import-not-at-top
  names = FLAGS.candidates or list(STUDIES[FLAGS.study][2])
  configs = {name: candidate_config(FLAGS.study, name, FLAGS.steps, FLAGS.data_dir)
             for name in names}  # Every name checked before the first run.
  rows = []
  for name, config in configs.items():
    workdir = os.path.join(FLAGS.output_dir, FLAGS.study, name)
    start = time.time()
    metrics = sweep.read_metrics(workdir) or train.train_and_evaluate(config, workdir)
    rows.append(f"| {name} | {metrics['recall@1']:.4f} | {metrics['map@r']:.4f} | "
                f"{time.time() - start:.0f} |")
    print(rows[-1], flush=True)
  table = "\n".join([f"Omniglot, {FLAGS.steps} steps per candidate (`{sweep.command_line()}`)", "",
                     f"| {_ROW_LABEL[FLAGS.study]} | R@1 | MAP@R | wall (s) |", "|---|---|---|---|",
                     *rows])
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, f"{FLAGS.study}.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
