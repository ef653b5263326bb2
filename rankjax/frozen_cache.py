r"""A frozen-trunk activation cache: the frozen prefix of an encoder computed once per sweep.

When a pretrained encoder's stem and first ``n`` blocks keep their weights and their BatchNorm
statistics (``backbone_options={"frozen_blocks": n}``), their output depends only on the image and
its augmentation: it is the same in every run, loss and seed of a sweep. This module computes it
once, stores it on disk, and feeds training and evaluation from it, so that a step runs only the
part of the network that learns (:meth:`rankjax.models.EmbeddingModel.embed_from_frozen`).

What is stored, for a dataset split by its protocol:

* **train**: ``V`` views of every training image, ``[N_train, V, h, w, c]``. View ``v`` of the
  image at pooled position ``p`` is the training preprocessing (random resized crop and flip,
  :mod:`rankjax.data.preprocessing`) keyed by ``(cache seed, p * V + v)``: the views depend on
  the cache's own seed, not on a run's, so every run of a sweep shares them. Without
  augmentation there is one view, the evaluation preprocessing (``V`` must be 1).
* **val**, **test**: the single evaluation view of each image, ``[N, h, w, c]``.

A training batch is the P x K batch of :func:`rankjax.data.train_batches` (the same classes and
images for the same run seed), each image in one of its ``V`` views, drawn from the run's seed,
step and slot in the global batch (:func:`view_choice`): a resumed run gets the same batches, and
the same global batch on any number of hosts.

Storage: ``<dir>/<name>/`` with ``key.json`` (everything that determines the activations: the
dataset, its protocol and the images of each split, the image size and preprocessing, the
augmentation, ``V`` and the cache seed, the encoder's frozen prefix -- model, ``n``, a SHA-256
of its weights and statistics, its compute dtype -- and the storage dtype), one raw array file a
split (``<split>.bin``, read as a memory map, so a set larger than memory streams from disk) and
the pooled positions of its rows. A directory is written under a temporary name and renamed when
complete, so a killed build leaves nothing that is reused; a cache whose ``key.json`` differs in
any field is never reused. The storage dtype is ``float16`` by default (10 mantissa bits; the
prefix's activations lie well inside its range); ``float32`` stores the activations exactly and
``bfloat16`` is also accepted.

Exactness: with ``V = 1``, no augmentation and ``float32`` storage, a cached training step sees
the activations the uncached step computes from the same images (its loss and gradients agree to
float rounding), and evaluation from the cache equals evaluation from the images
(``tests/test_frozen_cache.py``).

Config (:func:`rankjax.configs.base_config`): ``config.frozen_cache.enabled``, ``.views``,
``.seed``, ``.dtype``, ``.dir`` (default ``<data_dir>/rankjax_frozen_cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import tensorflow as tf

from rankjax import parallel
from rankjax import seeding

FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
SPLITS = ("train", "val", "test")
KEY_FILE = "key.json"
DEFAULT_SUBDIR = "rankjax_frozen_cache"
_BUILD_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Settings:
  """The cache's own settings (``config.frozen_cache``)."""
  views: int = 8
  seed: int = 0
  dtype: str = "float16"
  dir: str | None = None

  def __post_init__(self):
    if (isinstance(self.views, bool) or not isinstance(self.views, (int, np.integer))
        or self.views < 1):
      raise ValueError(f"config.frozen_cache.views must be a positive integer (augmented views "
                       f"of each training image); got {self.views!r}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"config.frozen_cache.dtype must be one of {', '.join(DTYPES)}; got "
                       f"{self.dtype!r}.")

  @classmethod
  def from_config(cls, config) -> Settings:
    c = config.frozen_cache
    return cls(views=c.views, seed=c.seed, dtype=c.dtype, dir=c.dir)


