r"""How likely is each ranking loss to degenerate? A learning-rate x batch-size grid per loss.

The survey's claim (2): hard mining converges fast *if the model does not collapse*, and semi-hard
mining is "not the best, but the least likely to degenerate". This script measures that: every
loss is trained on a grid of learning rates x batch sizes (x seeds), and each run is classified
as degenerate or not by the diagnostic below. Then it writes, in ``OUTPUT_DIR`` (default
``experiments/results/<dataset>/stability``):

* ``stability.md``: per loss, the fraction of degenerate runs over the grid, and per cell the
  Recall@1 (mean over seeds) with the degenerate runs marked; the command and the definitions;
* ``stability.csv``: one row per run with every number the classification used;
* ``degenerate_fraction.png``: one heatmap per loss (learning rate x batch size), the fraction of
  seeds that degenerated in each cell.

Commands::

  python experiments/stability.py                                    # digits, small grid
  python experiments/stability.py --dataset=omniglot --data_dir=/tmp/tfds --steps=300

**The degeneracy diagnostic.** A run is *degenerate* when any of these holds for its final
model, on the test classes:

1. *non-finite*: the final training loss or any test embedding is NaN or infinite (training
   diverged; the evaluation refuses NaN embeddings, and the run is recorded as such);
2. *collapsed*: the embeddings were pulled together: their angular spread, the mean cosine
   distance :math:`1 - \cos(x_i, x_j)` over pairs of distinct test images, fell below
   ``--collapse_ratio`` (default 0.1) times the spread of the *untrained* network the run started
   from. Retrieval (cosine) only sees directions, so this is collapse whatever the norms do. The
   reference is the run's own initialisation, not an absolute number, because an untrained
   network's spread is already small (ReLU features share a common direction): a threshold fixed
   in advance would flag healthy untrained networks or miss collapsed trained ones;
3. *at chance*: Recall@1 below ``--chance_factor`` (default 2) times the Recall@1 of a random
   ranking, :math:`\frac1N\sum_q (n_{y_q} - 1)/(N - 1)`: the embedding carries no class
   information, collapsed or not.

Criterion 2 also guards against a subtlety of criterion 3: when embeddings are exactly tied, the
exact top-k of the evaluation breaks ties by index, and the test images are stored class by class,
so a fully collapsed model can show a *high* Recall@1. The CSV keeps every number (final and
initial spread, Recall@1 and the untrained network's Recall@1, chance) so that the runs can be
re-classified with other thresholds.

Each run's learning rate applies to the whole model (``optimizer.learning_rate``; a config with
a separate head learning rate keeps the ratio). A batch size ``B`` keeps the config's ``K``
samples per class and uses ``P = B / K`` classes (the N-pair family: ``K = 2``); where that is not
a whole number or exceeds the training classes, ``P`` is the number of training classes and
``K = B / P``. A cell that cannot be laid out (e.g. an N-pairs batch larger than twice the class
count, the survey's caveat) is reported as n/a.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

FLAGS = flags.FLAGS
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds the data here.

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # noqa: E402  # pylint: disable=wrong-import-position

ALL_LOSSES = tuple(sweep.LOSS_LABELS)
DIAGNOSTICS_FILE = "degeneracy.json"
FAILED_FILE = "failed.json"  # A run whose training or evaluation stopped on NaN/inf values.


DEFAULT_BATCH_SIZES = {"digits": (20, 40, 80), "omniglot": (32, 128)}
DEFAULT_STEPS = {"digits": 100, "omniglot": 300}


def batch_layout(batch_size: int, *, loss: str, samples_per_class: int,
                 train_classes: int) -> tuple[int, int] | None:
  """``(P, K)`` for a global batch of ``batch_size`` (see the module docstring), or ``None``."""
  from rankjax import configs  # pylint: disable=g-import-not-at-top
  fixed_k = configs.loss_spec(loss).samples_per_class
  k = fixed_k or samples_per_class
  p = batch_size // k
  if batch_size % k or p > train_classes:
    if fixed_k or batch_size % train_classes:
      return None
    p, k = train_classes, batch_size // train_classes
  if p < 2 or k < 2:
    return None
  return p, k


def loss_config(dataset: str, loss: str, config_flags: str = ""):
  """``dataset``'s config for ``loss`` and ``config_flags`` (no flags: the sweeps' defaults)."""
  arg = ",".join([loss] + [f for f in config_flags.split(",") if f.strip()])
  config = sweep.load_config(dataset, arg)
  if not config_flags:
    sweep.apply_overrides(config, sweep.SWEEP_DEFAULTS.get(dataset, {}).items())
  return config


def build_config(dataset: str, loss: str, *, learning_rate: float, batch_size: int, seed: int,
                 steps: int | None, train_classes: int, config_flags: str = "",
                 data_dir: str | None = None, overrides=()):
  """The config of one grid run, or ``None`` when its batch cannot be laid out."""
  config = loss_config(dataset, loss, config_flags)
  layout = batch_layout(batch_size, loss=loss, samples_per_class=config.samples_per_class,
                        train_classes=train_classes)
  if layout is None:
    return None
  config.classes_per_batch, config.samples_per_class = layout
  config.seed = seed
  if data_dir is not None:
    config.data_dir = data_dir
  if steps is None and not config_flags:
    steps = DEFAULT_STEPS.get(dataset)
  if steps is not None:
    config.train.steps = steps
    config.train.log_every = min(config.train.log_every, max(steps // 10, 1))
    config.train.checkpoint_every = min(config.train.checkpoint_every, steps)
  if config.optimizer.head_learning_rate is not None:
    config.optimizer.head_learning_rate *= learning_rate / config.optimizer.learning_rate
  config.optimizer.learning_rate = learning_rate
  config.eval.every = 0
  sweep.apply_overrides(config, overrides)
  return config


def _is_non_finite_error(error: Exception) -> bool:
  text = str(error).lower()
  return isinstance(error, FloatingPointError) or any(
      word in text for word in ("nan", "non-finite", "not finite", "infinite", " inf"))


def mean_cosine_distance(embeddings: np.ndarray, *, max_points: int = 4000, seed: int = 0
                         ) -> float:
  r"""Mean of :math:`1 - \cos(x_i, x_j)` over pairs :math:`i \ne j` (a random subset of rows
  when there are more than ``max_points``). Zero vectors count as cosine 0 with everything."""
  x = np.asarray(embeddings, np.float64)
  if len(x) > max_points:
    x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  u = np.where(norms > 0, x / np.where(norms > 0, norms, 1.0), 0.0)
  n = len(u)
  if n < 2:
    return float("nan")
  s = u.sum(0)
  # sum_{i != j} cos = ||sum u||^2 - sum ||u_i||^2, without the n x n matrix.
  mean_cos = (s @ s - np.sum(u * u)) / (n * (n - 1))
  return float(1.0 - mean_cos)


def classify(measurements: dict, *, collapse_ratio: float, chance_factor: float) -> dict:
  """The degeneracy diagnostic (module docstring) of a run's :func:`measure` numbers.

  Returns:
    ``{"degenerate": bool, "reason": "non-finite" | "collapsed" | "at chance" | ... | ""}``;
    several reasons are joined with ``+``.
  """
  m = measurements
  finite = bool(m["finite"])
  reasons = []
  if not finite:
    reasons.append("non-finite")
  elif m["mean_cosine_distance"] < collapse_ratio * m["initial_mean_cosine_distance"]:
    reasons.append("collapsed")
  if finite and m["recall@1"] < chance_factor * m["chance_recall@1"]:
    reasons.append("at chance")
  return {"degenerate": bool(reasons), "reason": "+".join(reasons)}


def measurements_of(*, final_loss: float, embeddings: np.ndarray, recall_at_1: float,
                    chance: float, initial_embeddings: np.ndarray,
                    initial_recall_at_1: float) -> dict:
  """The numbers :func:`classify` reads, from a run's final and initial test embeddings."""
  finite = bool(np.isfinite(final_loss) and np.all(np.isfinite(embeddings))
                and np.isfinite(recall_at_1))
  return {"finite": finite,
          "final_train_loss": float(final_loss),
          "mean_cosine_distance": mean_cosine_distance(embeddings) if finite else float("nan"),
          "initial_mean_cosine_distance": mean_cosine_distance(initial_embeddings),
          "recall@1": float(recall_at_1),
          "initial_recall@1": float(initial_recall_at_1),
          "chance_recall@1": float(chance)}


