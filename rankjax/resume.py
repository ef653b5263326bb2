r"""What resuming a working directory checks: the same experiment, continued, never two mixed.

A run writes its config to ``WORKDIR/config.json`` once it has restored (or found no) checkpoint.
Running again on that directory resumes it, and :func:`check_config` first compares the new
config with that file: any difference is an error that lists the differing fields, before anything
in the directory changes (a resumed run must not silently mix two learning rates, losses, seeds
or models, and a model of another shape must not fail deep inside the checkpoint library).

The opt-in ``--config.train.allow_config_changes=True`` lets the fields of
:data:`SAFE_TO_CHANGE` differ: what only decides how often the run logs, checkpoints and
evaluates, where the data is read from, and ``train.steps`` made *larger* (to train a finished
run on; a schedule over the steps, such as cosine, then continues on the new length from the
resumed step). Every other difference stays an error. :func:`check_restored_step` refuses a
checkpoint already past ``config.train.steps``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from rankjax import run_log

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
OPT_IN = "train.allow_config_changes"
SAFE_TO_CHANGE = ("train.steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "eval.every", "data_dir", "distributed", OPT_IN)


class ConfigChangedError(ValueError):
  """A working directory resumed with a config other than the one its run started with."""


def config_differences(before: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """``{field: (before, now)}`` for each field (dotted) where ``config`` differs from ``before``
  (a ``config.json`` as loaded)."""
  before = _flatten(before)
  now = _flatten(json.loads(config.to_json_best_effort()))
  return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys())
          if before.get(k) != now.get(k)}


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigChangedError` if ``workdir`` was started with another config.

  No ``workdir/config.json`` (a new run) passes. With ``config.train.allow_config_changes`` the
  fields of :data:`SAFE_TO_CHANGE` may differ (``train.steps`` only upwards).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    changed = config_differences(json.load(f), config)
  changed.pop(OPT_IN, None)
  allowed = config.train.get("allow_config_changes", False)
  refused = {k: v for k, v in changed.items() if not (allowed and _may_change(k, *v))}
  if refused:
    listed = "; ".join(f"{k}: {b!r} -> {n!r}" for k, (b, n) in refused.items())
    hint = (f"Only {', '.join(SAFE_TO_CHANGE[:-1])} may change (train.steps only upwards), "
            f"with --config.{OPT_IN}=True" if not allowed else
            f"--config.{OPT_IN}=True allows only {', '.join(SAFE_TO_CHANGE[:-1])} "
            "(train.steps only upwards)")
    raise ConfigChangedError(
        f"{workdir} holds a run started with another config ({path}); resuming it with this one "
        f"would mix the two. Differing fields: {listed}. Resume with the same config, or use a "
        f"new --workdir. {hint}.")


def _may_change(field: str, before: Any, now: Any) -> bool:
  if field == "train.steps":
    return isinstance(before, int) and isinstance(now, int) and now >= before
  return field in SAFE_TO_CHANGE


def check_restored_step(step: int, total_steps: int, workdir: str) -> None:
  """Raises ``ValueError`` if the checkpoint restored from ``workdir`` is past ``total_steps``."""
  if step > total_steps:
    raise ValueError(
        f"The checkpoint in {workdir} is at step {step}, past config.train.steps={total_steps}: "
        "a run cannot be shortened after the fact. Use a new --workdir for a shorter run.")


def write_config(workdir: str, config: ml_collections.ConfigDict, *, num_channels: int) -> None:
  """Writes the run's record, atomically, once the run has restored what was there:
  ``config.json`` and ``model.json`` (``{"num_channels": C}``, the model's input channels: with
  the config and the checkpoint, all that :func:`rankjax.load_embedder` reads)."""
  run_log.write_json_atomically(os.path.join(workdir, CONFIG_FILE),
                                json.loads(config.to_json_best_effort()))
  run_log.write_json_atomically(os.path.join(workdir, MODEL_FILE),
                                {"num_channels": int(num_channels)})


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
