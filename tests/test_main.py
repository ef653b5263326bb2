"""End to end: the real ``rankjax.main`` on digits and on mock TFDS data, and ``load_embedder``."""

import json
import os
import subprocess
import sys
from unittest import mock

from absl import flags
import numpy as np
import pytest
import sklearn.datasets
import tensorflow as tf

import rankjax
from rankjax import evaluation
from rankjax import main as rankjax_main
from rankjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")


def _run_main(*argv):
  """Runs ``python -m rankjax.main ARGV`` in this process (so TFDS mocks apply)."""
  argv = ["rankjax.main", *argv]
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):  # The previous run's --config.* override flags.
    if name.startswith("config."):
      delattr(flags.FLAGS, name)
  with mock.patch.object(sys, "argv", argv):  # config_flags reads its overrides from sys.argv.
    flags.FLAGS(argv)
    rankjax_main.main(argv[:1])


def _scalar_tags(logdir):
  tags = set()
  for name in os.listdir(logdir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      tags.update(v.tag for v in event.summary.value)
  return tags


def _digits_test_split():
  """The raw test images of the digits dataset (digits 5-9) as it stores them: uint8 8x8x1."""
  digits = sklearn.datasets.load_digits()
  keep = digits.target >= 5
  images = np.round(digits.images[keep] * 255 / 16).astype(np.uint8)[..., None]
  return images, digits.target[keep]


def _test_metrics(report):
  """The test-split metrics of a metrics.json (without the checkpoint it names, or val/ ones)."""
  return {k: v for k, v in report.items()
          if "/" not in k and not k.startswith(("checkpoint", "selected"))}


def test_main_on_digits_writes_metrics_tensorboard_and_an_embedder(tmp_path):
  workdir = str(tmp_path / "digits")
  _run_main(f"--config={CONFIG_DIR}/digits.py:triplet_semihard,runlocal", f"--workdir={workdir}",
            "--config.train.steps=4", "--config.eval.every=2", "--config.protocol.val_fraction=0.4",
            "--config.classes_per_batch=3")

  report = json.loads((tmp_path / "digits" / train.METRICS_FILE).read_text())
  metrics = _test_metrics(report)
  assert set(metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r",
                          "r_precision", "nmi"}
  assert report["checkpoint"] == "best" and report["checkpoint_step"] in (2, 4)
  assert 0.0 <= report["val/recall@1"] <= 1.0
  assert all(0.0 <= v <= 1.0 for v in metrics.values())
  assert metrics["recall@1"] <= metrics["recall@2"] <= metrics["recall@4"] <= metrics["recall@8"]

  tags = _scalar_tags(os.path.join(workdir, "tensorboard"))
  assert {"train/loss", "train/lr/backbone", "train/active_triplets", "train/mean_norm",
          "train/mean_positive_distance", "train/mean_negative_distance", "val/recall@1",
          "val/map@r", "val/nmi", "test/recall@1", "perf/images_per_s"} <= tags

  # The embedder reproduces the evaluation from raw uint8 images: the same retrieval metrics (up
  # to a query whose nearest neighbours tie within float rounding of a different batching).
  images, labels = _digits_test_split()
  embed = rankjax.load_embedder(workdir, which="best")  # The checkpoint metrics.json reports.
  embeddings = embed(images)
  assert embeddings.shape == (len(images), 64) and embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  again = evaluation.retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8))
  for key in ("recall@1", "recall@8", "map@r", "r_precision"):
    assert again[key] == pytest.approx(metrics[key], abs=2 / len(images)), key
  # Batching does not change an embedding.
  np.testing.assert_allclose(embed(images[:5]), embeddings[:5], rtol=1e-5, atol=1e-6)
  best = rankjax.load_embedder(workdir, which="best")(images[:5])
  assert best.shape == (5, 64)


# Training must beat the same network untrained (same config and seed, so the same initial
# weights; --config.train.steps=0) on the unseen digits 5-9. The network and steps are those of the
# digits loss comparison (experiments/sweep.py). Measured with this command line on one CPU device,
# seeds 0, 1, 2: untrained Recall@1 0.727, 0.710, 0.703 and MAP@R 0.194, 0.222, 0.195; trained
# 0.823, 0.821, 0.823 and 0.271, 0.263, 0.256. The smallest gains were 0.096 (Recall@1) and 0.041
# (MAP@R); each margin is half of that, rounded down to a multiple of 0.005.
TRAIN_STEPS = 150
MIN_RECALL_GAIN = 0.045
MIN_MAP_GAIN = 0.02