NON_FINITE = {"finite": False, "final_train_loss": float("nan"),
              "mean_cosine_distance": float("nan"), "initial_mean_cosine_distance": float("nan"),
              "recall@1": float("nan"), "initial_recall@1": float("nan"),
              "chance_recall@1": float("nan")}


def measure(workdir: str) -> dict:
  """:func:`measurements_of` the finished run in ``workdir`` (needs its latest checkpoint)."""
  from rankjax import evaluation  # pylint: disable=g-import-not-at-top
  metrics = sweep.read_metrics(workdir) or {}
  scalars = sweep.read_scalars(workdir)
  losses_logged = scalars.get("train/loss", (np.array([]), np.array([])))[1]
  embeddings, labels = sweep.embed_eval_split(workdir)
  initial, _ = sweep.embed_eval_split(workdir, which="init")
  config = sweep.read_json(os.path.join(workdir, sweep.CONFIG_FILE))
  initial_recall = evaluation.retrieval_metrics(
      initial, labels, ks=(1,), distance=config["eval"]["distance"])["recall@1"]
  return measurements_of(
      final_loss=float(losses_logged[-1]) if losses_logged.size else float("nan"),
      embeddings=embeddings, recall_at_1=float(metrics.get("recall@1", np.nan)),
      chance=sweep.chance_recall_at_1(labels), initial_embeddings=initial,
      initial_recall_at_1=initial_recall)


