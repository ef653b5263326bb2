r"""Shared machinery of the experiment sweeps (compare_losses.py, stability.py).

A sweep is a list of training runs, one working directory each, all trained with
:func:`rankjax.train.train_and_evaluate`. This module builds their configs from
``experiments/configs/<dataset>.py``, runs them resumably (a run whose ``metrics.json`` exists is
not trained again, and one that stopped half-way resumes from its last checkpoint), reads the
TensorBoard scalars that training wrote, and reduces metrics over seeds.

A finished run is only reused when it was trained with the same config: reusing a 300-step result
for a 1500-step sweep would silently mix protocols, so a mismatch is an error that names the
fields that differ.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import glob
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from rankjax import losses

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "experiments", "configs")
RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")

METRICS_FILE = "metrics.json"  # Written by rankjax.train when a run has finished.
CONFIG_FILE = "config.json"  # Written by rankjax.train when a run starts.
RUN_INFO_FILE = "run_info.json"  # Written here: wall time and how the run was made.

# Fields that do not change what a run computes, ignored when deciding whether to reuse a run.
_IGNORED_CONFIG_FIELDS = ("data_dir",)

# Config sections that hold free keyword arguments (rankjax.models.get_model checks them).
_OPEN_SECTIONS = ("model.backbone_options",)

# What the sweeps change in a dataset's config (before --steps and --set). The embedded default,
# digits with all losses x 3 seeds, must finish in 5 minutes on 2 CPU cores: 27 runs, so each gets
# a narrower small ResNet (16-64 channels instead of 32-256) and 150 steps. 8 x 8 digits are a
# smoke-scale benchmark. The Omniglot sweep (27 runs on 2 CPU cores) trains the plain
# reference recipe: the config's conv4 for 1,500 steps at a constant learning rate, without the
# rotated classes (3-6 minutes a run instead of the full recipe's 10).
SWEEP_DEFAULTS = {
    "digits": {"train.steps": 150, "model.backbone_options.widths": (16, 32, 32, 64)},
    "omniglot": {"train.steps": 1500, "rotate_classes": False, "optimizer.schedule": "constant"},
}

# The metrics of rankjax.evaluation reported by the sweeps, with their display names.
REPORTED_METRICS = (
    ("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
    ("map@r", "MAP@R"), ("r_precision", "R-Prec."), ("nmi", "NMI"),
)

# Short display names of the losses for tables and plot legends, in the catalogue's order.
LOSS_LABELS = {name: spec.label for name, spec in losses.CATALOGUE.items()}
# The survey's nine ranking losses (every pair-based loss it covers, up to angular and
# multi-similarity): what the sweeps run unless --losses names others.
SURVEY_LOSSES = losses.loss_names("survey")
# The later baselines, on the same P x K batches as the survey's losses.
POST_SURVEY_LOSSES = losses.loss_names("later")
# The untrained networks that the tables show beside the losses (config flags of the CPU photo
# recipe, rankjax.recipes.CPU_PHOTO_BASELINES), with their display names.
BASELINE_LABELS = {
    "imagenet_features": "ImageNet features, untrained",
    "random_init": "random initialisation, untrained",
}


def define_common_flags(keep_checkpoints_help: str) -> None:
  """The absl flags that compare_losses.py and stability.py share (call from their define_flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data_dir", None, "The TFDS data directory (config.data_dir).")
  flags.DEFINE_string("config_flags", "",
                      "Extra config argument flags, e.g. 'runlocal' (tiny runs).")
  flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE for every run, e.g. "
                            "--set=optimizer.learning_rate=0.0003.")
  flags.DEFINE_bool("keep_checkpoints", False, keep_checkpoints_help)
  flags.DEFINE_string(
      "compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "rankjax", "xla"),
      "Persistent XLA compilation cache (the seeds of a loss then compile once); '' disables it.")
  flags.DEFINE_bool("train_logs", False, "Show each run's own progress lines (absl INFO logs).")


