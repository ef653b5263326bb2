r"""The survey reproduction: train every ranking loss under one protocol and compare them.

Command (no arguments: the embedded default, scikit-learn's digits, all losses, 3 seeds; a few
minutes on 2 CPU cores)::

  python experiments/compare_losses.py

Omniglot (964 training characters, 659 unseen test characters; see experiments/configs/omniglot.py
for the recipe and for preparing its TFDS directory offline)::

  python experiments/compare_losses.py --dataset=omniglot --data_dir=/tmp/tfds

Each (loss, seed) is one run of :func:`rankjax.train.train_and_evaluate` with the dataset's config
(``experiments/configs/<dataset>.py:<loss>``), in ``OUTPUT_DIR/runs/<loss>/seed<k>/``. The sweep is
resumable: a run with a ``metrics.json`` is read, not trained again, and an interrupted run resumes
from its last checkpoint; ``--finished_only`` trains nothing and tabulates the runs that have
finished (each row then says its number of seeds). Then it writes, in ``OUTPUT_DIR`` (default
``experiments/results/<dataset>``):

* ``results.md``: mean ± sample standard deviation over seeds of Recall@1/2/4/8, MAP@R,
  R-Precision and NMI on the test classes, per loss, the best mean of each column in bold, with
  the command, the protocol and the machine;
* ``results.csv``: the same numbers, one row per loss; ``runs.csv``: one row per run;
* ``recall_at_k.png``: Recall@K bars per loss with error bars (std over seeds);
* ``training_curves.png``: Recall@1 on the test classes and the training loss against steps.

The seed sets the model initialisation and the batch order; everything else is the config's,
except what ``sweep.SWEEP_DEFAULTS`` changes for a dataset (digits: a narrower network and 150
steps, so that 27 runs fit in 5 minutes). ``--steps``, ``--eval_every`` and ``--set FIELD=VALUE``
change the protocol for every run; each run's config.json records it, and a finished run is only
reused for the same protocol.
"""

from __future__ import annotations

import csv
import datetime
import os
import sys

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds the data here.

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # noqa: E402  # pylint: disable=wrong-import-position

ALL_LOSSES = tuple(sweep.LOSS_LABELS)


def _has_validation_split(config) -> bool:
  from rankjax import data  # pylint: disable=g-import-not-at-top
  fraction = config.protocol.val_fraction
  if fraction is None:
    fraction = data.datasets.get_spec(config.dataset).val_fraction
  return fraction > 0


