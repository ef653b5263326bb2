"""``load_embedder(workdir)``: a trained run as a function from raw images to embeddings.

Example (after ``python -m rankjax.main --config=experiments/configs/digits.py --workdir=DIR``)::

  import rankjax
  embed = rankjax.load_embedder(DIR)
  embeddings = embed(images)   # uint8 images shaped like the dataset's -> f32[B, E]
"""

from __future__ import annotations

import json
import os
import types
from typing import Callable

import jax
import ml_collections
import numpy as np

from rankjax import build
from rankjax import checkpoint
from rankjax import configs
from rankjax import resume
from rankjax.evaluation import embed as eval_embed
from rankjax import train_state


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was trained with (``workdir/config.json``)."""
  path = os.path.join(workdir, resume.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the --workdir of a run?")
  with open(path) as f:
    config = configs.base_config()
    config.update(ml_collections.ConfigDict(json.load(f)))
  return config


def load_embedder(workdir: str, *, which: str = "latest",
                  batch_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """Returns ``embed(images) -> f32[B, E]`` for the model trained in ``workdir``.

  Args:
    workdir: the ``--workdir`` of a training run.
    which: ``"latest"`` (the final model when training finished) or ``"best"`` (the checkpoint
      with the best ``config.eval.best_metric`` on the validation split).
    batch_size: images per forward pass (default: the run's ``config.eval.batch_size``); any
      number of images can be passed, they are embedded in chunks of this size.

  The returned function takes ``uint8[B, H, W, C]`` images as the dataset stores them (any
  ``H, W``: they are resized and centre-cropped exactly as the evaluation does, with
  :func:`rankjax.data.preprocess_for_eval`) and returns numpy ``float32[B, E]`` embeddings,
  computed in eval mode (BatchNorm running averages) on the default device, with the run's
  test-time shifts (``config.eval.test_time_shift``): the embeddings its metrics were computed on.

  **What loading a workdir reads**: ``config.json`` and ``model.json`` (JSON, never executed)
  and the ``model`` item of one checkpoint, nothing else. The model is rebuilt from the config
  and the input channels that ``model.json`` records; no dataset is opened, no ``data_dir`` or
  image folder the config names is listed or written, and no pretrained weights file it names is
  read (the checkpoint holds the trained weights). A checkpoint that does not restore is a
  :class:`rankjax.checkpoint.CorruptCheckpointError` naming its directory. The checkpoint files
  are read by orbax/tensorstore: treat a workdir from elsewhere as you would any data file.
  """
  from rankjax import data  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  config.model.pretrained = None  # The checkpoint replaces whatever weights the config names.
  spec = types.SimpleNamespace(num_channels=_recorded_channels(workdir, config))
  model = build.build_model(config, spec)
  _, eval_graphdef, params, model_state = train_state.split_model(model)
  variables, _ = checkpoint.restore_model(
      workdir, {"params": params, "model_state": model_state}, which=which)
  embed_fn = eval_embed.make_eval_embed_fn(eval_graphdef, config)
  chunk = batch_size or config.eval.batch_size

  def embed(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # [B, H, W] grayscale: add the channel axis.
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f"images must have shape [batch, height, width, channels]; got "
                       f"{images.shape}.")
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 pixels, as the dataset stores them; got "
                       f"{images.dtype}.")
    out = []
    for start in range(0, len(images), chunk):
      pixels = data.preprocess_for_eval(images[start:start + chunk], name=config.dataset,
                                        image_size=config.image_size,
                                        num_channels=spec.num_channels)
      out.append(np.asarray(jax.device_get(embed_fn(variables, pixels))))
    return np.concatenate(out) if out else np.zeros((0, model.head.embedding_dim), np.float32)

  return embed


def _recorded_channels(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The model's input channels: from ``workdir/model.json``, else the dataset's fixed spec."""
  from rankjax.data import datasets  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, resume.MODEL_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return int(json.load(f)["num_channels"])
  channels = datasets.get_spec(config.dataset).num_channels
  if channels is None:
    raise FileNotFoundError(
        f"{path} does not exist, and {config.dataset!r} takes its channels from its images: "
        "the embedder does not open the dataset to find them. Is the run's record complete?")
  return channels