def describe_optimization(config, learning_rate: str | None = None) -> str:
  """E.g. ``"adam at learning rate 0.001 (constant schedule)"``; ``learning_rate`` replaces
  the number (e.g. "the grid's learning rates")."""
  opt = config.optimizer
  rate = learning_rate or f"learning rate {opt.learning_rate:g}"
  text = f"{opt.name} at {rate} ({opt.schedule} schedule"
  text += f", {opt.warmup_steps} warm-up steps)" if opt.warmup_steps else ")"
  if config.get("rotate_classes"):
    text += ", classes rotated by multiples of 90 degrees as new classes"
  return text


def sweep_defaults_note(dataset: str) -> str:
  """The sentence that says what SWEEP_DEFAULTS changes in ``dataset``'s config ("" if nothing)."""
  changes = SWEEP_DEFAULTS.get(dataset)
  if not changes:
    return ""
  fields = ", ".join(f"`{key} = {value!r}`" for key, value in changes.items())
  return (f" Changed from experiments/configs/{dataset}.py for the sweeps "
          f"(experiments/sweep.py, SWEEP_DEFAULTS): {fields}.")


def available_datasets() -> list[str]:
  """The datasets that have a config file in experiments/configs/."""
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not os.path.basename(p).startswith("_"))


def load_config(dataset: str, arg: str | None = None):
  """``get_config(arg)`` of ``experiments/configs/<dataset>.py``.

  Raises:
    ValueError: naming ``dataset`` when there is no such config file.
  """
  path = os.path.join(CONFIG_DIR, f"{dataset}.py")
  if not os.path.exists(path):
    raise ValueError(f"dataset={dataset!r} has no config file {path}; the datasets are "
                     f"{', '.join(available_datasets())}.")
  spec = importlib.util.spec_from_file_location(f"_rankjax_config_{dataset}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_override(text: str) -> tuple[str, Any]:
  """``"optimizer.learning_rate=0.01"`` -> ``("optimizer.learning_rate", 0.01)``.

  The value is read as a Python literal when it is one (numbers, tuples, True/None), else kept
  as a string.
  """
  if "=" not in text:
    raise ValueError(f"--set {text!r}: expected FIELD=VALUE, e.g. optimizer.learning_rate=0.01.")
  key, value = text.split("=", 1)
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  return key.strip(), value


def apply_overrides(config, overrides: Iterable[str | tuple[str, Any]]):
  """Sets ``config.<field> = value`` for each override; an unknown field is a ``ValueError``."""
  for item in overrides:
    key, value = parse_override(item) if isinstance(item, str) else item
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"Unknown config field {key!r} (no section {part!r}).")
      node = node[part]
    if leaf not in node and ".".join(parents) in _OPEN_SECTIONS:
      node[leaf] = value
      continue
    if leaf not in node:
      raise ValueError(f"Unknown config field {key!r}; fields of this section: "
                       f"{', '.join(sorted(node.keys()))}.")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return config


def config_as_dict(config) -> dict:
  """The config as rankjax.train writes it to ``config.json``, minus fields that do not matter."""
  out = json.loads(config.to_json_best_effort(sort_keys=True))
  for field in _IGNORED_CONFIG_FIELDS:
    out.pop(field, None)
  return out


_MISSING = object()


def _differences(a: Any, b: Any, prefix: str = "", defaults: Any = _MISSING) -> list[str]:
  """Where config ``a`` (requested) and ``b`` (stored) differ.

  A field missing from ``b`` is no difference when ``a`` holds its default (from ``defaults``,
  the same tree for :func:`rankjax.configs.base_config`): the field was added to the library
  after the run was made, and its default is what the run did.
  """
  if b is _MISSING and defaults is not _MISSING and a == defaults:
    return []
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      sub_defaults = defaults.get(key, _MISSING) if isinstance(defaults, dict) else _MISSING
      out += _differences(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.",
                          sub_defaults)
    return out
  if a == b:
    return []
  show = lambda v: "(absent)" if v is _MISSING else repr(v)
  return [f"{prefix[:-1]}: {show(b)} in the run, {show(a)} requested"]


@dataclasses.dataclass
class RunResult:
  """What a sweep keeps of one run."""
  workdir: str
  metrics: dict[str, float]
  reused: bool  # True when an earlier, finished run was read instead of training.
  wall_s: float  # Training + evaluation time of the run when it was made (seconds).