class Cache:
  """An opened cache: memory-mapped arrays of each split and the pooled positions of their rows.

  Attributes:
    directory: where it lives.
    key: its ``key.json``.
    arrays: ``{"train": [N, V, h, w, c], "val": [N, h, w, c], "test": [N, h, w, c]}`` memory
      maps in the storage dtype.
    positions: ``{split: int64[N]}``, the pooled position of each row (sorted).
  """

  def __init__(self, directory: str):
    self.directory = directory
    with open(os.path.join(directory, KEY_FILE)) as f:
      self.key = json.load(f)
    self.arrays, self.positions = {}, {}
    dtype = jnp.dtype(self.key["storage_dtype"])
    for split, shape in self.key["shapes"].items():
      self.positions[split] = np.load(os.path.join(directory, f"{split}_positions.npy"))
      self.arrays[split] = (np.memmap(os.path.join(directory, f"{split}.bin"), dtype=dtype,
                                      mode="r", shape=tuple(shape))
                            if math.prod(shape) else np.zeros(shape, dtype))

  @property
  def views(self) -> int:
    return int(self.key["views"])

  @property
  def activation_shape(self) -> tuple[int, ...]:
    """``(h, w, c)`` of one view."""
    return tuple(self.key["shapes"]["test"][1:])

  def size_bytes(self) -> int:
    return sum(os.path.getsize(os.path.join(self.directory, name))
               for name in os.listdir(self.directory))

  def rows(self, split: str, positions: np.ndarray) -> np.ndarray:
    """The rows of ``split`` that hold the images at pooled ``positions``."""
    have = self.positions[split]
    rows = np.searchsorted(have, positions)
    if np.any(rows >= have.size) or np.any(have[np.minimum(rows, have.size - 1)] != positions):
      raise RuntimeError(f"The frozen cache {self.directory} has no {split} rows for some images "
                         "of this run (a cache built for another protocol or data).")
    return rows


def cache_key(config, model, source, augment) -> dict[str, Any]:
  """Everything that determines the cached activations, as JSON-able values."""
  settings = Settings.from_config(config)
  spec = source.spec
  splits = {}
  for split in SPLITS:
    positions = source.positions(split)
    splits[split] = {"images": int(positions.size),
                     "sha256": _sha256(positions.astype(np.int64).tobytes(),
                                       source.raw_labels[positions].astype(np.int64).tobytes())}
  key = {
      "format": FORMAT_VERSION,
      "dataset": config.dataset,
      "source": spec.tfds_name or spec.name,
      "root": getattr(source, "root", None),
      "classes": None if source.class_names is None else _sha256(
          "\n".join(source.class_names).encode()),
      "splits": splits,
      "image_size": int(config.image_size),
      "num_channels": int(spec.num_channels),
      "crop_fraction": float(spec.crop_fraction),
      "resize_method": spec.resize_method,
      "augment": None if augment is None else dataclasses.asdict(augment),
      "views": int(settings.views) if augment is not None else 1,
      "cache_seed": int(settings.seed),
      "model": model.model_name,
      "frozen_blocks": int(model.frozen_blocks),
      "prefix_sha256": prefix_fingerprint(model),
      "compute_dtype": str(jnp.dtype(config.model.dtype)),
      "storage_dtype": settings.dtype,
  }
  return json.loads(json.dumps(key))  # As it reads back from key.json (tuples as lists).


def prefix_fingerprint(model) -> str:
  """SHA-256 of what the frozen prefix computes with: its weights, statistics, input transform."""
  backbone = model.backbone
  digest = hashlib.sha256()
  digest.update(repr(getattr(backbone, "input_transform", None)).encode())
  for name, module in backbone.frozen_modules():
    flat = nnx.to_flat_state(nnx.state(module))
    for path, variable in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
      value = np.asarray(variable.get_value())
      digest.update(f"{name}/{'/'.join(map(str, path))}:{value.dtype}:{value.shape}".encode())
      digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def _sha256(*parts: bytes) -> str:
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part)
  return digest.hexdigest()


