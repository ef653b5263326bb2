r"""The datasets rankjax trains on, their zero-shot (class-disjoint) splits, and how they are read.

Deep metric learning is evaluated zero-shot: the test classes are never seen in training
(Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016;
Musgrave et al., "A Metric Learning Reality Check", ECCV 2020). A dataset here is a pool of
TFDS splits plus two disjoint label ranges:

========  ================================  ============================ ============
name      source (TFDS splits pooled)       train labels                 test labels
========  ================================  ============================ ============
cub200    ``caltech_birds2011`` train+test  0-99 (5,864 images)          100-199
cars196   ``cars196`` train+test            0-97                         98-195
sop       ``stanford_online_products``      ``class_id`` 0-11317 (train)  11318-22633
omniglot  ``omniglot`` train+test           0-963 (background)           964-1622
digits    scikit-learn ``load_digits``      0-4                          5-9
========  ================================  ============================ ============

For SOP and Omniglot the label ranges coincide with the TFDS splits (SOP's train split holds
classes 1-11,318 of the original list, Omniglot's train split is the background set), so only
the split that holds a class range is ever read for images.

**Reading.** The pooled order is the TFDS order of each split (read in file order), splits
concatenated. A first pass reads only the labels (no image bytes are decoded), from which every
position, class and count follows; each host then reads only the records it needs: its own
classes for training, its contiguous shard for evaluation (per-host read instructions,
``split[from:to]``, when several processes share the work). Small datasets (Omniglot, digits)
are decoded and resized once and held as uint8 arrays; photo datasets (CUB, Cars, SOP) hold
their encoded JPEG bytes for random access and decode in tf.data (training) or stream from
TFDS (evaluation). Everything read is cached per process; :func:`clear_cache` drops it.

Example::

  >>> from rankjax import data
  >>> info = data.get_dataset_info("digits")
  >>> info.train_classes, info.test_classes, info.num_channels
  (5, 5, 1)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

from absl import logging
import numpy as np
import tensorflow as tf

from rankjax.data import preprocessing

DATASET_NAMES = ("digits", "omniglot", "cub200", "cars196", "sop")

_OMNIGLOT_HINT = (
    "Offline, convert the Omniglot file shipped with this project: `python -m "
    "rankjax.data.omniglot_from_npz --npz=../shared/data/omniglot_1623.npz --data_dir=DIR` and "
    "pass data_dir=DIR; with internet access, `tfds build omniglot --data_dir=DIR` prepares the "
    "same dataset.")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What defines a dataset's protocol and preprocessing (known without reading any data)."""
  name: str
  tfds_name: str | None
  splits: tuple[str, ...]
  label_key: str
  train_labels: range
  test_labels: range
  num_channels: int
  image_size: int
  augment: bool
  crop_fraction: float
  resize_method: str
  in_memory: bool  # decode once, hold uint8 arrays (small images) vs hold encoded bytes
  prepare_hint: str = ""


