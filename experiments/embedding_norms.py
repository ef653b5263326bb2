r"""The embedding norm during training, side by side for several sweeps of one loss.

Sohn's N-pairs loss (2016) works on unnormalised embeddings, and its softmax over
:math:`f_a^\top f_p` can be lowered by scaling the embedding up; the paper therefore adds
:math:`\lambda \frac{1}{B} \sum_i \|f_i\|^2` (``loss.npairs.l2_reg``). This script reads runs that
``compare_losses.py`` made with and without such a term and draws, against steps, the mean L2
norm of the batch's embeddings (the ``train/mean_norm`` diagnostic) and Recall@1 on the
validation classes, mean ± std over seeds; it writes ``embedding_norms.png`` and
``embedding_norms.md`` (the norm at the first and last logged step, the best validation and the
test Recall@1 of each) in ``--output_dir``::

  OUT=experiments/results/lfw_npairs_l2
  python experiments/compare_losses.py --dataset=lfw --data_dir=DATA_DIR --losses=npairs \
      --seeds=0 --steps=600 --eval_every=100 --baselines= --output_dir=$OUT/with_l2
  python experiments/compare_losses.py --dataset=lfw --data_dir=DATA_DIR --losses=npairs \
      --seeds=0 --steps=600 --eval_every=100 --baselines= --set=loss.npairs.l2_reg=0 \
      --output_dir=$OUT/without_l2
  python experiments/embedding_norms.py --loss=npairs --output_dir=$OUT \
      --sweeps="L2 0.002=$OUT/with_l2,no L2=$OUT/without_l2"
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # noqa: E402  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
NORM_TAG = "train/mean_norm"
RECALL_TAG = "val/recall@1"


def parse_sweeps(items: list[str]) -> dict[str, str]:
  """``["label=DIR", ...]`` -> ``{label: DIR}`` (the label may hold spaces, not ``=``)."""
  out = {}
  for item in items:
    label, sep, path = item.partition("=")
    if not sep or not label.strip() or not path.strip():
      raise ValueError(f"--sweeps: expected LABEL=DIRECTORY, got {item!r}.")
    out[label.strip()] = path.strip()
  return out


def read_sweep(output_dir: str, loss: str) -> dict:
  """The runs of ``loss`` in one compare_losses.py output directory.

  Returns ``{"curves": {tag: [(steps, values) per seed]}, "test": [test Recall@1 per seed]}``.
  """
  runs_dir = os.path.join(output_dir, "runs", loss)
  if not os.path.isdir(runs_dir):
    raise ValueError(f"{runs_dir} does not exist: run experiments/compare_losses.py "
                     f"--losses={loss} --output_dir={output_dir} first.")
  curves = {NORM_TAG: [], RECALL_TAG: []}
  test = []
  for seed in sorted(os.listdir(runs_dir)):
    workdir = os.path.join(runs_dir, seed)
    metrics = sweep.read_metrics(workdir)
    if metrics is None:  # Unfinished.
      continue
    scalars = sweep.read_scalars(workdir)
    for tag in curves:
      if tag in scalars:
        curves[tag].append(scalars[tag])
    test.append(metrics["recall@1"])
  if not test:
    raise ValueError(f"{runs_dir} holds no finished run.")
  return {"curves": curves, "test": test}


def _cell(values, digits: int = 3) -> str:
  if len(values) == 1:  # One run has no spread to show.
    return f"{values[0]:.{digits}f}"
  return sweep.format_mean_std(*sweep.mean_and_std(values), digits=digits)


def summary_lines(sweeps: dict[str, dict]) -> list[str]:
  """Markdown table: mean norm at the first and last logged step, best val and test R@1."""
  lines = ["| run | seeds | mean norm, first logged step | mean norm, last step | "
           "best val R@1 | test R@1 |", "|---|---|---|---|---|---|"]
  for label, s in sweeps.items():
    norms = s["curves"][NORM_TAG]
    recalls = s["curves"][RECALL_TAG]
    cells = [str(len(s["test"]))]
    for pick in (0, -1):
      if norms:
        values = [values[pick] for _, values in norms]
        step = norms[0][0][pick]
        cells.append(f"{_cell(values, digits=2)} (step {step})")
      else:
        cells.append("")
    cells.append(_cell([max(v) for _, v in recalls]) if recalls else "")
    cells.append(_cell(s["test"]))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def write_figure(sweeps: dict[str, dict], path: str, title: str) -> None:
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for color, (label, s) in zip(plotting.colors(len(sweeps)), sweeps.items()):
    plotting.band(axes[0], s["curves"][NORM_TAG], color, label)
    plotting.band(axes[1], s["curves"][RECALL_TAG], color, label)
  axes[0].set_ylabel("mean L2 norm of the batch's embeddings")
  axes[1].set_ylabel("Recall@1 on the validation classes")
  for ax in axes:
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  plotting.save(fig, path)


def define_flags():
  flags.DEFINE_string("loss", "npairs", "The loss whose runs to read.")
  flags.DEFINE_list("sweeps", None, "LABEL=DIRECTORY of each compare_losses.py output directory.")
  flags.DEFINE_string("output_dir", None, "Where embedding_norms.png / .md go.")
  flags.mark_flags_as_required(["sweeps", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    sweeps = {label: read_sweep(path, FLAGS.loss)
              for label, path in parse_sweeps(FLAGS.sweeps).items()}
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  label = sweep.LOSS_LABELS.get(FLAGS.loss, FLAGS.loss)
  write_figure(sweeps, os.path.join(FLAGS.output_dir, "embedding_norms.png"),
               f"{label}: embedding norm and validation Recall@1 (mean ± std over seeds)")
  lines = summary_lines(sweeps)
  text = "\n".join([
      f"# {label}: the embedding norm with and without its penalty", "",
      "Made by (from the repository root):", "", "```bash", sweep.command_line(), "```", "",
      "From the runs of each compare_losses.py output directory (their results.md gives the "
      "protocol and the commands); the norm is the `train/mean_norm` diagnostic, the mean L2 "
      "norm of one batch's embeddings on a logged step, mean ± std over seeds.", "", *lines, "",
      "![Embedding norm and validation Recall@1 against steps](embedding_norms.png)", ""])
  with open(os.path.join(FLAGS.output_dir, "embedding_norms.md"), "w") as f:
    f.write(text)
  print("\n".join(lines))
  print(f"Wrote embedding_norms.md and embedding_norms.png in {FLAGS.output_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