def cache_root(config) -> str:
  """``config.frozen_cache.dir``, else ``<config.data_dir>/rankjax_frozen_cache``."""
  if config.frozen_cache.dir:
    return os.path.expanduser(config.frozen_cache.dir)
  if not config.data_dir:
    raise ValueError("config.frozen_cache needs a directory: set config.data_dir (the cache goes "
                     f"under DATA_DIR/{DEFAULT_SUBDIR}) or config.frozen_cache.dir.")
  return os.path.join(os.path.expanduser(config.data_dir), DEFAULT_SUBDIR)


def _directory_name(key: dict) -> str:
  label = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key["dataset"])[-40:]
  digest = _sha256(json.dumps(key, sort_keys=True).encode())[:16]
  return (f"{label}-{key['image_size']}px-n{key['frozen_blocks']}-v{key['views']}-"
          f"{key['storage_dtype']}-{digest}")


def open_or_build(config, model, *, mesh: jax.sharding.Mesh | None = None) -> Cache:
  """The cache of ``config``'s dataset and ``model``'s frozen prefix: reused if its key matches,
  else built (by process 0; the other processes wait for it and then read it).

  Logs whether it was built or reused, and its size on disk.
  """
  from rankjax import data  # pylint: disable=g-import-not-at-top
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  if not model.frozen_blocks:
    raise ValueError("config.frozen_cache.enabled needs an encoder with a frozen prefix: set "
                     "config.model.backbone_options.frozen_blocks > 0 (efficientnet_lite0).")
  source = data.datasets.get_source(config.dataset, config.data_dir, config.protocol)
  if source.spec.in_memory:
    raise ValueError(f"config.frozen_cache is for datasets read as encoded images (photos, "
                     f"folders); {config.dataset!r} is held decoded in memory, where the "
                     "frozen prefix of a small encoder costs little: turn the cache off.")
  augment = pipeline.resolve_augment(config.augment, source.spec)
  settings = Settings.from_config(config)
  if augment is None and settings.views != 1:
    raise ValueError(f"config.frozen_cache.views={settings.views}, but the training images of "
                     f"{config.dataset!r} are not augmented (config.augment): every view would be "
                     "the same. Set config.frozen_cache.views=1.")
  key = cache_key(config, model, source, augment)
  root = cache_root(config)
  directory = os.path.join(root, _directory_name(key))
  if jax.process_index() == 0:
    _remove_dead_builds(directory)
    start = time.perf_counter()
    if _matches(directory, key):
      verb = "Reused"
    else:
      if os.path.exists(directory):
        logging.warning("The frozen cache %s has another key; rebuilding it.", directory)
        shutil.rmtree(directory)
      _build(directory, key, config, model, source, augment, mesh)
      verb = f"Built in {time.perf_counter() - start:.0f} s"
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"rankjax_frozen_cache:{directory}")
    verb = "Reused" if jax.process_index() else verb
    if not _matches(directory, key):
      raise RuntimeError(f"The frozen cache {directory} is not readable from process "
                         f"{jax.process_index()}: the processes must share config.data_dir.")
  cache = Cache(directory)
  logging.info("%s the frozen cache %s: %s; %s on disk.", verb, directory,
               ", ".join(f"{s} {cache.arrays[s].shape}" for s in SPLITS),
               _format_bytes(cache.size_bytes()))
  return cache


def _matches(directory: str, key: dict) -> bool:
  try:
    with open(os.path.join(directory, KEY_FILE)) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return False
  stored.pop("shapes", None)
  return stored == key and all(
      os.path.exists(os.path.join(directory, f"{split}.bin")) for split in SPLITS)