def read_metrics(workdir: str) -> dict[str, float] | None:
  """``workdir/metrics.json`` of a finished run, or ``None`` when the run has not finished."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_same_config(config, workdir: str) -> None:
  """Raises ``ValueError`` when ``workdir`` holds a run made with another config."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    existing = json.load(f)
  for field in _IGNORED_CONFIG_FIELDS:
    existing.pop(field, None)
  from rankjax import configs  # pylint: disable=g-import-not-at-top
  diffs = _differences(config_as_dict(config), existing,
                       defaults=config_as_dict(configs.base_config()))
  if diffs:
    raise ValueError(
        f"{workdir} holds a run made with another config ({'; '.join(diffs[:5])}"
        f"{'; ...' if len(diffs) > 5 else ''}). Use another --output_dir, or delete that run "
        f"directory to train it again.")


def run_or_reuse(config, workdir: str, *, train_fn: Callable | None = None,
                 keep_checkpoints: bool = True) -> RunResult:
  """Trains ``config`` in ``workdir`` unless a finished run with the same config is there.

  Args:
    config: the run's ``ml_collections.ConfigDict``.
    workdir: its directory; a half-finished run there resumes from its last checkpoint.
    train_fn: ``train_fn(config, workdir) -> metrics`` (default
      :func:`rankjax.train.train_and_evaluate`).
    keep_checkpoints: when False, a finished run's ``checkpoints/`` and ``best/`` directories are
      deleted (the metrics, config and TensorBoard scalars stay); ``load_embedder`` then no
      longer works on it.
  """
  check_same_config(config, workdir)
  metrics = read_metrics(workdir)
  if metrics is not None:
    info = read_json(os.path.join(workdir, RUN_INFO_FILE)) or {}
    return RunResult(workdir, metrics, reused=True, wall_s=float(info.get("wall_s", np.nan)))
  if train_fn is None:
    from rankjax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  start = time.perf_counter()
  metrics = train_fn(config, workdir)
  wall_s = time.perf_counter() - start
  write_json(os.path.join(workdir, RUN_INFO_FILE),
             {"wall_s": wall_s, "command": command_line(), **machine_info()})
  if not keep_checkpoints:
    for sub in ("checkpoints", "best"):
      shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
  return RunResult(workdir, {k: float(v) for k, v in metrics.items()}, reused=False,
                   wall_s=wall_s)


