"""experiments/cross_dataset.py: ranks and the side-by-side table from results.csv files."""

import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import cross_dataset  # noqa: E402

FIELDS = ["loss", "seeds", "recall@1_mean", "recall@1_std", "map@r_mean", "map@r_std"]


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(FIELDS)
    writer.writerows(rows)


def test_ranks_order_losses_by_mean_recall_and_leave_baselines_out():
  table = {"npairs": {"recall@1_mean": 0.5}, "contrastive": {"recall@1_mean": 0.7},
           "angular": {"recall@1_mean": 0.5}, "imagenet_features": {"recall@1_mean": 0.9}}
  assert cross_dataset.ranks(table) == {"contrastive": 1, "npairs": 2, "angular": 2}


def test_side_by_side_table_and_figure(tmp_path):
  _write(str(tmp_path / "a" / "results.csv"), [
      ["imagenet_features", 1, 0.2, 0.0, 0.05, 0.0], ["contrastive", 3, 0.3, 0.01, 0.1, 0.002],
      ["npairs", 3, 0.4, 0.02, 0.12, 0.003]])
  _write(str(tmp_path / "b" / "results.csv"), [["npairs", 1, 0.6, 0.0, 0.3, 0.0]])
  out = subprocess.run([sys.executable, "experiments/cross_dataset.py", "--datasets=a,b",
                        f"--results_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  md = (tmp_path / "out" / "cross_dataset.md").read_text()
  assert "| contrastive | 0.300 ± 0.010 | 0.100 ± 0.002 |  |  | 2 |  |" in md
  assert "| N-pairs | 0.400 ± 0.020 | 0.120 ± 0.003 | 0.600 | 0.300 | 1 | 1 |" in md
  assert "| ImageNet features, untrained | 0.200 | 0.050 |  |  |  |  |" in md
  assert "Seeds per loss: a 3; b 1." in md
  assert os.path.getsize(tmp_path / "out" / "cross_dataset.png") > 0


def test_missing_results_are_a_clear_error(tmp_path):
  out = subprocess.run([sys.executable, "experiments/cross_dataset.py", "--datasets=nope",
                        f"--results_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "run experiments/compare_losses.py --dataset=nope" in out.stderr
  with pytest.raises(ValueError, match="not a results.csv"):
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    cross_dataset.read_results(str(tmp_path / "bad.csv"))