_SPECS = {
    "digits": DatasetSpec(
        name="digits", tfds_name=None, splits=(), label_key="label", train_labels=range(0, 5),
        test_labels=range(5, 10), num_channels=1, image_size=16, augment=False,
        crop_fraction=1.0, resize_method="bilinear", in_memory=True),
    "omniglot": DatasetSpec(
        name="omniglot", tfds_name="omniglot", splits=("train", "test"), label_key="label",
        train_labels=range(0, 964), test_labels=range(964, 1623), num_channels=1, image_size=28,
        augment=False, crop_fraction=1.0, resize_method="area", in_memory=True,
        prepare_hint=_OMNIGLOT_HINT),
    "cub200": DatasetSpec(
        name="cub200", tfds_name="caltech_birds2011", splits=("train", "test"),
        label_key="label", train_labels=range(0, 100), test_labels=range(100, 200),
        num_channels=3, image_size=224, augment=True,
        crop_fraction=preprocessing.DEFAULT_CROP_FRACTION, resize_method="bilinear",
        in_memory=False,
        prepare_hint="With internet access: `tfds build caltech_birds2011 --data_dir=DIR`."),
    "cars196": DatasetSpec(
        name="cars196", tfds_name="cars196", splits=("train", "test"), label_key="label",
        train_labels=range(0, 98), test_labels=range(98, 196), num_channels=3, image_size=224,
        augment=True, crop_fraction=preprocessing.DEFAULT_CROP_FRACTION,
        resize_method="bilinear", in_memory=False,
        prepare_hint="With internet access: `tfds build cars196 --data_dir=DIR`."),
    "sop": DatasetSpec(
        name="sop", tfds_name="stanford_online_products", splits=("train", "test"),
        label_key="class_id", train_labels=range(0, 11318), test_labels=range(11318, 22634),
        num_channels=3, image_size=224, augment=True,
        crop_fraction=preprocessing.DEFAULT_CROP_FRACTION, resize_method="bilinear",
        in_memory=False,
        prepare_hint="With internet access: `tfds build stanford_online_products --data_dir=DIR`."),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training loop needs to know about a dataset (counts come from the data itself).

  Attributes:
    name: the rankjax dataset name.
    tfds_name: the TFDS builder it reads (``None`` for digits).
    num_channels: 3 for RGB, 1 for grayscale.
    grayscale: ``num_channels == 1``.
    image_size: the default side ``S`` of the square inputs.
    train_classes, test_classes: number of classes in each class-disjoint split.
    num_train_examples, num_test_examples: number of images in each.
    augment: whether training applies random resized crop + flip by default.
    crop_fraction: evaluation resizes the shorter side to ``S / crop_fraction``, centre-crops S.
    resize_method: the ``tf.image.resize`` method of the evaluation resize.
  """
  name: str
  tfds_name: str | None
  num_channels: int
  grayscale: bool
  image_size: int
  train_classes: int
  test_classes: int
  num_train_examples: int
  num_test_examples: int
  augment: bool
  crop_fraction: float
  resize_method: str


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not in ``data_dir``; the message says where TFDS looked and what to do."""


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` of ``name``, or a ``ValueError`` listing the known names."""
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset name={name!r}; known datasets: {', '.join(DATASET_NAMES)}.")
  return _SPECS[name]


def _label_set(spec: DatasetSpec, split: str) -> range:
  if split == "train":
    return spec.train_labels
  if split == "test":
    return spec.test_labels
  raise ValueError(f"split must be 'train' or 'test' (the class-disjoint halves); got {split!r}.")


class Source:
  """The pooled examples of one dataset: labels of all of them, and readers for any subset."""

  def __init__(self, spec: DatasetSpec, labels: np.ndarray,
               split_ranges: tuple[tuple[str, int, int], ...]):
    self.spec = spec
    self.labels = labels  # int64[N], pooled order
    self.split_ranges = split_ranges  # (tfds split, start, stop) in pooled positions

  def positions(self, split: str) -> np.ndarray:
    """Sorted pooled positions of the examples whose label is in the ``split`` class range."""
    labels = _label_set(self.spec, split)
    return np.flatnonzero((self.labels >= labels.start) & (self.labels < labels.stop))

  # The readers below return exactly the records at ``positions`` (sorted), in that order.
  def decoded(self, positions: np.ndarray, image_size: int | None, *,
              slice_reads: bool = False) -> np.ndarray:
    """uint8 [n, S, S, C] evaluation-preprocessed (``image_size=None``: native size)."""
    raise NotImplementedError

  def encoded(self, positions: np.ndarray, *, slice_reads: bool = False) -> np.ndarray:
    """object [n]: the encoded image bytes."""
    raise NotImplementedError

  def stream_encoded(self, positions: np.ndarray, *, slice_reads: bool) -> tf.data.Dataset:
    raise NotImplementedError


class _DigitsSource(Source):
  """scikit-learn's bundled 8 x 8 digits: values 0..16 mapped to uint8 ``round(v * 255 / 16)``."""

  def __init__(self):
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    digits = sk_datasets.load_digits()
    self.images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    super().__init__(_SPECS["digits"], digits.target.astype(np.int64),
                     (("all", 0, digits.target.size),))

  def decoded(self, positions, image_size, *, slice_reads=False):
    del slice_reads  # In memory already.
    images = self.images[positions]
    if image_size is None:
      return images
    return preprocessing.resize_and_center_crop(
        images, image_size=image_size, num_channels=1, crop_fraction=1.0,
        method=self.spec.resize_method).numpy()


class _TfdsSource(Source):
  """A TFDS dataset; ``data_dir`` as in ``tfds.builder`` (``None``: TFDS's default)."""

  def __init__(self, spec: DatasetSpec, data_dir):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    self.spec = spec
    self.data_dir = data_dir
    self.builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    labels, ranges, start = [], [], 0
    for split in spec.splits:
      # Same features as the image reads: a mock source generates per feature subset.
      ds = self._read(split).map(lambda ex: ex[spec.label_key])
      split_labels = np.concatenate(
          [np.zeros([0], np.int64)] +
          [b.astype(np.int64) for b in ds.batch(8192).as_numpy_iterator()])
      labels.append(split_labels)
      ranges.append((split, start, start + split_labels.size))
      start += split_labels.size
    super().__init__(spec, np.concatenate(labels), tuple(ranges))

  def _read(self, split: str) -> tf.data.Dataset:
    """Records ``{"image": encoded bytes, label_key: int64}`` of a split or a slice of one."""
    tfds = self._tfds
    try:
      return self.builder.as_dataset(
          split=split, shuffle_files=False,
          # Images stay encoded: the label pass never decodes, the pipelines decode what they use.
          decoders=tfds.decode.PartialDecoding(
              {"image": True, self.spec.label_key: True},
              decoders={"image": tfds.decode.SkipDecoding()}),
          # One file at a time: records come in their absolute order, which is what
          # ``split[from:to]`` slices, so positions mean the same in every read.
          read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    except AssertionError as e:
      if "could not find data" not in str(e):
        raise
      where = (repr(self.data_dir) if self.data_dir is not None else
               f"None (TFDS's default, {os.fspath(self.builder.data_dir_root)})")
      raise DatasetNotPreparedError(
          f"Dataset {self.spec.name!r} needs the TFDS dataset {self.spec.tfds_name!r} "
          f"(version {self.builder.version}), which is not prepared in data_dir={where}: TFDS "
          f"looked for it in {self.builder.data_dir}. {self.spec.prepare_hint} Or set data_dir "
          "to a TFDS directory that already holds it.") from e

  def stream_encoded(self, positions, *, slice_reads):
    """tf.data of ``(encoded image bytes, label)`` for exactly ``positions``, in order.

    With ``slice_reads`` each split is read through the read instruction ``split[lo:hi]`` that
    covers the positions it holds (the per-host read); otherwise whole splits are read.
    """
    parts = []
    for split, start, stop in self.split_ranges:
      local = positions[(positions >= start) & (positions < stop)] - start
      if not local.size:
        continue
      lo, hi = (int(local[0]), int(local[-1]) + 1) if slice_reads else (0, stop - start)
      instruction = split if (lo, hi) == (0, stop - start) else f"{split}[{lo}:{hi}]"
      keep = np.zeros(hi - lo, bool)
      keep[local - lo] = True
      keep = tf.constant(keep)
      label_key = self.spec.label_key
      ds = self._read(instruction).enumerate()
      ds = ds.filter(lambda i, ex, keep=keep: tf.gather(
          keep, tf.minimum(i, tf.size(keep, tf.int64) - 1)) & (i < tf.size(keep, tf.int64)))
      parts.append(ds.map(lambda i, ex, label_key=label_key: (ex["image"], ex[label_key])))
    if not parts:
      raise ValueError("No examples to read.")
    return functools.reduce(lambda a, b: a.concatenate(b), parts)

  def _check(self, positions, labels, what):
    expected = self.labels[positions]
    if labels.shape != expected.shape or np.any(labels != expected):
      raise RuntimeError(
          f"Reading {what} of {self.spec.tfds_name!r} returned {labels.size} records where the "
          f"label pass found {expected.size} (or different labels): the data source does not "
          "return the same records for the same read instruction. (tfds.testing.mock_data's "
          "default generator ignores slices; use rankjax.data.testing.mock_data, or data "
          "changed under this process: call rankjax.data.clear_cache().)")

  def encoded(self, positions, *, slice_reads=False):
    ds = self.stream_encoded(positions, slice_reads=slice_reads).batch(1024)
    images, labels = [np.zeros([0], object)], [np.zeros([0], np.int64)]
    for image, label in ds.as_numpy_iterator():
      images.append(image)
      labels.append(label.astype(np.int64))
    self._check(positions, np.concatenate(labels), "encoded images")
    return np.concatenate(images)

  def decoded(self, positions, image_size, *, slice_reads=False):
    spec = self.spec

    def decode(encoded, label):
      image = preprocessing.decode_image(encoded, 3)
      if image_size is None:
        image = tf.cast(tf.round(preprocessing.to_channels(tf.cast(image, tf.float32),
                                                           spec.num_channels)), tf.uint8)
      else:
        image = preprocessing.resize_and_center_crop(
            image, image_size=image_size, num_channels=spec.num_channels,
            crop_fraction=spec.crop_fraction, method=spec.resize_method)
      return image, label

    ds = self.stream_encoded(positions, slice_reads=slice_reads).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    images, labels = [], [np.zeros([0], np.int64)]
    for image, label in ds.as_numpy_iterator():
      images.append(image)
      labels.append(label.astype(np.int64))
    self._check(positions, np.concatenate(labels), "decoded images")
    return np.concatenate(images)


# Per-process caches: label passes, and the image arrays / bytes a pipeline holds.
_SOURCES: dict = {}
_ARRAYS: collections.OrderedDict = collections.OrderedDict()
_MAX_ARRAYS = 6


def clear_cache() -> None:
  """Forgets every label pass and every image array this process has read."""
  _SOURCES.clear()
  _ARRAYS.clear()


def _data_dir_key(data_dir):
  return None if data_dir is None else os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def get_source(name: str, data_dir=None) -> Source:
  """The (cached) :class:`Source` of dataset ``name`` in ``data_dir``."""
  spec = get_spec(name)
  if data_dir is not None and not os.fspath(data_dir):
    data_dir = None  # An empty config field means TFDS's default directory.
  key = (name, _data_dir_key(data_dir) if spec.tfds_name else None)
  if key not in _SOURCES:
    if spec.tfds_name is None:
      _SOURCES[key] = _DigitsSource()
    else:
      logging.info("Reading the labels of %s (%s) from data_dir=%s.", name, spec.tfds_name,
                   data_dir)
      _SOURCES[key] = _TfdsSource(spec, data_dir)
  return _SOURCES[key]


def cached_array(source: Source, kind: str, positions: np.ndarray, image_size=None, *,
                 slice_reads: bool = False) -> np.ndarray:
  """``source.decoded`` / ``source.encoded`` of ``positions``, cached (a few entries, LRU).

  ``slice_reads``: read through per-host read instructions (``split[lo:hi]``); the result is
  the same either way.
  """
  key = (id(source), kind, image_size, positions.size, hash(positions.tobytes()))
  if key in _ARRAYS:
    _ARRAYS.move_to_end(key)
    return _ARRAYS[key]
  logging.info("Reading %d %s images of %s.", positions.size, kind, source.spec.name)
  if kind == "decoded":
    value = source.decoded(positions, image_size, slice_reads=slice_reads)
  else:
    value = source.encoded(positions, slice_reads=slice_reads)
  _ARRAYS[key] = value
  while len(_ARRAYS) > _MAX_ARRAYS:
    _ARRAYS.popitem(last=False)
  return value


def get_dataset_info(name: str, *, data_dir=None) -> DatasetInfo:
  """Protocol, preprocessing defaults and the class / image counts of dataset ``name``.

  The counts come from the data (one pass over the labels, cached per process), so a TFDS
  dataset must be prepared in ``data_dir`` (``None``: TFDS's default directory).

  Raises:
    ValueError: unknown ``name``.
    DatasetNotPreparedError: the TFDS dataset is not in ``data_dir``.
  """
  spec = get_spec(name)
  source = get_source(name, data_dir)
  train, test = source.positions("train"), source.positions("test")
  return DatasetInfo(
      name=name, tfds_name=spec.tfds_name, num_channels=spec.num_channels,
      grayscale=spec.num_channels == 1, image_size=spec.image_size,
      train_classes=int(np.unique(source.labels[train]).size),
      test_classes=int(np.unique(source.labels[test]).size),
      num_train_examples=int(train.size), num_test_examples=int(test.size),
      augment=spec.augment, crop_fraction=spec.crop_fraction, resize_method=spec.resize_method)