def read_json(path: str) -> Any:
  """The JSON in ``path``, or ``None`` when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def dataset_info(config):
  """The :class:`rankjax.data.DatasetInfo` of the data ``config`` trains on, split as it splits.

  The dataset, data directory and protocol are the config's (a config flag such as ``offline``
  can change all three), so the counts are those the trainer sees.
  """
  from rankjax import data  # pylint: disable=g-import-not-at-top
  return data.get_dataset_info(config.dataset, data_dir=config.data_dir,
                               protocol=data.Protocol.from_config(config.protocol))


def embed_eval_split(workdir: str, *, which: str = "latest") -> tuple[np.ndarray, np.ndarray]:
  """``(f32[N, E], int32[N])``: a run's embeddings of its evaluation split, in order.

  Exactly what its evaluation saw: the same model, preprocessing and device mesh as
  :func:`rankjax.train.train_and_evaluate` (its importable building blocks).

  Args:
    workdir: the run's directory (its ``config.json`` and checkpoints).
    which: ``"latest"`` (the final model), ``"best"``, or ``"init"``: the untrained network the
      run started from (its seed's initialisation; no checkpoint needed).
  """
  # pylint: disable-next=g-import-not-at-top
  from rankjax import checkpoint, embedder, parallel, train, train_state
  from rankjax.evaluation import embed as eval_embed
  config = embedder.load_config(workdir)
  info = dataset_info(config)
  _, eval_graphdef, params, model_state = train_state.split_model(train.build_model(config, info))
  variables = {"params": params, "model_state": model_state}
  if which != "init":
    variables, _ = checkpoint.restore_model(workdir, variables, which=which)
  mesh = parallel.make_mesh()
  embed = eval_embed.make_eval_embed_fn(eval_graphdef, config, mesh)
  return eval_embed.embed_split(embed, variables, mesh, config)


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every TensorBoard scalar of a run: ``{tag: (steps int[T], values f64[T])}``, by step.

  rankjax.train writes them with ``tf.summary.scalar`` under ``workdir/tensorboard`` (tags such as
  ``train/loss`` and ``val/recall@1``). A run resumed after a kill may log a step twice; the
  last value written wins.
  """
  # Imported here: only the sweeps' reporting needs TensorBoard's reader.
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top

  logdir = os.path.join(workdir, "tensorboard")
  values: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in tags.get("tensors", []):
      for event in acc.Tensors(tag):
        values.setdefault(tag, {})[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
    for tag in tags.get("scalars", []):
      for event in acc.Scalars(tag):
        values.setdefault(tag, {})[event.step] = float(event.value)
  return {tag: (np.array(sorted(v), dtype=np.int64), np.array([v[s] for s in sorted(v)]))
          for tag, v in values.items()}


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite ``values``."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    return float("nan"), float("nan")
  return float(np.mean(x)), float(np.std(x, ddof=1)) if x.size > 1 else 0.0


def chance_recall_at_1(labels: np.ndarray) -> float:
  r"""Expected Recall@1 of a random ranking, each query its own gallery minus itself.

  :math:`\frac{1}{N} \sum_q \frac{n_{y_q} - 1}{N - 1}`, with :math:`n_c` the size of class c.
  """
  labels = np.asarray(labels)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  return float(np.mean((counts[inverse] - 1) / max(len(labels) - 1, 1)))


def command_line() -> str:
  """The command that is running, as a user would type it again from the repository root.

  Arguments are shell-quoted, so a value with spaces (``--sweeps="a b=DIR"``) pastes back whole.
  """
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py"):
    argv[0] = os.path.relpath(os.path.abspath(argv[0]), REPO_ROOT)
    argv.insert(0, "python")
  return shlex.join(argv)


def cpu_description(cpuinfo: str | None = None) -> str:
  """``"x86_64, AMD EPYC, AVX-512"``: architecture, CPU model and widest vector extension.

  The vector width is named because XLA compiles for the CPU it runs on: the same run can round
  differently, and so end on slightly different numbers, on a CPU with other extensions.
  ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when ``None``; absent off Linux).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  parts = [platform.processor() or platform.machine()]
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  if fields.get("model name"):
    parts.append(fields["model name"])
  flags_ = set(fields.get("flags", "").split())
  for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
    if flag in flags_:
      parts.append(name)
      break
  return ", ".join(parts)


def machine_info() -> dict[str, Any]:
  """Where a result was measured: CPU count, platform, JAX version and device."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "processor": cpu_description(),
      "jax_version": jax.__version__,
      "device": f"{device.platform}: {device.device_kind} x {jax.device_count()}",
  }


def describe_run_machines(workdirs: Iterable[str]) -> str:
  """Where the runs in ``workdirs`` were trained, from each run's ``run_info.json``.

  A sweep resumes across days and machines, so the machine that writes a results page need not be
  the one that trained its runs. Returns e.g. ``"2 CPU cores (x86_64, AMD EPYC, AVX-512), cpu: cpu
  x 1: 20 runs; 2 CPU cores (x86_64), cpu: cpu x 1: 30 runs"``, most runs first (older runs
  recorded the architecture only); runs without the file (a diverged run) count as not recorded.
  """
  def where(workdir: str) -> str:
    info = read_json(os.path.join(workdir, RUN_INFO_FILE)) or {}
    if "processor" not in info:
      return "machine not recorded"
    device = f", {info['device']}" if info.get("device") else ""
    return f"{info.get('cpu_count', '?')} CPU cores ({info['processor']}){device}"

  counts = collections.Counter(map(where, workdirs))
  return "; ".join(f"{machine}: {n} run{'' if n == 1 else 's'}"
                   for machine, n in counts.most_common())


def enable_compilation_cache(path: str | None) -> None:
  """Keeps XLA compilations on disk, so the seeds of one loss compile its train step once."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
  if not np.isfinite(mean):
    return "n/a"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"
