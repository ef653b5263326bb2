r"""Every loss on every dataset side by side: the figure and the table of ranks.

Reads the ``results.csv`` that ``compare_losses.py`` wrote for each dataset (the mean and standard
deviation over seeds of each loss's test metrics, and the untrained baselines where the table has
them) and writes, in ``--output_dir`` (default ``experiments/results``):

* ``cross_dataset.png``: Recall@1 and MAP@R of each loss on each dataset, bars with the
  standard deviation over seeds, the untrained baselines as dashed lines;
* ``cross_dataset.md``: the same numbers, and the rank of each loss on each dataset (1 = the
  best mean Recall@1 among the losses in that table; baselines are not ranked), with how many
  seeds each number is the mean of.

::

  python experiments/cross_dataset.py --datasets=lfw,omniglot,cub200

A dataset's results directory is ``experiments/results/<dataset>`` (``--results_dir`` changes the
parent). Losses missing from a dataset's table are left blank there.
"""

from __future__ import annotations

import csv
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # noqa: E402  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
METRICS = (("recall@1", "R@1"), ("map@r", "MAP@R"))


def read_results(path: str) -> dict[str, dict[str, float]]:
  """``{loss: {"seeds": n, "<metric>_mean": x, "<metric>_std": s, ...}}`` of one results.csv."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  if not rows or "loss" not in rows[0]:
    raise ValueError(f"{path} is not a results.csv of compare_losses.py (no 'loss' column).")
  return {r["loss"]: {k: float(v) for k, v in r.items() if k != "loss" and v not in ("", None)}
          for r in rows}


def ranks(table: dict[str, dict[str, float]], metric: str = "recall@1") -> dict[str, int]:
  """Rank of each loss by mean ``metric`` (1 = best; ties share the better rank); baselines
  are left out."""
  losses = [n for n in table if n not in sweep.BASELINE_LABELS and f"{metric}_mean" in table[n]]
  order = sorted(losses, key=lambda n: -table[n][f"{metric}_mean"])
  out = {}
  for n in order:
    out[n] = 1 + sum(table[m][f"{metric}_mean"] > table[n][f"{metric}_mean"] for m in losses)
  return out


def _label(name: str) -> str:
  return sweep.LOSS_LABELS.get(name) or sweep.BASELINE_LABELS.get(name, name)


def write_table(tables: dict[str, dict], path: str, command: str) -> str:
  """Writes the markdown table of every loss on every dataset; returns it."""
  losses = [n for n in sweep.LOSS_LABELS if any(n in t for t in tables.values())]
  baselines = [n for n in sweep.BASELINE_LABELS if any(n in t for t in tables.values())]
  rank_by = {d: ranks(t) for d, t in tables.items()}
  head = "| loss | " + " | ".join(f"{d} {m}" for d in tables for _, m in METRICS) + " | " + \
         " | ".join(f"rank on {d}" for d in tables) + " |"
  lines = [head, "|---|" + "---|" * (len(tables) * (len(METRICS) + 1))]
  for name in losses + baselines:
    cells = []
    for d, t in tables.items():
      for key, _ in METRICS:
        row = t.get(name, {})
        if f"{key}_mean" not in row:
          cells.append("")
        elif row.get("seeds", 0) > 1:
          cells.append(sweep.format_mean_std(row[f"{key}_mean"], row[f"{key}_std"]))
        else:  # One run has no spread to show.
          cells.append(f"{row[f'{key}_mean']:.3f}")
    cells += [str(rank_by[d].get(name, "")) for d in tables]
    lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
  seeds = {d: sorted({int(r["seeds"]) for n, r in t.items() if n in sweep.LOSS_LABELS})
           for d, t in tables.items()}
  text = "\n".join([
      "# Every loss on every dataset", "", "Made by (from the repository root):", "", "```bash",
      command, "```", "",
      "Test metrics, mean ± sample standard deviation over seeds, of each dataset's own results "
      "table (its protocol and commands are there); the rank is by mean Recall@1 among the "
      "losses of that table (1 = best), untrained baselines not ranked. Seeds per loss: "
      + "; ".join(f"{d} {'/'.join(map(str, s))}" for d, s in seeds.items()) + ".", "",
      *lines, "", "![Recall@1 and MAP@R of every loss on every dataset](cross_dataset.png)", ""])
  with open(path, "w") as f:
    f.write(text)
  return "\n".join(lines)


def write_figure(tables: dict[str, dict], path: str) -> None:
  """Bars of Recall@1 and MAP@R per loss, one panel per (metric, dataset)."""
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  losses = [n for n in sweep.LOSS_LABELS if any(n in t for t in tables.values())]
  fig, axes = plt.subplots(len(METRICS), len(tables), figsize=(4.2 * len(tables), 3.2 * 2 + 1.5),
                           squeeze=False)
  colors = plotting.colors(len(losses))
  for col, (dataset, table) in enumerate(tables.items()):
    rank = ranks(table)
    for row, (key, name) in enumerate(METRICS):
      ax = axes[row][col]
      for i, loss in enumerate(losses):
        if f"{key}_mean" not in table.get(loss, {}):
          continue
        r = table[loss]
        ax.bar(i, r[f"{key}_mean"], yerr=r[f"{key}_std"], color=colors[i], capsize=2)
        if row == 0 and loss in rank:
          ax.text(i, r[f"{key}_mean"] + r[f"{key}_std"], str(rank[loss]), ha="center",
                  va="bottom", fontsize=7)
      for style, baseline in zip(("--", ":"), sweep.BASELINE_LABELS):
        if f"{key}_mean" in table.get(baseline, {}):
          ax.axhline(table[baseline][f"{key}_mean"], color="k", linestyle=style, linewidth=1,
                     label=sweep.BASELINE_LABELS[baseline])
      ax.set_title(f"{dataset}: {name}", fontsize=9)
      ax.set_xticks(range(len(losses)))
      ax.set_xticklabels([_label(n) for n in losses], rotation=90, fontsize=7)
      if row == 0 and col == 0 and any(b in table for b in sweep.BASELINE_LABELS):
        ax.legend(fontsize=7)
  fig.suptitle("Test Recall@1 (numbers: rank among the losses) and MAP@R, mean ± std over seeds",
               fontsize=10)
  fig.tight_layout()
  plotting.save(fig, path)


def define_flags():
  flags.DEFINE_list("datasets", ["lfw", "omniglot", "cub200"],
                    "Datasets whose results tables to put side by side, in this order.")
  flags.DEFINE_string("results_dir", sweep.RESULTS_DIR,
                      "Parent of the <dataset>/results.csv directories.")
  flags.DEFINE_string("output_dir", None, "Where the figure and table go (default results_dir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  tables = {}
  for dataset in FLAGS.datasets:
    path = os.path.join(FLAGS.results_dir, dataset, "results.csv")
    if not os.path.exists(path):
      raise app.UsageError(f"--datasets: {path} does not exist; run "
                           f"experiments/compare_losses.py --dataset={dataset} first.")
    tables[dataset] = read_results(path)
  output_dir = FLAGS.output_dir or FLAGS.results_dir
  os.makedirs(output_dir, exist_ok=True)
  table = write_table(tables, os.path.join(output_dir, "cross_dataset.md"),
                      sweep.command_line())
  write_figure(tables, os.path.join(output_dir, "cross_dataset.png"))
  print(table)
  print(f"Wrote cross_dataset.md and cross_dataset.png in {output_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
