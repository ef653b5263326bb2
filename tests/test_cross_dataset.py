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


def _write_curve(workdir, curve):
  from rankjax import run_log
  writer = run_log.SummaryWriter(os.path.join(workdir, "tensorboard"))
  for step, value in curve.items():
    writer.scalars(step, {cross_dataset.VAL_TAG: value, "train/loss": 1.0})
  writer.close()


def test_convergence_reads_validation_recall_of_every_seed(tmp_path):
  runs = tmp_path / "a" / "runs"
  _write_curve(str(runs / "triplet_hard" / "seed0"), {25: 0.5, 50: 0.6, 75: 0.55})
  _write_curve(str(runs / "triplet_hard" / "seed1"), {25: 0.3, 50: 0.4, 75: 0.45})
  _write_curve(str(runs / "npairs" / "seed0"), {25: 0.2, 50: 0.7, 75: 0.7})  # Tie: earliest.
  (runs / "imagenet_features" / "seed0" / "tensorboard").mkdir(parents=True)  # No curve.
  got = cross_dataset.convergence(str(runs))
  assert set(got) == {"triplet_hard", "npairs"}
  hard = got["triplet_hard"]
  assert hard["first_step"] == 25 and hard["seeds"] == 2 and hard["best_steps"] == [50, 75]
  assert abs(hard["first"] - 0.4) < 1e-6 and abs(hard["best"] - 0.525) < 1e-6
  assert got["npairs"]["best_steps"] == [50]
  lines = cross_dataset.convergence_table({"a": got})
  assert "| triplet (batch hard) | 0.400 -> 0.525 (50/75) | 1 |" in lines
  assert "| N-pairs | 0.200 -> 0.700 (50) | 2 |" in lines


def test_side_by_side_table_has_the_convergence_section_when_runs_have_curves(tmp_path):
  _write(str(tmp_path / "a" / "results.csv"), [["npairs", 1, 0.6, 0.0, 0.3, 0.0]])
  _write_curve(str(tmp_path / "a" / "runs" / "npairs" / "seed0"), {25: 0.2, 50: 0.7})
  _write(str(tmp_path / "b" / "results.csv"), [["npairs", 1, 0.5, 0.0, 0.2, 0.0]])
  out = subprocess.run([sys.executable, "experiments/cross_dataset.py", "--datasets=a,b",
                        f"--results_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  md = (tmp_path / "cross_dataset.md").read_text()
  assert "## How fast each loss gets there" in md
  assert "| N-pairs | 0.200 -> 0.700 (50) | 1 |" in md  # Only dataset a has curves.
