r"""Every loss on every dataset side by side: the figure and the table of ranks.

Reads the ``results.csv`` that ``compare_losses.py`` wrote for each dataset (the mean and standard
deviation over seeds of each loss's test metrics, and the untrained baselines where the table has
them) and writes, in ``--output_dir`` (default ``experiments/results``):

* ``cross_dataset.png``: Recall@1 and MAP@R of each loss on each dataset, bars with the
  standard deviation over seeds, the untrained baselines as dashed lines;
* ``cross_dataset.md``: the same numbers, and the rank of each loss on each dataset (1 = the
  best mean Recall@1 among the losses in that table; baselines are not ranked), with how many
  seeds each number is the mean of; then, for the datasets whose runs evaluated a validation
  split during training, how fast each loss got there: validation Recall@1 at the first
  evaluation, its best and the step of the best (read from the runs' TensorBoard scalars, no
  extra training).

::

  python experiments/cross_dataset.py --datasets=lfw,omniglot,cub200,cars196

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
VAL_TAG = "val/recall@1"


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


def convergence(runs_dir: str) -> dict[str, dict]:
  """Validation Recall@1 during training of each loss's runs under ``runs_dir``.

  Returns ``{loss: {"first_step": s, "first": x, "best": y, "best_steps": [..]}}``: the mean over
  seeds of the Recall@1 at the first evaluation (step ``s``) and of each seed's best, and the
  step of each seed's best. Losses whose runs logged no validation Recall@1 are left out.
  """
  out = {}
  for loss in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    curves = []
    for seed in sorted(os.listdir(os.path.join(runs_dir, loss))):
      workdir = os.path.join(runs_dir, loss, seed)
      if os.path.isdir(os.path.join(workdir, "tensorboard")):
        steps, values = sweep.read_scalars(workdir).get(VAL_TAG, ((), ()))
        curve = {int(step): float(value) for step, value in zip(steps, values)}
        if curve:
          curves.append(curve)
    if not curves:
      continue
    first_step = min(min(c) for c in curves)
    firsts = [c[first_step] for c in curves if first_step in c]
    bests = [max(c.items(), key=lambda item: (item[1], -item[0])) for c in curves]
    out[loss] = {"first_step": first_step, "first": sum(firsts) / len(firsts),
                 "best": sum(v for _, v in bests) / len(bests),
                 "best_steps": [step for step, _ in bests], "seeds": len(curves)}
  return out


def convergence_table(curves: dict[str, dict[str, dict]]) -> list[str]:
  """Markdown lines: per dataset, validation R@1 at the first evaluation -> best (its steps),
  and the rank by the first evaluation's R@1."""
  losses = [n for n in sweep.LOSS_LABELS if any(n in c for c in curves.values())]
  lines = ["| loss | " + " | ".join(f"{d}: first -> best (step of best)" for d in curves) + " | "
           + " | ".join(f"rank at first eval on {d}" for d in curves) + " |",
           "|---|" + "---|" * (2 * len(curves))]
  rank_by = {d: ranks({n: {"recall@1_mean": r["first"]} for n, r in c.items()})
             for d, c in curves.items()}
  for name in losses:
    cells = []
    for c in curves.values():
      r = c.get(name)
      cells.append("" if r is None else f"{r['first']:.3f} -> {r['best']:.3f} "
                   f"({'/'.join(map(str, r['best_steps']))})")
    cells += [str(rank_by[d].get(name, "")) for d in curves]
    lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
  return lines


def _label(name: str) -> str:
  return sweep.LOSS_LABELS.get(name) or sweep.BASELINE_LABELS.get(name, name)


def write_table(tables: dict[str, dict], path: str, command: str,
                curves: dict[str, dict] | None = None) -> str:
  """Writes the markdown table of every loss on every dataset (and, given ``curves`` from
  :func:`convergence` per dataset, the convergence table); returns the first."""
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
  curves = {d: c for d, c in (curves or {}).items() if c}
  if curves:
    first_steps = sorted({r["first_step"] for c in curves.values() for r in c.values()})
    text += "\n".join([
        "", "## How fast each loss gets there", "",
        "Recall@1 on the validation classes (held out of training; the test classes are not "
        "looked at) during training, read from the runs' evaluations (no extra training): at the "
        f"first evaluation (step {'/'.join(map(str, first_steps))}) -> the best of the run, mean "
        "over seeds, and the step of each seed's best. The rank is by the first evaluation's "
        "Recall@1 (1 = highest).", "", *convergence_table(curves), ""])
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
  flags.DEFINE_list("datasets", ["lfw", "omniglot", "cub200", "cars196"],
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
  curves = {d: convergence(os.path.join(FLAGS.results_dir, d, "runs")) for d in tables}
  table = write_table(tables, os.path.join(output_dir, "cross_dataset.md"),
                      sweep.command_line(), curves)
  write_figure(tables, os.path.join(output_dir, "cross_dataset.png"))
  print(table)
  print(f"Wrote cross_dataset.md and cross_dataset.png in {output_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
