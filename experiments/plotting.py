"""Plots of the experiment sweeps: Recall@K bars, training curves, stability heatmaps.

Every figure has labelled axes with units, a title that says what was measured, and a legend;
all take plain numpy/dict inputs so that notebooks can draw the same figures from their own runs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import sys

import matplotlib

if "IPython" not in sys.modules:
  matplotlib.use("Agg")  # Scripts write files; a notebook keeps its inline backend.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def colors(n: int):
  cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


def recall_at_k_bars(summary: Mapping[str, Mapping[int, tuple[float, float]]], *,
                     title: str, n_seeds: Mapping[str, int] | None = None,
                     chance: float | None = None, ax=None):
  """Grouped bars of Recall@K: one group per K, one bar per loss, error bars = std over seeds.

  Args:
    summary: ``{loss label: {K: (mean, std)}}``.
    title: the figure title (dataset, protocol).
    n_seeds: ``{loss label: number of seeds}``, shown in the legend.
    chance: Recall@1 of a random ranking, drawn as a dashed line.
    ax: an axes to draw on (default: a new figure).

  Returns:
    The matplotlib figure.
  """
  if ax is None:
    fig, ax = plt.subplots(figsize=(11, 4.8))
  else:
    fig = ax.figure
  labels = list(summary)
  ks = sorted({k for v in summary.values() for k in v})
  width = 0.8 / max(len(labels), 1)
  x = np.arange(len(ks))
  for i, (label, color) in enumerate(zip(labels, colors(len(labels)))):
    means = [summary[label].get(k, (np.nan, np.nan))[0] for k in ks]
    stds = [summary[label].get(k, (np.nan, np.nan))[1] for k in ks]
    name = label if n_seeds is None else f"{label} (n={n_seeds[label]})"
    ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, color=color,
           label=name, error_kw={"elinewidth": 0.8})
  lows = [m - s for v in summary.values() for m, s in v.values() if np.isfinite(m)]
  bottom = max(0.0, min(lows, default=0.0) - 0.05)
  if chance is not None:
    if chance >= bottom:
      ax.axhline(chance, color="k", linestyle="--", linewidth=0.8,
                 label=f"chance Recall@1 ({chance:.3f})")
    else:  # Drawing it would squash every difference between the losses into a sliver.
      ax.plot([], [], " ", label=f"(chance Recall@1 = {chance:.3f}, below the axis)")
  ax.set_ylim(bottom, 1.0)
  ax.set_xticks(x, [f"K = {k}" for k in ks])
  ax.set_xlabel("K (number of nearest neighbours retrieved)")
  ax.set_ylabel("Recall@K (fraction of test queries)")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="loss (seeds)")
  fig.tight_layout()
  return fig


def band(ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], color, label):
  """Mean over seeds (on the steps every seed logged) with a +-1 std band."""
  curves = [c for c in curves if len(c[0])]
  if not curves:
    return
  common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
  if not common:
    return
  values = np.stack([np.interp(common, s, v) for s, v in curves])
  mean = values.mean(0)
  std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
  ax.plot(common, mean, color=color, label=label, marker="o" if len(common) < 12 else None,
          markersize=3)
  ax.fill_between(common, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def training_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]],
                    *, title: str, recall_tag: str = "val/recall@1",
                    loss_tag: str = "train/loss"):
  """Recall@1 on the validation split against steps for every loss, then each loss's training loss.

  Without validation curves (a dataset without a validation split) the first panel says so.

  Losses live on different scales (a hinge in [0, margin], a softmax cross-entropy in
  [0, log B]), so each gets its own y axis rather than one unreadable shared one.

  Args:
    curves: ``{loss label: {tag: [(steps, values) per seed]}}``.
    title: the figure title.

  Returns:
    The matplotlib figure.
  """
  labels = list(curves)
  color_of = dict(zip(labels, colors(len(labels))))
  n_panels = 1 + len(labels)
  ncols = min(4, n_panels + 1)
  nrows = int(np.ceil((n_panels + 1) / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
  axes = axes.ravel()
  ax = axes[0]
  for label in labels:
    band(ax, curves[label].get(recall_tag, []), color_of[label], label)
  if not any(curves[label].get(recall_tag) for label in labels):
    ax.text(0.5, 0.5, "no validation split:\nthe test split is evaluated once, at the end",
            ha="center", va="center", transform=ax.transAxes, fontsize=9)
  ax.set_xlabel("training step")
  ax.set_ylabel("Recall@1 on the validation classes")
  ax.set_title("Recall@1 (mean ± std over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  for ax, label in zip(axes[1:], labels):
    band(ax, curves[label].get(loss_tag, []), color_of[label], label)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (batch mean)")
    ax.set_title(f"{label}: loss", fontsize=10)
    ax.grid(alpha=0.3)
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  handles, names = axes[0].get_legend_handles_labels()
  if n_panels < len(axes):  # A free panel holds the legend, so that it hides no curve.
    axes[n_panels].set_visible(True)
    axes[n_panels].axis("off")
    axes[n_panels].legend(handles, names, loc="center", fontsize=9, title="loss")
  else:
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def degenerate_heatmaps(fractions: Mapping[str, np.ndarray], *, row_values: Sequence,
                        col_values: Sequence, row_name: str, col_name: str, title: str):
  """One heatmap per loss: the fraction of degenerate runs in each (row, column) cell.

  Args:
    fractions: ``{loss label: f64[rows, cols]}`` in [0, 1], NaN where the cell was not run.
    row_values, col_values: the grid's values (e.g. learning rates, batch sizes).
    row_name, col_name: axis labels with units.
    title: the figure title.

  Returns:
    The matplotlib figure.
  """
  labels = list(fractions)
  ncols = min(3, len(labels))
  nrows = int(np.ceil(len(labels) / ncols))
  # constrained layout keeps each panel's title clear of the axis labels of the row above.
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.4, 2.9 * nrows + 0.6),
                           squeeze=False, layout="constrained")
  cmap = plt.get_cmap("Reds").copy()
  cmap.set_bad("lightgrey")
  image = None
  for index, (ax, label) in enumerate(zip(axes.ravel(), labels)):
    values = np.asarray(fractions[label], dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0,
                      aspect="auto")
    for (r, c), v in np.ndenumerate(values):
      ax.text(c, r, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
              fontsize=8, color="white" if np.isfinite(v) and v > 0.6 else "black")
    ax.set_xticks(range(len(col_values)), [str(v) for v in col_values])
    ax.set_yticks(range(len(row_values)), [f"{v:g}" for v in row_values])
    if index + ncols >= len(labels):  # The lowest panel of its column.
      ax.set_xlabel(col_name)
    if index % ncols == 0:
      ax.set_ylabel(row_name)
    ax.set_title(label, fontsize=10)
  for ax in axes.ravel()[len(labels):]:
    ax.set_visible(False)
  if image is not None:
    fig.colorbar(image, ax=axes.ravel().tolist(), label="fraction of runs degenerate",
                 shrink=0.8)
  fig.suptitle(title)
  return fig


def save(fig, path: str) -> None:
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