def test_training_beats_the_untrained_network_on_digits(tmp_path):
  config = (f"--config={CONFIG_DIR}/digits.py:triplet_semihard,runlocal",
            "--config.model.backbone_options.widths=(16,32,32,64)")
  _run_main(*config, f"--workdir={tmp_path / 'trained'}", f"--config.train.steps={TRAIN_STEPS}",
            f"--config.train.checkpoint_every={TRAIN_STEPS}")
  _run_main(*config, f"--workdir={tmp_path / 'untrained'}", "--config.train.steps=0")
  trained, untrained = (json.loads((tmp_path / name / train.METRICS_FILE).read_text())
                        for name in ("trained", "untrained"))
  assert trained["checkpoint_step"] == TRAIN_STEPS and untrained["checkpoint_step"] == 0
  trained, untrained = _test_metrics(trained), _test_metrics(untrained)
  assert all(0.0 <= v <= 1.0 for v in [*trained.values(), *untrained.values()])
  assert trained["recall@1"] >= untrained["recall@1"] + MIN_RECALL_GAIN, (trained, untrained)
  assert trained["map@r"] >= untrained["map@r"] + MIN_MAP_GAIN, (trained, untrained)


def test_main_on_mock_tfds_cub200(tmp_path):
  """The CUB-200 config on fake records served through the real TFDS builder's features."""
  from rankjax.data import testing  # pylint: disable=g-import-not-at-top
  with testing.mock_data("cub200", num_train_classes=8, num_test_classes=6,
                         examples_per_class=(2, 4)):
    _run_main(f"--config={CONFIG_DIR}/cub200.py:npairs,runlocal", f"--workdir={tmp_path}",
              "--config.train.steps=2", "--config.eval.batch_size=16")
  metrics = json.loads((tmp_path / train.METRICS_FILE).read_text())
  assert set(metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r",
                          "r_precision", "nmi", "checkpoint", "checkpoint_step"}
  assert metrics.pop("checkpoint") == "final"  # No validation evaluations were asked for.
  assert all(np.isfinite(v) for v in metrics.values())
  config = json.loads((tmp_path / train.CONFIG_FILE).read_text())
  assert config["dataset"] == "cub200" and config["loss"]["name"] == "npairs"


@pytest.mark.parametrize("override, message", [
    ("--config.train.stpes=3", 'Did you mean "steps" instead of "stpes"?'),
    ("--config.optimizer.learning_rate=-1",
     "config.optimizer.learning_rate must be a positive number; got -1.0"),
])
def test_bad_config_flag_is_a_clear_error_before_any_work(tmp_path, override, message):
  result = subprocess.run(
      [sys.executable, "-m", "rankjax.main",
       f"--config={CONFIG_DIR}/digits.py:triplet_semihard,runlocal", f"--workdir={tmp_path}",
       override], cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.listdir(tmp_path)


def test_unknown_loss_in_the_config_argument_is_a_clear_error(tmp_path):
  with pytest.raises(Exception, match="expected one loss name"):
    _run_main(f"--config={CONFIG_DIR}/digits.py:tripletsemihard", f"--workdir={tmp_path}")


def test_main_with_a_proxy_loss_on_two_cpu_devices(tmp_path):
  """--cpu_devices splits the CPU; the proxy loss trains its proxies through the real main."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "rankjax.main",
       f"--config={CONFIG_DIR}/digits.py:proxy_anchor,runlocal", f"--workdir={tmp_path}",
       "--cpu_devices=2", "--config.train.steps=4"], cwd=REPO, capture_output=True, text=True,
      env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Mesh: 2 devices" in result.stderr
  metrics = json.loads((tmp_path / train.METRICS_FILE).read_text())
  assert all(np.isfinite(v) for k, v in metrics.items() if k != "checkpoint")
  embed = rankjax.load_embedder(str(tmp_path))  # The proxies are in the checkpoint too.
  assert embed(np.zeros((3, 16, 16, 1), np.uint8)).shape[0] == 3


def test_load_embedder_reads_only_the_record_and_the_model(tmp_path):
  """A workdir's config.json naming an image folder, a data_dir and a weights file: the embedder
  opens none of them (it needs the config, model.json and the checkpoint's model alone)."""
  workdir = tmp_path / "run"
  _run_main(f"--config={CONFIG_DIR}/digits.py:triplet_semihard,runlocal", f"--workdir={workdir}",
            "--config.train.steps=2")
  assert json.loads((workdir / "model.json").read_text()) == {"num_channels": 1}
  record = json.loads((workdir / train.CONFIG_FILE).read_text())
  record["dataset"] = f"folder:{tmp_path / 'images'}"
  record["data_dir"] = str(tmp_path / "tfds")
  record["model"]["pretrained"] = str(tmp_path / "weights.npz")
  (workdir / train.CONFIG_FILE).write_text(json.dumps(record))
  embed = rankjax.load_embedder(str(workdir))
  assert embed(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 64)
  assert sorted(os.listdir(tmp_path)) == ["run"]  # Nothing was listed, prepared or written.
