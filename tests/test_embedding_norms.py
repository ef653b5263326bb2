"""experiments/embedding_norms.py: the norm curves and their table from compare_losses runs."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import embedding_norms  # noqa: E402


def _run(workdir, norms, recalls, test_recall):
  from rankjax import run_log
  writer = run_log.SummaryWriter(os.path.join(workdir, "tensorboard"))
  for step, value in norms.items():
    writer.scalars(step, {embedding_norms.NORM_TAG: value})
  for step, value in recalls.items():
    writer.scalars(step, {embedding_norms.RECALL_TAG: value})
  writer.close()
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump({"recall@1": test_recall}, f)


def test_table_and_figure_of_two_sweeps(tmp_path):
  with_l2, without = tmp_path / "with", tmp_path / "without"
  _run(str(with_l2 / "runs/npairs/seed0"), {50: 1.0, 100: 1.2}, {50: 0.3, 100: 0.4}, 0.35)
  _run(str(with_l2 / "runs/npairs/seed1"), {50: 2.0, 100: 1.6}, {50: 0.2, 100: 0.6}, 0.45)
  _run(str(without / "runs/npairs/seed0"), {50: 3.0, 100: 9.0}, {50: 0.1, 100: 0.2}, 0.15)
  (without / "runs/npairs/seed1").mkdir()  # Unfinished: no metrics.json, left out.
  out = subprocess.run(
      [sys.executable, "experiments/embedding_norms.py", "--loss=npairs",
       f"--sweeps=with L2={with_l2},no L2={without}", f"--output_dir={tmp_path / 'out'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  md = (tmp_path / "out" / "embedding_norms.md").read_text()
  assert ("| with L2 | 2 | 1.50 ± 0.71 (step 50) | 1.40 ± 0.28 (step 100) | 0.500 ± 0.141 | "
          "0.400 ± 0.071 |") in md
  assert "| no L2 | 1 | 3.00 (step 50) | 9.00 (step 100) | 0.200 | 0.150 |" in md
  assert os.path.getsize(tmp_path / "out" / "embedding_norms.png") > 0


def test_bad_sweeps_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="expected LABEL=DIRECTORY"):
    embedding_norms.parse_sweeps(["no-equals-sign"])
  with pytest.raises(ValueError, match="run experiments/compare_losses.py --losses=npairs"):
    embedding_norms.read_sweep(str(tmp_path), "npairs")
  (tmp_path / "runs/npairs/seed0").mkdir(parents=True)
  with pytest.raises(ValueError, match="no finished run"):
    embedding_norms.read_sweep(str(tmp_path), "npairs")
