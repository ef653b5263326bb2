r"""Training and evaluation input pipelines: class-balanced P x K batches and exact eval passes.

Training (:func:`train_batches`) is an infinite iterator of this host's part of the global P x K
batch of step ``start_step``, ``start_step + 1``, ...: the indices come from a
:class:`~rankjax.data.sampling.ClassBalancedSampler` (a pure function of ``(seed, step)``) and the
augmentation randomness from stateless ops keyed by ``(seed, step, slot)``, so restarting at
``start_step = n`` reproduces exactly the batches an uninterrupted run yields from step ``n``.

* Omniglot and digits (no augmentation) are decoded and resized once, held as uint8, and
  batched in numpy: the input pipeline costs well under a millisecond a step.
* CUB, Cars and SOP hold their encoded JPEGs and decode only the random crop window in parallel
  tf.data workers (``tf.image.decode_and_crop_jpeg``), then resize, flip and normalise.

**Multi-host.** The training classes are dealt into ``S`` *data shards* (``num_shards``, by
default one per host): shard ``s`` owns every ``S``-th training class (sorted) and draws
``P / S`` of them a step with its own sampler. Host ``h`` of ``n`` holds the ``S / n``
consecutive shards ``h * S / n ...``, reads and decodes only their images, and yields their
batches concatenated: the hosts' batches, concatenated in host order, are the global batch of
``P`` distinct classes x ``K``, and for a fixed ``S`` it is the same global batch whatever the
number of hosts (one host with ``S = 2`` yields what two hosts yield together). Evaluation gives
host ``h`` the ``h``-th contiguous shard of the test images (``tfds.even_splits`` style); every
host yields the same number of batches, padded with ``mask = False``.

Example::

  >>> from rankjax import data
  >>> batches = data.train_batches("digits", classes_per_batch=4, samples_per_class=2,
  ...                              image_size=16, seed=0)
  >>> batch = next(batches)
  >>> batch["image"].shape, batch["label"].shape
  ((8, 16, 16, 1), (8,))
  >>> for batch in data.eval_batches("digits", batch_size=256, image_size=16):
  ...   pass  # batch["image"], batch["label"], batch["mask"]
"""

from __future__ import annotations

import atexit
import collections.abc
import dataclasses
import itertools
import math
from typing import Iterator
import weakref

from absl import logging
import numpy as np
import tensorflow as tf

from rankjax.data import datasets
from rankjax.data import preprocessing
from rankjax.data import sampling

PADDING_LABEL = -1


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation: random resized crop (torchvision's rule) and horizontal flip.

  Attributes:
    scale: range of the crop's fraction of the image area (uniform).
    ratio: range of the crop's aspect ratio, width / height (log-uniform).
    flip: random horizontal flip.
    antialias: anti-alias the resize of the crop (as the evaluation resize is); it matters only
      where a crop is larger than the output and is shrunk.
  """
  scale: tuple[float, float] = preprocessing.DEFAULT_SCALE
  ratio: tuple[float, float] = preprocessing.DEFAULT_RATIO
  flip: bool = True
  antialias: bool = False

  def __post_init__(self):
    lo, hi = self.scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"augment scale must satisfy 0 < min <= max <= 1; got {self.scale}.")
    lo, hi = self.ratio
    if not 0 < lo <= hi:
      raise ValueError(f"augment ratio must satisfy 0 < min <= max; got {self.ratio}.")


def resolve_augment(augment, spec: datasets.DatasetSpec) -> Augment | None:
  """None -> the dataset default; bool; an :class:`Augment`; or a mapping of its fields."""
  if augment is None:
    augment = spec.augment
  if isinstance(augment, (bool, np.bool_)):
    return Augment() if augment else None
  if isinstance(augment, Augment):
    return augment
  if hasattr(augment, "to_dict"):  # an ml_collections.ConfigDict
    augment = augment.to_dict()
  if isinstance(augment, collections.abc.Mapping):
    fields = {f.name for f in dataclasses.fields(Augment)}
    unknown = set(augment) - fields - {"enabled"}
    if unknown:
      raise ValueError(f"augment has unknown keys {sorted(unknown)}; allowed: {sorted(fields)}.")
    if not augment.get("enabled", True):
      return None
    return Augment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                      for k, v in augment.items() if k in fields})
  raise ValueError(f"augment must be None, a bool, an Augment or a mapping; got {augment!r}.")


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer; got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}.")
  return int(value)


def _normalize_np(images: np.ndarray, num_channels: int) -> np.ndarray:
  """numpy twin of :func:`preprocessing.normalize` (same operations, same order)."""
  if num_channels == 3:
    mean, std = preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD
  else:
    mean, std = preprocessing.GRAYSCALE_MEAN, preprocessing.GRAYSCALE_STD
  images = images.astype(np.float32) / np.float32(255.0)
  return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


_WARNED: set = set()


class _Pipeline:
  """Iterator over a tf.data pipeline, shut down before the interpreter is.

  A pipeline fed by a Python generator (``from_generator``) that is still running when Python
  finalises can deadlock the exit; closing every live pipeline at ``atexit`` avoids it.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset.as_numpy_iterator())
    _LIVE_PIPELINES.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    """Stops the background work; the iterator then ends."""
    self._iterator = None