def build_config(dataset: str, loss: str, seed: int, *, config_flags: str = "",
                 steps: int | None = None, eval_every: int | None = None,
                 data_dir: str | None = None, overrides=()):
  """The config of one run: ``experiments/configs/<dataset>.py:<loss>`` plus the sweep's changes."""
  if loss not in ALL_LOSSES:
    raise ValueError(f"--losses: unknown loss {loss!r}; the losses are {', '.join(ALL_LOSSES)}.")
  arg = ",".join([loss] + [f for f in config_flags.split(",") if f.strip()])
  config = sweep.load_config(dataset, arg)
  config.seed = seed
  if data_dir is not None:
    config.data_dir = data_dir
  if not config_flags:  # A 'runlocal' config is already as small as it gets.
    sweep.apply_overrides(config, sweep.SWEEP_DEFAULTS.get(dataset, {}).items())
  if steps is None:
    steps = config.train.steps
  if steps is not None:
    if steps <= 0:
      raise ValueError(f"--steps must be positive; got {steps}.")
    config.train.steps = steps
    config.train.log_every = min(config.train.log_every, max(steps // 10, 1))
    config.train.checkpoint_every = min(config.train.checkpoint_every, steps)
  if eval_every is None:  # Learning curves on the validation split, where the dataset has one.
    sweep.apply_overrides(config, overrides)  # The dataset and protocol they may set decide it.
    eval_every = config.eval.every or (
        max(config.train.steps // 5, 1) if _has_validation_split(config) else 0)
  if eval_every < 0:
    raise ValueError(f"--eval_every must be >= 0; got {eval_every}.")
  config.eval.every = eval_every
  sweep.apply_overrides(config, overrides)
  return config


def available_baselines(dataset: str, *, config_flags: str = "") -> list[str]:
  """The untrained baselines (``sweep.BASELINE_LABELS``) that ``dataset``'s config offers."""
  available = []
  for baseline in sweep.BASELINE_LABELS:
    try:
      build_baseline_config(dataset, baseline, 0, config_flags=config_flags)
    except ValueError:
      continue
    available.append(baseline)
  return available


def build_baseline_config(dataset: str, baseline: str, seed: int, *, config_flags: str = "",
                          data_dir: str | None = None, overrides=()):
  """The config of an untrained baseline: the dataset's config with the flag ``baseline``.

  The loss only names the run (nothing is trained); ``--steps`` and ``--eval_every`` do not apply,
  ``--set`` does (the same images and evaluation as the losses' runs).
  """
  if baseline not in sweep.BASELINE_LABELS:
    raise ValueError(f"--baselines: unknown {baseline!r}; the baselines are "
                     f"{', '.join(sweep.BASELINE_LABELS)}.")
  arg = ",".join(["triplet_semihard", baseline]
                 + [f for f in config_flags.split(",") if f.strip()])
  config = sweep.load_config(dataset, arg)
  config.seed = seed
  if data_dir is not None:
    config.data_dir = data_dir
  sweep.apply_overrides(config, overrides)
  return config


def run_sweep(dataset: str, losses, seeds, output_dir: str, *, config_flags: str = "",
              steps=None, eval_every=None, data_dir=None, overrides=(), keep_checkpoints=False,
              train_fn=None, log=print, baselines=(), finished_only=False):
  """Trains (or reuses) every (loss, seed) run; returns ``{loss: [RunResult per seed]}``.

  ``baselines`` (names of ``sweep.BASELINE_LABELS``) are evaluated first, once per seed, as
  entries of the same dict. With ``finished_only``, nothing is trained: a (loss, seed) without a
  finished run in ``output_dir`` is left out, and so is a loss with none (a sweep that spans
  several invocations can be tabulated from what has finished, each row with its own seed count).
  """
  configs_by_run = {(b, seed): build_baseline_config(dataset, b, seed, config_flags=config_flags,
                                                     data_dir=data_dir, overrides=overrides)
                    for b in baselines for seed in seeds}
  configs_by_run.update({(loss, seed): build_config(dataset, loss, seed, config_flags=config_flags,
                                                    steps=steps, eval_every=eval_every,
                                                    data_dir=data_dir, overrides=overrides)
                         for loss in losses for seed in seeds})  # All built first: fail fast.
  results = {name: [] for name in (*baselines, *losses)}
  total = len(configs_by_run)
  for i, ((loss, seed), config) in enumerate(configs_by_run.items(), 1):
    workdir = os.path.join(output_dir, "runs", loss, f"seed{seed}")
    what = ("evaluated untrained" if loss in sweep.BASELINE_LABELS else
            f"{config.train.steps} steps of {config.classes_per_batch}x{config.samples_per_class}")
    log(f"[{i}/{total}] {loss} seed {seed}: {what} ... ", end="")
    if finished_only and sweep.read_metrics(workdir) is None:  # A finished one: reused below.
      log("not finished: left out")
      continue
    result = sweep.run_or_reuse(config, workdir, train_fn=train_fn,
                                keep_checkpoints=keep_checkpoints)
    verb = "evaluated" if loss in sweep.BASELINE_LABELS else "trained"
    how = "reused finished run" if result.reused else f"{verb} in {result.wall_s:.1f} s"
    log(f"{how}: " + " ".join(f"{name} {result.metrics[key]:.3f}"
                              for key, name in sweep.REPORTED_METRICS if key in result.metrics))
    results[loss].append(result)
  return {name: runs for name, runs in results.items() if runs}


def summarise(results):
  """``{loss: {metric: (mean, std)}}`` over seeds, and the same for the run wall time."""
  out = {}
  for loss, runs in results.items():
    # metrics.json also says which checkpoint it reports ("checkpoint": "best"): not a number.
    keys = sorted({k for r in runs for k, v in r.metrics.items() if isinstance(v, (int, float))})
    out[loss] = {k: sweep.mean_and_std([r.metrics[k] for r in runs if k in r.metrics])
                 for k in keys}
    out[loss]["wall_s"] = sweep.mean_and_std([r.wall_s for r in runs])
  return out


def write_tables(results, summary, output_dir: str, *, dataset: str, config, command: str,
                 chance: float | None, batches: dict[str, str], config_flags: str = "",
                 finished_only: bool = False) -> str:
  """Writes results.md, results.csv (one row per loss), runs.csv (one row per run).

  Returns:
    The markdown table of results.md.
  """
  metric_keys = [(k, n) for k, n in sweep.REPORTED_METRICS
                 if any(k in summary[loss] for loss in summary)]
  with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["loss", "seeds"] + [f"{k}_{s}" for k, _ in metric_keys
                                         for s in ("mean", "std")] + ["wall_s_mean"])
    for loss, runs in results.items():
      row = [loss, len(runs)]
      for key, _ in metric_keys:
        row += [f"{v:.6f}" for v in summary[loss].get(key, (float("nan"),) * 2)]
      writer.writerow(row + [f"{summary[loss]['wall_s'][0]:.1f}"])
  with open(os.path.join(output_dir, "runs.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["loss", "seed", "workdir"] + [k for k, _ in metric_keys] + ["wall_s"])
    for loss, runs in results.items():
      for run in runs:
        writer.writerow([loss, os.path.basename(run.workdir)[4:],
                         os.path.relpath(run.workdir, output_dir)]
                        + [f"{run.metrics.get(k, float('nan')):.6f}" for k, _ in metric_keys]
                        + [f"{run.wall_s:.1f}"])

  best = {key: max((summary[loss][key][0] for loss in summary if key in summary[loss]),
                   default=None) for key, _ in metric_keys}
  n_seeds = sorted({len(runs) for runs in results.values()})
  machine = sweep.machine_info()
  trained_on = sweep.describe_run_machines(run.workdir for runs in results.values()
                                           for run in runs)
  lines = [
      f"# Ranking losses compared on {dataset}",
      "",
      "Made by (from the repository root):",
      "",
      "```bash",
      command,
      "```",
      "",
      f"Runs trained on {trained_on}. This page was written on "
      f"{datetime.date.today().isoformat()}, {machine['cpu_count']} CPU cores "
      f"({machine['processor']}, {machine['platform']}), JAX {machine['jax_version']}, "
      f"{machine['device']}; each run's run_info.json holds its own machine, command and wall "
      "time.",
      "",
      *(["`--finished_only` trained nothing: the table is of the runs under `runs/` that had "
         "finished. The same command without it trains the missing (loss, seed) runs, resuming "
         "any that were interrupted, and then tabulates all.", ""] if finished_only else []),
      "Protocol: the same for every loss, only the loss (and, for the pair-based losses, the "
      "batch layout) changes. "
      f"Model `{config.model.name}`{_backbone_options(config)} "
      f"({config.model.embedding_dim}-d embedding), "
      f"{config.image_size} px images, {config.train.steps} steps of "
      f"{config.classes_per_batch} classes x {config.samples_per_class} images "
      "(the N-pair family uses K = 2; the batch of each loss is in the table), "
      f"{sweep.describe_optimization(config)}, "
      "each loss at its paper's hyper-parameters (rankjax/losses/catalogue.py). Test: retrieval on "
      "the "
      f"held-out classes (`{config.eval.split}` split), {config.eval.distance} similarity, each "
      "query's own image excluded."
      + (f" Every {config.eval.every} steps the validation split (classes held out of training) "
         f"is evaluated and its {config.eval.best_metric} chooses the checkpoint whose test "
         "metrics are reported." if config.eval.every else "")
      + ("" if config_flags else sweep.sweep_defaults_note(dataset)),
      "",
      *([f"Untrained rows ({', '.join(_label(b) for b in results if b in sweep.BASELINE_LABELS)}"
         "): the encoder's pooled features without a head or any training, with the same "
         "evaluation; what the metric learning adds is the difference.", ""]
        if any(b in sweep.BASELINE_LABELS for b in results) else []),
      ("Mean ± sample standard deviation (ddof = 1) over "
       + (f"{n_seeds[0]} seeds" if len(n_seeds) == 1 else "the seeds of each row (seeds column)")
       + "; a seed sets the model initialisation and the batch order; a row of one run shows "
       "its number alone; **bold** = best mean in the column." if n_seeds != [1] else
       "One run (one seed) per row: no spread over seeds yet, so differences between rows "
       "cannot be weighed against it; **bold** = best in the column.")
      + (f" Chance Recall@1 (random ranking) = {chance:.3f}." if chance is not None else ""),
      "",
  ]
  seeds_column = len(n_seeds) > 1  # Rows of different seed counts say theirs.
  table = ["| loss | batch P x K | " + ("seeds | " if seeds_column else "")
           + " | ".join(n for _, n in metric_keys) + " | time / run (s, incl. compiling) |",
           "|---|---|" + "---|" * (len(metric_keys) + seeds_column) + "---|"]
  for loss in results:
    cells = []
    for key, _ in metric_keys:
      if key not in summary[loss]:
        cells.append("n/a")
        continue
      mean, std = summary[loss][key]
      # One run has no spread to show: its number alone.
      cell = sweep.format_mean_std(mean, std) if len(results[loss]) > 1 else f"{mean:.3f}"
      cells.append(f"**{cell}**" if best[key] is not None and mean == best[key] else cell)
    wall = summary[loss]["wall_s"][0]
    batch = batches.get(loss, "?")
    seeds = f"{len(results[loss])} | " if seeds_column else ""
    table.append(f"| {_label(loss)} | {batch} | {seeds}" + " | ".join(cells)
                 + f" | {wall:.0f} |")
  total = sum(r.wall_s for runs in results.values() for r in runs)
  lines += table + [
      "",
      f"Training and evaluation time of the {sum(map(len, results.values()))} runs: "
      f"{total / 60:.1f} min in all (compilation included).",
      "",
      "![Recall@K per loss](recall_at_k.png)",
      "",
      "![Recall@1 and training loss against steps](training_curves.png)",
      "",
      "Per-run numbers: `runs.csv`; per-run configs, metrics and TensorBoard scalars: `runs/`.",
      "",
  ]
  with open(os.path.join(output_dir, "results.md"), "w") as f:
    f.write("\n".join(lines))
  return "\n".join(table)


def _label(name: str) -> str:
  """The display name of a loss or of an untrained baseline."""
  return sweep.LOSS_LABELS.get(name) or sweep.BASELINE_LABELS.get(name, name)


def _backbone_options(config) -> str:
  options = config.model.backbone_options.to_dict()
  return f" with {options}" if options else ""


def write_plots(results, summary, output_dir: str, *, dataset: str, config,
                chance: float | None) -> None:
  """recall_at_k.png and training_curves.png."""
  # Imported here so that --help and the sweep itself do not need matplotlib.
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  ks = sorted(int(m.split("@")[1]) for m in config.eval.metrics if m.startswith("recall@"))
  bars = {_label(loss): {k: summary[loss][f"recall@{k}"] for k in ks
                         if f"recall@{k}" in summary[loss]}
          for loss in results}
  n_seeds = {_label(loss): len(runs) for loss, runs in results.items()}
  protocol = (f"{dataset}: {config.train.steps} steps, model {config.model.name}, "
              f"{config.model.embedding_dim}-d; test classes unseen in training")
  fig = plotting.recall_at_k_bars(bars, title=f"Recall@K, mean ± std over seeds ({protocol})",
                                  n_seeds=n_seeds, chance=chance)
  plotting.save(fig, os.path.join(output_dir, "recall_at_k.png"))

  curves = {}
  for loss, runs in results.items():
    if loss in sweep.BASELINE_LABELS:  # Untrained: no curves.
      continue
    per_tag = {}
    for run in runs:
      for tag, series in sweep.read_scalars(run.workdir).items():
        per_tag.setdefault(tag, []).append(series)
    curves[sweep.LOSS_LABELS.get(loss, loss)] = per_tag
  fig = plotting.training_curves(curves, title=f"Training on {dataset} (mean ± std over seeds)")
  plotting.save(fig, os.path.join(output_dir, "training_curves.png"))


def test_labels(config):
  """The labels of the evaluation split, in order (for the chance level)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rankjax import data  # pylint: disable=g-import-not-at-top
  labels = []
  for batch in data.eval_batches(config.dataset, batch_size=config.eval.batch_size,
                                 image_size=config.image_size, split=config.eval.split,
                                 data_dir=config.data_dir):
    labels.append(np.asarray(batch["label"])[np.asarray(batch["mask"]).astype(bool)])
  return np.concatenate(labels)


def define_flags():
  """The command-line flags (defined only when run as a script: the module stays importable)."""
  flags.DEFINE_string("dataset", "digits",
                      "A config in experiments/configs/ (digits, omniglot, cub200, ...).")
  flags.DEFINE_list("losses", list(sweep.SURVEY_LOSSES),
                    "Losses to compare (comma-separated); the later baselines are "
                    f"{','.join(sweep.POST_SURVEY_LOSSES)}.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each loss is trained once per seed.")
  flags.DEFINE_string("output_dir", None, "Where runs/ and the results go (default "
                      "experiments/results/<dataset>).")
  flags.DEFINE_integer("steps", None, "Training steps per run (default: sweep.SWEEP_DEFAULTS for "
                       "the dataset, else the config's).")
  flags.DEFINE_integer("eval_every", None, "Evaluate on the validation classes every this many "
                       "steps (they choose each run's checkpoint), for the Recall@1 curve "
                       "(default: the config's config.eval.every, else 5 points per run where the "
                       "dataset has a validation split, else 0).")
  flags.DEFINE_list("baselines", None, "Untrained networks evaluated as rows of the same table "
                    f"({', '.join(sweep.BASELINE_LABELS)}); default: those the dataset's config "
                    "offers (the CPU photo recipe's); '' for none.")
  flags.DEFINE_bool("finished_only", False, "Train nothing: write the tables and plots from the "
                    "runs already finished in OUTPUT_DIR; a (loss, seed) without one is left "
                    "out, so each row has its own number of seeds.")
  sweep.define_common_flags(
      "Keep each finished run's checkpoints (needed for rankjax.load_embedder on it); by default "
      "only metrics, config and TensorBoard scalars stay.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.train_logs:
    logging.set_verbosity(logging.ERROR)  # Orbax and TF warnings too: one line per run instead.
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers; got {FLAGS.seeds}.") from e
  if not FLAGS.losses or not seeds:
    raise app.UsageError("--losses and --seeds must each name at least one.")
  unknown = [name for name in FLAGS.losses if name not in ALL_LOSSES]
  if unknown:
    raise app.UsageError(f"--losses: unknown {unknown}; the losses are {', '.join(ALL_LOSSES)}.")
  output_dir = FLAGS.output_dir or os.path.join(sweep.RESULTS_DIR, FLAGS.dataset)
  os.makedirs(output_dir, exist_ok=True)
  sweep.enable_compilation_cache(FLAGS.compilation_cache)
  print(f"Comparing {len(FLAGS.losses)} losses x {len(seeds)} seeds on {FLAGS.dataset}; "
        f"runs and results in {output_dir}", flush=True)
  baselines = FLAGS.baselines
  if baselines is None:
    baselines = available_baselines(FLAGS.dataset, config_flags=FLAGS.config_flags)
  results = run_sweep(
      FLAGS.dataset, FLAGS.losses, seeds, output_dir, config_flags=FLAGS.config_flags,
      steps=FLAGS.steps, eval_every=FLAGS.eval_every, data_dir=FLAGS.data_dir,
      overrides=FLAGS.set, keep_checkpoints=FLAGS.keep_checkpoints,
      log=lambda *a, **k: print(*a, **k, flush=True), baselines=baselines,
      finished_only=FLAGS.finished_only)
  if not results:
    raise app.UsageError(f"No finished run of {FLAGS.losses} x seeds {seeds} in {output_dir}.")
  summary = summarise(results)
  config = build_config(FLAGS.dataset, FLAGS.losses[0], seeds[0],
                        config_flags=FLAGS.config_flags, steps=FLAGS.steps,
                        eval_every=FLAGS.eval_every, data_dir=FLAGS.data_dir,
                        overrides=FLAGS.set)
  chance = sweep.chance_recall_at_1(test_labels(config))
  command = sweep.command_line()
  batches = {}
  for loss in FLAGS.losses:
    c = build_config(FLAGS.dataset, loss, seeds[0], config_flags=FLAGS.config_flags,
                     steps=FLAGS.steps, eval_every=FLAGS.eval_every, overrides=FLAGS.set)
    batches[loss] = f"{c.classes_per_batch} x {c.samples_per_class}"
  batches.update({b: "untrained" for b in baselines})
  table = write_tables(results, summary, output_dir, dataset=FLAGS.dataset, config=config,
                       command=command, chance=chance, batches=batches,
                       config_flags=FLAGS.config_flags, finished_only=FLAGS.finished_only)
  write_plots(results, summary, output_dir, dataset=FLAGS.dataset, config=config,
              chance=chance)
  print(table, flush=True)
  print(f"Wrote results.md, results.csv, runs.csv, recall_at_k.png, training_curves.png in "
        f"{output_dir}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