def run_dir(output_dir: str, loss: str, learning_rate: float, batch_size: int, seed: int) -> str:
  """Where the grid keeps the run of one (loss, learning rate, batch size, seed) cell."""
  return os.path.join(output_dir, "runs", loss, f"lr{learning_rate:g}_bs{batch_size}_seed{seed}")


def run_grid(dataset, losses, learning_rates, batch_sizes, seeds, output_dir, *, steps=None,
             config_flags="", data_dir=None, overrides=(), collapse_ratio=0.1,
             chance_factor=2.0, keep_checkpoints=False, train_fn=None, log=print):
  """Trains (or reuses) every grid run, measures and classifies it; returns one dict per run.

  Each run's measurements are stored in its ``degeneracy.json``; classifying again with other
  thresholds needs no checkpoint, so checkpoints are deleted once measured unless
  ``keep_checkpoints``.
  """
  if not losses:
    raise ValueError("--losses is empty: name at least one loss.")
  for loss in losses:
    if loss not in ALL_LOSSES:
      raise ValueError(f"--losses: unknown loss {loss!r}; the losses are {', '.join(ALL_LOSSES)}.")
  # The training classes bound the batch layouts: count them in the data the runs train on,
  # which the config flags choose (``offline`` trains on another dataset than ``dataset``).
  probe = loss_config(dataset, losses[0], config_flags)
  if data_dir is not None:
    probe.data_dir = data_dir
  sweep.apply_overrides(probe, overrides)
  train_classes = sweep.dataset_info(probe).train_classes
  plan = []
  for loss in losses:
    for lr in learning_rates:
      for batch in batch_sizes:
        for seed in seeds:
          config = build_config(dataset, loss, learning_rate=lr, batch_size=batch, seed=seed,
                                steps=steps, train_classes=train_classes,
                                config_flags=config_flags, data_dir=data_dir,
                                overrides=overrides)
          plan.append((loss, lr, batch, seed, config))
  rows = []
  runnable = sum(c is not None for *_, c in plan)
  done = 0
  for loss, lr, batch, seed, config in plan:
    row = {"loss": loss, "learning_rate": lr, "batch_size": batch, "seed": seed}
    if config is None:
      rows.append({**row, "P": "", "K": "", "degenerate": "", "reason": "n/a: batch layout"})
      continue
    done += 1
    row.update(P=config.classes_per_batch, K=config.samples_per_class)
    workdir = run_dir(output_dir, loss, lr, batch, seed)
    log(f"[{done}/{runnable}] {loss} lr {lr:g} batch {config.classes_per_batch}x"
        f"{config.samples_per_class} seed {seed}: ", end="")
    measured_path = os.path.join(workdir, DIAGNOSTICS_FILE)
    failed_path = os.path.join(workdir, FAILED_FILE)
    wall_s, metrics, how = float("nan"), {}, "reused"
    failure = sweep.read_json(failed_path)
    if failure is not None:
      sweep.check_same_config(config, workdir)
    else:
      try:
        result = sweep.run_or_reuse(config, workdir, train_fn=train_fn, keep_checkpoints=True)
        metrics, wall_s = result.metrics, result.wall_s
        how = "reused" if result.reused else f"trained in {wall_s:.1f} s"
      except (ValueError, FloatingPointError) as e:
        if not _is_non_finite_error(e):
          raise
        # A run that diverged is a result of this study, not a crash: keep it (and do not
        # train it again next time).
        failure = {"error": f"{type(e).__name__}: {e}"}
        sweep.write_json(failed_path, failure)
    if failure is not None:
      how = "diverged (non-finite values)"
    measured = sweep.read_json(measured_path)
    if measured is None:
      measured = NON_FINITE if failure is not None else measure(workdir)
      sweep.write_json(measured_path, measured)
    if not keep_checkpoints:
      for sub in ("checkpoints", "best"):
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    row.update(measured)
    row.update(classify(measured, collapse_ratio=collapse_ratio, chance_factor=chance_factor))
    row["map@r"] = metrics.get("map@r", float("nan"))
    row["wall_s"] = wall_s
    log(f"{how}, R@1 {row['recall@1']:.3f} (untrained {row['initial_recall@1']:.3f}), "
        f"cosine spread {row['mean_cosine_distance']:.4f} "
        f"(untrained {row['initial_mean_cosine_distance']:.4f})"
        + (f" -> DEGENERATE ({row['reason']})" if row["degenerate"] else ""))
    rows.append(row)
  return rows