_LIVE_PIPELINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_pipelines():
  for pipeline in list(_LIVE_PIPELINES):
    pipeline.close()
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()


def tf_seed_word(*words: int) -> int:
  """A 63-bit word mixing ``words``, the first half of the per-example stateless seeds."""
  state = np.random.SeedSequence([w % (1 << 64) for w in words]).generate_state(1, np.uint64)[0]
  return int(state >> np.uint64(1))


def dataset_options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads is not None:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def train_batches(name: str, *, classes_per_batch: int, samples_per_class: int, image_size: int,
                  seed: int, data_dir=None, augment=None, start_step: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  num_shards: int | None = None, threads: int | None = None,
                  protocol=None) -> Iterator[dict]:
  """Infinite iterator of class-balanced training batches (this host's part of the global one).

  Args:
    name: a dataset name (:func:`rankjax.data.dataset_names`, or ``"folder:PATH"``).
    classes_per_batch: ``P`` distinct classes in the global batch (at most the number of
      training classes; divisible by ``process_count``).
    samples_per_class: ``K`` >= 2 samples of each class (N-pairs: ``K = 2``). A class with fewer
      than ``K`` images is sampled with replacement (logged once).
    image_size: side ``S`` of the square images.
    seed: the seed of the whole schedule (classes, samples and augmentation).
    data_dir: the TFDS data directory (``None``: TFDS's default); unused by digits.
    augment: ``None`` (the dataset default: crop + flip for cub200 / cars196 / sop, none for
      omniglot / digits), a bool, an :class:`Augment`, or a mapping of its fields.
    start_step: the step of the first batch (resume from a checkpoint).
    process_index, process_count: this host and the number of hosts (default: JAX's).
    num_shards: the number of data shards the training classes are dealt into (a multiple of
      ``process_count`` that divides ``P``; default: ``process_count``). The global batches
      depend on it, not on ``process_count``.
    threads: size of tf.data's private thread pool (default: all cores).
    protocol: how the classes are split (:class:`~rankjax.data.datasets.Protocol`; ``None``:
      the dataset's defaults); batches come from the ``"train"`` split.

  Yields:
    ``{"image": float32[P*K/n, S, S, C] normalised, "label": int32[P*K/n]}``, grouped by class
    (``K`` consecutive rows per class).

  Raises:
    ValueError: an unknown ``name``, ``P`` above the number of training classes, ``K < 2``,
      ``P`` not divisible by ``num_shards`` or ``num_shards`` by ``process_count``, other bad
      arguments.
    DatasetNotPreparedError: the TFDS dataset is not in ``data_dir``.
  """
  size = _check_int("image_size", image_size, 1)
  start_step = _check_int("start_step", start_step, 0)
  seed = _check_int("seed", seed, -(1 << 63))
  aug = resolve_augment(augment, datasets.get_spec(name))
  source, positions, labels, sampler, (h, n) = train_plan(
      name, classes_per_batch, samples_per_class, seed, data_dir, process_index, process_count,
      num_shards, protocol)
  spec = source.spec
  local_batch = sampler.batch_size
  slice_reads = n > 1
  shards = sampler.shard_range
  logging.info("Training input of process %d of %d: data shard%s %s of %d, %d images of %d "
               "classes (%s).", h, n, "s" if len(shards) > 1 else "",
               f"{shards[0]}-{shards[-1]}" if len(shards) > 1 else shards[0], sampler.num_shards,
               positions.size, sampler.classes.size, _summary(sampler.classes))

  if aug is None and spec.in_memory:
    images = datasets.cached_array(source, "decoded", positions, size, slice_reads=slice_reads)
    return _numpy_batches(sampler, images, labels, spec.num_channels, start_step)

  if spec.in_memory:  # Augmenting a small dataset: crop from the native-size images.
    payload = datasets.cached_array(source, "decoded", positions, None, slice_reads=slice_reads)
    payload_spec = tf.TensorSpec([local_batch, *payload.shape[1:]], tf.uint8)
  else:
    payload = datasets.cached_array(source, "encoded", positions, slice_reads=slice_reads)
    payload_spec = tf.TensorSpec([local_batch], tf.string)
  # Augmentation keys depend on the example's slot in the global batch, not on the host: the same
  # global batch gets the same crops however many hosts share it.
  seed_word = tf_seed_word(seed, sampler.num_shards, 0)
  first_slot = sampler.shard_range[0] * (local_batch // len(sampler.shard_range))
  global_batch = sampler.num_shards * (local_batch // len(sampler.shard_range))

  def steps():
    for step in itertools.count(start_step):
      idx = sampler.batch_indices(step)
      yield payload[idx], labels[idx], (step * global_batch + first_slot +
                                        np.arange(local_batch, dtype=np.int64))

  def prepare(item, label, example_id):
    channels = spec.num_channels
    if aug is None:
      # Only encoded sources get here: in-memory ones without augmentation are batched in numpy.
      image = preprocessing.eval_preprocess(
          preprocessing.decode_image(item, 3), image_size=size, num_channels=channels,
          crop_fraction=spec.crop_fraction, method=spec.resize_method)
    else:
      ex_seed = tf.stack([tf.constant(seed_word, tf.int64), example_id])
      fn = (preprocessing.train_preprocess_decoded if spec.in_memory else
            preprocessing.train_preprocess_encoded)
      image = fn(item, ex_seed, image_size=size, num_channels=channels, scale=aug.scale,
                 ratio=aug.ratio, flip=aug.flip, antialias=aug.antialias)
    return {"image": image, "label": label}

  ds = tf.data.Dataset.from_generator(
      steps, output_signature=(payload_spec, tf.TensorSpec([local_batch], tf.int32),
                               tf.TensorSpec([local_batch], tf.int64)))
  ds = ds.unbatch().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
  return _Pipeline(ds.with_options(dataset_options(threads)))


def train_plan(name, classes_per_batch, samples_per_class, seed, data_dir, process_index,
                process_count, num_shards=None, protocol=None):
  """Checks the batch arguments; returns this host's positions, labels and sampler."""
  p = _check_int("classes_per_batch", classes_per_batch, 1)
  if isinstance(samples_per_class, (int, np.integer)) and not isinstance(samples_per_class, bool):
    if samples_per_class < 2:
      raise ValueError(
          f"samples_per_class={samples_per_class}: a ranking loss needs K >= 2 samples of each "
          "class in a batch, or no anchor has a positive (N-pairs uses K = 2).")
  k = _check_int("samples_per_class", samples_per_class, 2)
  h, n = sampling.check_process(process_index, process_count)
  s = n if num_shards is None else _check_int("num_shards", num_shards, 1)
  if s % n:
    raise ValueError(f"num_shards={s} is not a multiple of process_count={n}: each process holds "
                     "the same number of data shards.")
  if p % s:
    what = "process_count" if num_shards is None else "num_shards"
    raise ValueError(
        f"classes_per_batch={p} is not divisible by {what}={s}: each data shard (by default one "
        "per host) draws P / num_shards classes of its own.")
  source = datasets.get_source(name, data_dir, protocol)
  train = source.positions("train")
  classes = np.unique(source.labels[train])
  if p > classes.size:
    raise ValueError(
        f"classes_per_batch={p} exceeds the {classes.size} training classes of {name!r}: a P x K "
        "batch needs P distinct classes, so the batch is bounded by the class count (for N-pairs, "
        f"K = 2, at most {2 * classes.size} images).")
  shards = range(h * s // n, (h + 1) * s // n)
  # Shards own floor(C / S) >= P / S classes or one more, so each can draw its P / S.
  owned = [sampling.partition_classes(classes, i, s) for i in shards]
  positions = train[np.isin(source.labels[train], np.concatenate(owned))]
  labels = source.labels[positions].astype(np.int32)
  sampler = _ShardSamplers(labels, owned, shards, s, classes_per_batch=p // s,
                           samples_per_class=k, seed=seed)
  if sampler.num_classes_smaller_than_k and (name, k, s, h) not in _WARNED:
    _WARNED.add((name, k, s, h))
    logging.warning(
        "%s: %d of %d training classes have fewer than samples_per_class=%d images; they are "
        "sampled with replacement.", name, sampler.num_classes_smaller_than_k,
        sampler.classes.size, k)
  return source, positions, labels, sampler, (h, n)


class _ShardSamplers:
  """The samplers of one host's data shards, drawn as one batch (the shards' batches in order).

  Shard ``i`` of ``S`` samples its own classes with a
  :class:`~rankjax.data.sampling.ClassBalancedSampler` seeded ``(seed, S, i)``; indices are into
  ``labels``, the host's examples of all its shards.
  """

  def __init__(self, labels, owned, shards, num_shards, *, classes_per_batch, samples_per_class,
               seed):
    self.num_shards = num_shards
    self.shard_range = shards
    self.classes = np.sort(np.concatenate(owned))
    self._members = [np.flatnonzero(np.isin(labels, c)) for c in owned]
    self._samplers = [sampling.ClassBalancedSampler(
        labels[m], classes_per_batch=classes_per_batch, samples_per_class=samples_per_class,
        seed=(seed, num_shards, i)) for m, i in zip(self._members, shards)]
    self.batch_size = sum(x.batch_size for x in self._samplers)
    self.steps_per_epoch = max(x.steps_per_epoch for x in self._samplers)
    self.num_classes_smaller_than_k = sum(x.num_classes_smaller_than_k for x in self._samplers)

  def batch_indices(self, step: int) -> np.ndarray:
    return np.concatenate([m[x.batch_indices(step)]
                           for m, x in zip(self._members, self._samplers)])


def _summary(values: np.ndarray, limit: int = 12) -> str:
  """``"0, 2, 4"``, or the first ``limit`` values and a count."""
  shown = ", ".join(str(v) for v in values[:limit].tolist())
  return shown if values.size <= limit else f"{shown}, ... ({values.size - limit} more)"


def epoch_steps(name: str, *, classes_per_batch: int, samples_per_class: int, data_dir=None,
                process_index: int | None = None, process_count: int | None = None,
                num_shards: int | None = None, protocol=None) -> int:
  """Steps of :func:`train_batches` after which every training image has been drawn.

  ``ceil(C / P) * max_c ceil(n_c / K)`` over the classes of each of this host's data shards
  (see :class:`~rankjax.data.sampling.ClassBalancedSampler`); the same for every seed.
  """
  sampler = train_plan(name, classes_per_batch, samples_per_class, 0, data_dir, process_index,
                        process_count, num_shards, protocol)[3]
  return sampler.steps_per_epoch


def _numpy_batches(sampler, images, labels, num_channels, start_step):
  for step in itertools.count(start_step):
    idx = sampler.batch_indices(step)
    yield {"image": _normalize_np(images[idx], num_channels), "label": labels[idx]}


def eval_batches(name: str, *, batch_size: int, image_size: int, split: str = "test",
                 data_dir=None, process_index: int | None = None,
                 process_count: int | None = None, threads: int | None = None,
                 protocol=None) -> Iterator[dict]:
  """One pass over the images of a class-disjoint split, each exactly once, in order.

  Args:
    name: a dataset name (:func:`rankjax.data.dataset_names`, or ``"folder:PATH"``).
    batch_size: the global batch size (divisible by ``process_count``).
    image_size: side ``S`` of the square images (evaluation preprocessing: resize, centre crop).
    split: ``"test"`` (the unseen classes), ``"val"`` (the validation classes, carved from the
      training classes) or ``"train"`` (the classes that train).
    data_dir: the TFDS data directory (``None``: TFDS's default).
    process_index, process_count: this host and the number of hosts (default: JAX's).
    threads: size of tf.data's private thread pool (default: all cores).
    protocol: how the classes are split (see :func:`train_batches`).

  Yields:
    ``{"image": float32[B/n, S, S, C], "label": int32[B/n], "mask": bool[B/n]}``: host ``h``
    walks the ``h``-th contiguous shard of the split (pooled order); the last batches are padded
    (``mask`` False, ``label`` -1, image 0) so every host yields the same number of batches and
    no image is dropped or repeated.
  """
  size = _check_int("image_size", image_size, 1)
  source = datasets.get_source(name, data_dir, protocol)
  spec = source.spec
  mine, local_batch, num_batches = eval_shard(source, split, batch_size, process_index,
                                              process_count, name)
  n = sampling.check_process(process_index, process_count)[1]
  labels = source.labels[mine].astype(np.int32)
  if not mine.size:  # More hosts than images: this host only pads.
    chunks = ()
  elif spec.in_memory:
    images = datasets.cached_array(source, "decoded", mine, size, slice_reads=n > 1)
    chunks = (images[i:i + local_batch] for i in range(0, mine.size, local_batch))
    chunks = (_normalize_np(c, spec.num_channels) for c in chunks)
  else:
    chunks = stream_eval(source, mine, size, local_batch, n > 1, threads)
  return padded(chunks, labels, local_batch, num_batches, (size, size, spec.num_channels),
                name)


def eval_shard(source, split: str, batch_size, process_index, process_count, name: str
               ) -> tuple[np.ndarray, int, int]:
  """``(positions, local batch, batches)`` of this host's contiguous shard of ``split``: every
  host walks the same number of batches (the last ones padded)."""
  batch_size = _check_int("batch_size", batch_size, 1)
  h, n = sampling.check_process(process_index, process_count)
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by process_count={n}.")
  local_batch = batch_size // n
  positions = source.positions(split)
  if not positions.size:
    raise ValueError(f"The {split!r} split of {name!r} has no images.")
  start, stop = sampling.even_shard(positions.size, h, n)
  num_batches = math.ceil(math.ceil(positions.size / n) / local_batch)
  return positions[start:stop], local_batch, num_batches


def stream_eval(source, positions, size, local_batch, slice_reads, threads):
  spec = source.spec

  def prepare(encoded, label):
    del label
    return preprocessing.eval_preprocess(
        preprocessing.decode_image(encoded, 3), image_size=size, num_channels=spec.num_channels,
        crop_fraction=spec.crop_fraction, method=spec.resize_method)

  ds = source.stream_encoded(positions, slice_reads=slice_reads).map(
      lambda e, y: (prepare(e, y), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).prefetch(2).with_options(dataset_options(threads))
  offset = 0
  for images, labels in ds.as_numpy_iterator():
    expected = source.raw_labels[positions[offset:offset + labels.size]]
    if labels.size != expected.size or np.any(labels != expected):
      raise RuntimeError(
          f"The evaluation read of {spec.name!r} returned records that differ from the label "
          "pass (a source that ignores read instructions, or data changed under this process).")
    offset += labels.size
    yield images
  if offset != positions.size:
    raise RuntimeError(f"The evaluation read of {spec.name!r} returned {offset} records, expected "
                       f"{positions.size}.")


def padded(chunks, labels, local_batch, num_batches, row_shape, name, *, key: str = "image",
           dtype=np.float32):
  """Batches of ``local_batch`` rows from ``chunks`` (arrays ``[n, *row_shape]``), with ``label``
  and ``mask``; the last ones padded with zero rows (``mask`` False, ``label`` -1) up to
  ``num_batches`` batches."""
  offset = 0
  row_shape = tuple(row_shape)
  for rows in chunks:
    count = rows.shape[0]
    label = np.full([local_batch], PADDING_LABEL, np.int32)
    label[:count] = labels[offset:offset + count]
    mask = np.arange(local_batch) < count
    if count < local_batch:
      rows = np.concatenate([rows, np.zeros([local_batch - count, *row_shape], rows.dtype)])
    offset += count
    num_batches -= 1
    yield {key: rows, "label": label, "mask": mask}
  if offset != labels.size:
    raise RuntimeError(f"{name}: evaluation yielded {offset} images, expected {labels.size}.")
  for _ in range(num_batches):  # A host whose shard is one image short pads a whole batch.
    yield {key: np.zeros([local_batch, *row_shape], dtype),
           "label": np.full([local_batch], PADDING_LABEL, np.int32),
           "mask": np.zeros([local_batch], bool)}


def preprocess_for_eval(images, *, name: str, image_size: int,
                        num_channels: int | None = None) -> np.ndarray:
  """The evaluation preprocessing of ``name`` applied to decoded images (for exported embedders).

  Args:
    images: uint8 [B, H, W, C] (or [H, W, C]) images as the dataset stores them (C = 1 or 3;
      converted to the dataset's channels: luma for RGB -> gray, repeated for gray -> RGB).
      Digits are the 8 x 8 x 1 uint8 images ``round(v * 255 / 16)`` of ``load_digits``.
    name: the dataset whose preprocessing to apply.
    image_size: the side ``S`` the model was trained at.
    num_channels: the dataset's channels (``DatasetInfo.num_channels``); needed for folder
      datasets, whose channels come from their images.

  Returns:
    float32 [B, S, S, C]: exactly what :func:`eval_batches` feeds the model.
  """
  spec = datasets.get_spec(name)
  if num_channels is not None:
    spec = dataclasses.replace(spec, num_channels=_check_int("num_channels", num_channels, 1))
  if spec.num_channels is None:
    raise ValueError(f"Dataset {name!r} takes its channels from its images: pass num_channels "
                     "(DatasetInfo.num_channels).")
  size = _check_int("image_size", image_size, 1)
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (raw pixels 0-255); got dtype {images.dtype}.")
  squeeze = images.ndim == 3
  if squeeze:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"images must have shape [B, H, W, C] with C = 1 or 3; got {tuple(images.shape)}.")
  out = preprocessing.eval_preprocess(images, image_size=size, num_channels=spec.num_channels,
                                      crop_fraction=spec.crop_fraction,
                                      method=spec.resize_method).numpy()
  return out[0] if squeeze else out