def _remove_dead_builds(directory: str) -> None:
  """Deletes the unfinished builds of ``directory`` whose process is gone."""
  parent, name = os.path.split(directory)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if not entry.startswith(name + ".tmp-"):
      continue
    try:
      pid = int(entry.rsplit("-", 1)[1])
      os.kill(pid, 0)
      alive = pid != os.getpid()
    except (ValueError, ProcessLookupError):
      alive = False
    except PermissionError:
      alive = True
    if not alive:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _build(directory, key, config, model, source, augment, mesh) -> None:
  """Computes every split's activations into ``directory`` (written whole, then renamed)."""
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  prefix = _prefix_fn(model, mesh)
  storage = jnp.dtype(key["storage_dtype"])
  shapes = {}
  for split in SPLITS:
    positions = source.positions(split)
    views = key["views"] if split == "train" else 1
    images = (_train_views(source, positions, augment, key, config.image_size)
              if split == "train" else _eval_views(source, positions, config.image_size))
    count = positions.size * views
    activation = _activation_shape(prefix, config.image_size, source.spec.num_channels)
    shape = (positions.size, views, *activation) if split == "train" else (positions.size,
                                                                          *activation)
    shapes[split] = list(shape)
    np.save(os.path.join(tmp, f"{split}_positions.npy"), positions.astype(np.int64))
    if not count:
      open(os.path.join(tmp, f"{split}.bin"), "wb").close()
      continue
    out = np.memmap(os.path.join(tmp, f"{split}.bin"), dtype=storage, mode="w+",
                    shape=(count, *activation))
    _fill(out, images, prefix, split, count)
    out.flush()
    del out
  with open(os.path.join(tmp, KEY_FILE), "w") as f:
    json.dump({**key, "shapes": shapes}, f, indent=1, sort_keys=True)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  os.rename(tmp, directory)


def _fill(out, images: Iterator[np.ndarray], prefix, split: str, count: int) -> None:
  """Runs ``prefix`` over the image batches into ``out``, logging progress."""
  start = last = time.perf_counter()
  done = 0
  for batch in images:
    n = batch.shape[0]
    if n < _BUILD_BATCH:  # One compiled shape: pad the last batch.
      batch = np.concatenate([batch, np.zeros((_BUILD_BATCH - n, *batch.shape[1:]), batch.dtype)])
    out[done:done + n] = np.asarray(prefix(batch))[:n].astype(out.dtype)
    done += n
    now = time.perf_counter()
    if now - last > 30 or done == count:
      last = now
      rate = done / max(now - start, 1e-9)
      logging.info("Frozen cache, %s: %d / %d views (%.0f%%), %.0f views/s, %.0f s left.", split,
                   done, count, 100 * done / count, rate, (count - done) / max(rate, 1e-9))
  if done != count:
    raise RuntimeError(f"The frozen cache's {split} pass gave {done} views, expected {count}.")


def _prefix_fn(model, mesh):
  """``images -> activations`` of the frozen prefix, jitted (sharded over ``mesh``)."""
  model.eval()
  graphdef, state = nnx.split(model)
  model.train()

  def prefix(state, images):
    return nnx.merge(graphdef, state).frozen_prefix(images)

  if mesh is None or _BUILD_BATCH % mesh.devices.size:
    fn = jax.jit(prefix)
  else:
    fn = jax.jit(prefix, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))
  return lambda images: fn(state, images)


def _activation_shape(prefix, image_size: int, channels: int) -> tuple[int, ...]:
  return tuple(jax.eval_shape(
      prefix, jax.ShapeDtypeStruct((_BUILD_BATCH, image_size, image_size, channels),
                                   jnp.float32)).shape[1:])


def _eval_views(source, positions, image_size):
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  if not positions.size:
    return iter(())
  return pipeline.stream_eval(source, positions, image_size, _BUILD_BATCH, False, None)