def degenerate_fractions(rows, losses, learning_rates, batch_sizes):
  """``{loss: f64[len(lrs), len(batches)]}``: degenerate fraction over seeds (NaN: not run)."""
  out = {}
  for loss in losses:
    grid = np.full((len(learning_rates), len(batch_sizes)), np.nan)
    for i, lr in enumerate(learning_rates):
      for j, batch in enumerate(batch_sizes):
        cell = [r["degenerate"] for r in rows if r["loss"] == loss and r["learning_rate"] == lr
                and r["batch_size"] == batch and r["degenerate"] != ""]
        if cell:
          grid[i, j] = np.mean(cell)
    out[loss] = grid
  return out


def write_outputs(rows, output_dir, *, dataset, losses, learning_rates, batch_sizes, seeds,
                  config, command, collapse_ratio, chance_factor, config_flags="") -> str:
  """stability.csv, stability.md and degenerate_fraction.png; returns the summary table."""
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  keys = ["loss", "learning_rate", "batch_size", "P", "K", "seed", "degenerate", "reason",
          "recall@1", "initial_recall@1", "map@r", "mean_cosine_distance",
          "initial_mean_cosine_distance", "chance_recall@1", "finite", "final_train_loss",
          "wall_s"]
  with open(os.path.join(output_dir, "stability.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow(row)  # Full precision: the CSV is what others re-threshold.

  fractions = degenerate_fractions(rows, losses, learning_rates, batch_sizes)
  summary = ["| loss | degenerate runs | fraction | reasons | R@1 below the untrained network's | "
             "best R@1 |", "|---|---|---|---|---|---|"]
  for loss in losses:
    ran = [r for r in rows if r["loss"] == loss and r["degenerate"] != ""]
    bad = [r for r in ran if r["degenerate"]]
    reasons = sorted({r["reason"] for r in bad})
    worse = sum(1 for r in ran if r["finite"] and r["recall@1"] < r["initial_recall@1"])
    best = max((r["recall@1"] for r in ran if not r["degenerate"]), default=None)
    frac = f"{len(bad) / len(ran):.2f}" if ran else "n/a"
    summary.append(f"| {sweep.LOSS_LABELS.get(loss, loss)} | {len(bad)} / {len(ran)} | {frac} | "
                   f"{', '.join(reasons) or '-'} | {worse} / {len(ran)} | "
                   f"{'-' if best is None else f'{best:.3f}'} |")

  cells = ["| loss | learning rate | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
           "|---|---|" + "---|" * len(batch_sizes)]
  for loss in losses:
    for lr in learning_rates:
      entries = []
      for batch in batch_sizes:
        cell = [r for r in rows if r["loss"] == loss and r["learning_rate"] == lr
                and r["batch_size"] == batch]
        ran = [r for r in cell if r["degenerate"] != ""]
        if not ran:
          entries.append("n/a")
          continue
        r1 = np.nanmean([r["recall@1"] for r in ran])
        bad = sum(bool(r["degenerate"]) for r in ran)
        entries.append(f"{r1:.3f} ({ran[0]['P']}x{ran[0]['K']})"
                       + (f" **D {bad}/{len(ran)}**" if bad else ""))
      cells.append(f"| {sweep.LOSS_LABELS.get(loss, loss)} | {lr:g} | " + " | ".join(entries)
                   + " |")

  machine = sweep.machine_info()
  trained_on = sweep.describe_run_machines(
      run_dir(output_dir, r["loss"], r["learning_rate"], r["batch_size"], r["seed"])
      for r in rows if r["degenerate"] != "")
  options = config.model.backbone_options.to_dict()
  options = f" with {options}" if options else ""
  optimization = sweep.describe_optimization(config, learning_rate="the grid's learning rates")
  lines = [
      f"# Stability of the ranking losses on {dataset}: learning rate x batch size",
      "",
      "Made by (from the repository root):",
      "",
      "```bash",
      command,
      "```",
      "",
      f"Runs trained on {trained_on}. This page was written on {machine['cpu_count']} CPU "
      f"cores ({machine['processor']}), JAX {machine['jax_version']}, {machine['device']}; each "
      "run's run_info.json holds its own machine, command and wall time. "
      f"Model `{config.model.name}`{options}, {config.train.steps} steps, "
      f"{optimization}, seeds {', '.join(map(str, seeds))}; everything else as in "
      f"experiments/configs/{dataset}.py"
      + (" (the study sets its own number of steps)." if config_flags
         else "; the study sets its own number of steps." + sweep.sweep_defaults_note(dataset)),
      "",
      "A run is **degenerate** when its final model's test embeddings are non-finite, or "
      f"collapsed (mean pairwise cosine distance below {collapse_ratio:g} x that of the untrained "
      "network it started from), or its Recall@1 is "
      f"below {chance_factor:g} x chance (experiments/stability.py explains why). Also counted, "
      "but not as degenerate: runs whose Recall@1 ended below that of the untrained network "
      "they started from (training hurt retrieval).",
      "",
      "## Degenerate fraction per loss (over the whole grid)",
      "",
      *summary,
      "",
      "![degenerate fraction per cell](degenerate_fraction.png)",
      "",
      "## Recall@1 per cell (mean over seeds; batch P x K; D = degenerate runs)",
      "",
      *cells,
      "",
      "Every run, with the numbers the classification used: `stability.csv`.",
      "",
  ]
  with open(os.path.join(output_dir, "stability.md"), "w") as f:
    f.write("\n".join(lines))

  fig = plotting.degenerate_heatmaps(
      {sweep.LOSS_LABELS.get(loss, loss): fractions[loss] for loss in losses},
      row_values=learning_rates, col_values=batch_sizes, row_name="peak learning rate",
      col_name="global batch size (images)",
      title=f"{dataset}: fraction of seeds that degenerated ({config.train.steps} steps; "
            "grey = batch not possible)")
  plotting.save(fig, os.path.join(output_dir, "degenerate_fraction.png"))
  return "\n".join(summary)


def define_flags():
  """The command-line flags (defined only when run as a script: the module stays importable)."""
  flags.DEFINE_string("dataset", "digits", "A config in experiments/configs/.")
  flags.DEFINE_list("losses", list(sweep.SURVEY_LOSSES), "Losses to study (comma-separated).")
  flags.DEFINE_list("learning_rates", ["1e-4", "1e-3", "1e-2", "1e-1"],
                    "Peak learning rates of the grid.")
  flags.DEFINE_list("batch_sizes", None, "Global batch sizes of the grid (default: "
                    "DEFAULT_BATCH_SIZES for the dataset).")
  flags.DEFINE_list("seeds", ["0"], "Seeds per grid cell.")
  flags.DEFINE_integer("steps", None, "Training steps per run (default: DEFAULT_STEPS for the "
                       "dataset, else the config's).")
  flags.DEFINE_string("output_dir", None,
                      "Default: experiments/results/<dataset>/stability.")
  flags.DEFINE_float("collapse_ratio", 0.1, "A run has collapsed when the mean pairwise cosine "
                     "distance of its test embeddings is below this fraction of the untrained "
                     "network's.")
  flags.DEFINE_float("chance_factor", 2.0,
                     "Recall@1 below this multiple of the chance level counts as degenerate.")
  sweep.define_common_flags(
      "Keep each run's checkpoints after measuring it (by default only metrics, config, scalars "
      "and measurements stay).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.train_logs:
    logging.set_verbosity(logging.ERROR)  # Orbax and TF warnings too: one line per run instead.
  try:
    learning_rates = [float(v) for v in FLAGS.learning_rates]
    batch_value = FLAGS.batch_sizes or DEFAULT_BATCH_SIZES.get(FLAGS.dataset, (32, 128))
    batch_sizes = [int(v) for v in batch_value]
    seeds = [int(v) for v in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f"--learning_rates, --batch_sizes, --seeds must be numbers: {e}") from e
  if any(lr <= 0 for lr in learning_rates) or any(b <= 0 for b in batch_sizes):
    raise app.UsageError("--learning_rates and --batch_sizes must be positive.")
  if FLAGS.collapse_ratio < 0 or FLAGS.chance_factor < 0:
    raise app.UsageError("--collapse_ratio and --chance_factor must be >= 0.")
  output_dir = FLAGS.output_dir or os.path.join(sweep.RESULTS_DIR, FLAGS.dataset, "stability")
  os.makedirs(output_dir, exist_ok=True)
  sweep.enable_compilation_cache(FLAGS.compilation_cache)
  print(f"Stability grid on {FLAGS.dataset}: {len(FLAGS.losses)} losses x "
        f"{len(learning_rates)} learning rates x {len(batch_sizes)} batch sizes x {len(seeds)} "
        f"seeds; runs and results in {output_dir}", flush=True)
  rows = run_grid(FLAGS.dataset, FLAGS.losses, learning_rates, batch_sizes, seeds, output_dir,
                  steps=FLAGS.steps, config_flags=FLAGS.config_flags, data_dir=FLAGS.data_dir,
                  overrides=FLAGS.set, collapse_ratio=FLAGS.collapse_ratio,
                  chance_factor=FLAGS.chance_factor, keep_checkpoints=FLAGS.keep_checkpoints,
                  log=lambda *a, **k: print(*a, **k, flush=True))
  config = loss_config(FLAGS.dataset, FLAGS.losses[0], FLAGS.config_flags)
  if not FLAGS.config_flags:
    config.train.steps = DEFAULT_STEPS.get(FLAGS.dataset, config.train.steps)
  config.train.steps = FLAGS.steps or config.train.steps
  table = write_outputs(rows, output_dir, dataset=FLAGS.dataset, losses=FLAGS.losses,
                        learning_rates=learning_rates, batch_sizes=batch_sizes, seeds=seeds,
                        config=config, command=sweep.command_line(),
                        collapse_ratio=FLAGS.collapse_ratio,
                        chance_factor=FLAGS.chance_factor, config_flags=FLAGS.config_flags)
  print(table, flush=True)
  print(f"Wrote stability.md, stability.csv, degenerate_fraction.png in {output_dir}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