def _train_views(source, positions, augment, key, image_size):
  """float32 batches of every (image, view), image-major, by the training preprocessing."""
  from rankjax.data import pipeline, preprocessing  # pylint: disable=g-import-not-at-top
  if augment is None:
    return _eval_views(source, positions, image_size)
  if not positions.size:
    return iter(())
  views = key["views"]
  encoded = source.encoded(positions)
  spec = source.spec
  seed_word = view_seed_word(key["cache_seed"])
  image_index = np.repeat(np.arange(positions.size), views)
  example_id = (np.repeat(positions.astype(np.int64), views) * views
                + np.tile(np.arange(views, dtype=np.int64), positions.size))

  def prepare(index, example):
    ex_seed = tf.stack([tf.constant(seed_word, tf.int64), example])
    return preprocessing.train_preprocess_encoded(
        tf.gather(encoded_t, index), ex_seed, image_size=image_size,
        num_channels=spec.num_channels, scale=augment.scale, ratio=augment.ratio,
        flip=augment.flip, antialias=augment.antialias)

  encoded_t = tf.constant(encoded)
  ds = tf.data.Dataset.from_tensor_slices((image_index, example_id)).map(
      prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(_BUILD_BATCH).prefetch(2).with_options(pipeline.dataset_options(None))
  return ds.as_numpy_iterator()


def view_seed_word(cache_seed: int) -> int:
  """The first half of each cached view's stateless preprocessing seed."""
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.tf_seed_word(cache_seed, 0x5C1E)


def view_choice(seed: int, step: int, global_batch: int, views: int) -> np.ndarray:
  """``int64[global_batch]``: which cached view each slot of step ``step``'s batch reads."""
  if views == 1:
    return np.zeros([global_batch], np.int64)
  rng = np.random.default_rng([seeding.stream_seed(seed, "cache_view"), step])
  return rng.integers(views, size=global_batch)


def train_batches(cache: Cache, config, *, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this host's training batches, ``{"activation", "label"}``, from the cache.

  The classes and images of each step are those of :func:`rankjax.data.train_batches` with the
  same arguments; ``activation`` is ``[B, h, w, c]`` in the storage dtype.
  """
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  seed = seeding.stream_seed(config.seed, "data")
  _, positions, labels, sampler, _ = pipeline.train_plan(
      config.dataset, config.classes_per_batch, config.samples_per_class, seed, config.data_dir,
      process_index, process_count, config.data_shards, config.protocol)
  rows = cache.rows("train", positions)
  local_batch = sampler.batch_size
  per_shard = local_batch // len(sampler.shard_range)
  first_slot = sampler.shard_range[0] * per_shard
  global_batch = sampler.num_shards * per_shard
  train = cache.arrays["train"]
  run_seed = config.seed

  def batches():
    for step in itertools.count(start_step):
      idx = sampler.batch_indices(step)
      views = view_choice(run_seed, step, global_batch, cache.views)[
          first_slot:first_slot + local_batch]
      yield {"activation": np.asarray(train[rows[idx], views]), "label": labels[idx]}

  return batches()


def eval_batches(cache: Cache, config, *, split: str, batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """One pass over a split from the cache, as :func:`rankjax.data.eval_batches` makes it, with
  ``activation`` in place of ``image`` (for ``"train"``, each image's first cached view)."""
  from rankjax import data  # pylint: disable=g-import-not-at-top
  from rankjax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = data.datasets.get_source(config.dataset, config.data_dir, config.protocol)
  mine, local_batch, num_batches = pipeline.eval_shard(source, split, batch_size, process_index,
                                                       process_count, config.dataset)
  rows = cache.rows(split, mine)
  array = cache.arrays[split]
  if split == "train":  # The training images in their first cached view.
    array = array[:, 0]
  chunks = (np.asarray(array[rows[i:i + local_batch]]) for i in range(0, rows.size, local_batch))
  return pipeline.padded(chunks, source.labels[mine].astype(np.int32), local_batch, num_batches,
                         cache.activation_shape, config.dataset, key="activation",
                         dtype=array.dtype)


def _format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"
