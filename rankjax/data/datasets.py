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

**Image folders.** ``"folder:PATH"`` is the folder ``PATH`` of class subfolders of images
(:mod:`rankjax.data.image_folder`: prepared once as TFRecords in ``data_dir``, then read like
the TFDS datasets). Its classes, sorted by folder name, are split in order: those with fewer
than ``min_images_per_class`` images (default 2) are dropped (and logged), the first half of
the rest train and the second half test (``Protocol.train_fraction``, or explicit class lists).
Three such folders are named datasets with the same rule, checked against their known counts;
each reads ``DATA_DIR/<folder>`` (or ``"name:PATH"``):

==============  =====================================================  =======================
name            folder (as unpacked from the offline tar)              train / test classes
==============  =====================================================  =======================
lfw             ``lfw_a``: LFW-a faces, 5,749 people, 13,233 images      840 / 840 people with 2+
cars196_half    ``cars196``: Stanford Cars, train-annotation half         1-98 / 99-196
cub200_first50  ``cub200``: CUB-200-2011, classes 1-50 only               1-25 / 26-50
==============  =====================================================  =======================

A number measured on ``cars196_half`` or ``cub200_first50`` is not comparable with the
published full-benchmark numbers: say which set it comes from. :func:`register_dataset` adds
a named dataset (a TFDS builder or a folder protocol) without editing this module.

**Validation split.** Checkpoint selection and any tuning use a class-disjoint validation split
carved from the training classes: the last ``val_fraction`` of them (sorted), 20% by default
for the photo and face sets and none for digits and Omniglot (whose recipes select nothing).
The test classes are evaluated once, at the end (Musgrave et al. 2020's protocol). The training
classes are labelled ``0 .. T-1`` (what proxy losses index): where a dataset's own training
labels are not already ``0 .. T-1`` (a folder with dropped classes, explicit class lists) every
kept class is renumbered in the order train, validation, test; otherwise (the TFDS datasets,
digits) the dataset's own labels stay.

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
  >>> info.train_classes, info.val_classes, info.test_classes, info.num_channels
  (5, 0, 5, 1)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import os

from absl import logging
import numpy as np
import tensorflow as tf

from rankjax.data import image_folder
from rankjax.data import preprocessing

SPLITS = ("train", "val", "test")

_OMNIGLOT_HINT = (
    "Offline, convert the Omniglot file shipped with this project: `python -m "
    "rankjax.data.omniglot_from_npz --npz=../shared/data/omniglot_1623.npz --data_dir=DIR` and "
    "pass data_dir=DIR; with internet access, `tfds build omniglot --data_dir=DIR` prepares the "
    "same dataset.")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What defines a dataset's protocol and preprocessing (known without reading any data).

  A TFDS dataset names its builder (``tfds_name``), the splits pooled and the label ranges of
  the class-disjoint halves. A folder dataset (``folder=True``) has none of these: its classes
  come from the folder, split by ``train_fraction`` (see the module docstring), and
  ``num_channels`` (``None``) from its images. ``folder_name`` is the subfolder of ``data_dir``
  that a named folder dataset reads when no path is given; ``expected`` its ``(classes,
  images)``, checked when it is read.
  """
  name: str
  tfds_name: str | None = None
  splits: tuple[str, ...] = ()
  label_key: str = "label"
  train_labels: range | None = None
  test_labels: range | None = None
  num_channels: int | None = 3
  image_size: int = 224
  augment: bool = True
  crop_fraction: float = preprocessing.DEFAULT_CROP_FRACTION
  resize_method: str = "bilinear"
  in_memory: bool = False  # decode once, hold uint8 arrays (small images) vs hold encoded bytes
  prepare_hint: str = ""
  folder: bool = False
  folder_name: str | None = None
  expected: tuple[int, int] | None = None
  train_fraction: float = 0.5
  val_fraction: float = 0.0
  min_images_per_class: int = 2
  description: str = ""


_FOLDER_HINT = ("Pass the folder as the dataset name, '{name}:/path/to/root', or unpack it into "
                "DATA_DIR/{folder} and pass data_dir=DATA_DIR.")

_SPECS: dict[str, DatasetSpec] = {}
_DIGITS = "digits"  # The one dataset read with neither a TFDS builder nor a folder.


def _check_has_data(spec: DatasetSpec) -> None:
  """Raises unless ``spec`` names a TFDS builder or a folder, or is the built-in digits."""
  if not spec.folder and spec.tfds_name is None and spec.name != _DIGITS:
    raise ValueError(f"Dataset {spec.name!r} names neither a TFDS builder (tfds_name) nor a "
                     f"folder (folder=True); only the built-in {_DIGITS!r} is read without one.")


def register_dataset(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
  """Adds the dataset ``spec.name``; configs and notebooks can then use it by name.

  Example (a folder protocol of one's own: 30% of the classes train, 10% of those validate)::

    from rankjax import data
    data.register_dataset(data.DatasetSpec(
        name="my_birds", folder=True, num_channels=None, image_size=128, train_fraction=0.3,
        val_fraction=0.1, folder_name="my_birds"))
    # then --config.dataset=my_birds:/path/to/my_birds (or my_birds with data_dir=...)

  Raises:
    ValueError: the name is taken (unless ``overwrite``), holds a ``":"``, or the spec is
      inconsistent (neither a TFDS builder nor a folder, a TFDS spec without label ranges,
      fractions outside their range).
  """
  if not spec.name or ":" in spec.name:
    raise ValueError(f"A dataset name must be non-empty and hold no ':'; got {spec.name!r}.")
  if spec.name in _SPECS and not overwrite:
    raise ValueError(f"Dataset {spec.name!r} is already registered; pass overwrite=True to "
                     "replace it.")
  _check_has_data(spec)
  if not spec.folder and (spec.train_labels is None or spec.test_labels is None):
    raise ValueError(f"Dataset {spec.name!r}: a TFDS or in-memory dataset needs train_labels "
                     "and test_labels (the class ranges of the two halves).")
  if not 0 < spec.train_fraction < 1:
    raise ValueError(f"Dataset {spec.name!r}: train_fraction must be in (0, 1); got "
                     f"{spec.train_fraction}.")
  if not 0 <= spec.val_fraction < 1:
    raise ValueError(f"Dataset {spec.name!r}: val_fraction must be in [0, 1); got "
                     f"{spec.val_fraction}.")
  _SPECS[spec.name] = spec
  return spec


_PHOTO = dict(num_channels=3, image_size=224, augment=True, in_memory=False, val_fraction=0.2)
for _spec in (
    DatasetSpec(
        name="digits", train_labels=range(0, 5), test_labels=range(5, 10), num_channels=1,
        image_size=16, augment=False, crop_fraction=1.0, in_memory=True,
        description="scikit-learn's 8 x 8 digits"),
    DatasetSpec(
        name="omniglot", tfds_name="omniglot", splits=("train", "test"),
        train_labels=range(0, 964), test_labels=range(964, 1623), num_channels=1, image_size=28,
        augment=False, crop_fraction=1.0, resize_method="area", in_memory=True,
        prepare_hint=_OMNIGLOT_HINT, description="Omniglot"),
    DatasetSpec(
        name="cub200", tfds_name="caltech_birds2011", splits=("train", "test"),
        train_labels=range(0, 100), test_labels=range(100, 200), **_PHOTO,
        prepare_hint="With internet access: `tfds build caltech_birds2011 --data_dir=DIR`.",
        description="CUB-200-2011"),
    DatasetSpec(
        name="cars196", tfds_name="cars196", splits=("train", "test"),
        train_labels=range(0, 98), test_labels=range(98, 196), **_PHOTO,
        prepare_hint="With internet access: `tfds build cars196 --data_dir=DIR`.",
        description="Cars196"),
    DatasetSpec(
        name="sop", tfds_name="stanford_online_products", splits=("train", "test"),
        label_key="class_id", train_labels=range(0, 11318), test_labels=range(11318, 22634),
        **_PHOTO,
        prepare_hint="With internet access: `tfds build stanford_online_products --data_dir=DIR`.",
        description="Stanford Online Products"),
    DatasetSpec(name="folder", folder=True, num_channels=None, val_fraction=0.2,
                description="an image folder"),
    DatasetSpec(name="lfw", folder=True, folder_name="lfw_a", num_channels=None,
                image_size=112, val_fraction=0.2, expected=(5749, 13233),
                description="LFW-a (aligned, grayscale faces)"),
    DatasetSpec(name="cars196_half", folder=True, folder_name="cars196", num_channels=None,
                image_size=128, val_fraction=0.2, expected=(196, 8144),
                description="Cars196, train-annotation half"),
    DatasetSpec(name="cub200_first50", folder=True, folder_name="cub200", num_channels=None,
                image_size=128, val_fraction=0.2, expected=(50, 2889),
                description="CUB-200-2011, first 50 classes"),
):
  register_dataset(_spec)
del _spec

def dataset_names() -> tuple[str, ...]:
  """Every registered dataset name (the built-in ones and those of :func:`register_dataset`)."""
  return tuple(_SPECS)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a dataset's classes are divided; ``None`` fields take the dataset's defaults.

  Attributes:
    val_fraction: the fraction of the training classes (the last ones, sorted) held out as the
      validation split; 0 for none.
    train_fraction: folder datasets: the fraction of the (kept) classes, sorted by name, that
      train; the rest test.
    min_images_per_class: classes with fewer images are dropped from every split (logged).
    train_classes, test_classes: folder datasets: explicit class folder names for each half
      (both or neither; they replace ``train_fraction``).
  """
  val_fraction: float | None = None
  train_fraction: float | None = None
  min_images_per_class: int | None = None
  train_classes: tuple[str, ...] = ()
  test_classes: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, protocol) -> Protocol:
    """A :class:`Protocol` from ``None``, a Protocol, a mapping or an ``ml_collections`` section."""
    if protocol is None or isinstance(protocol, Protocol):
      return protocol or cls()
    if hasattr(protocol, "to_dict"):
      protocol = protocol.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(protocol) - fields
    if unknown:
      raise ValueError(f"protocol has unknown keys {sorted(unknown)}; allowed: {sorted(fields)}.")
    values = dict(protocol)
    for key in ("train_classes", "test_classes"):
      values[key] = tuple(values.get(key) or ())
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training loop needs to know about a dataset (counts come from the data itself).

  Attributes:
    name: the rankjax dataset name (``"folder:PATH"`` for a folder).
    tfds_name: the TFDS builder it reads (``None`` for digits).
    num_channels: 3 for RGB, 1 for grayscale.
    grayscale: ``num_channels == 1``.
    image_size: the default side ``S`` of the square inputs.
    train_classes, val_classes, test_classes: number of classes in each class-disjoint split
      (the training classes are labelled ``0 .. T-1``).
    num_train_examples, num_val_examples, num_test_examples: number of images in each.
    augment: whether training applies random resized crop + flip by default.
    crop_fraction: evaluation resizes the shorter side to ``S / crop_fraction``, centre-crops S.
    resize_method: the ``tf.image.resize`` method of the evaluation resize.
    description: which set (and which part of it) this is, for tables and logs.
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
  val_classes: int = 0
  num_val_examples: int = 0
  description: str = ""


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not in ``data_dir``; the message says where TFDS looked and what to do."""


def parse_name(name: str) -> tuple[DatasetSpec, str | None]:
  """``(spec, folder root or None)`` of a dataset name such as ``"cub200"`` or ``"folder:PATH"``.

  Raises:
    ValueError: an unknown name (the message lists the known ones), a path after a dataset that
      is not a folder dataset, or ``"folder"`` without a path.
  """
  if not isinstance(name, str):
    raise ValueError(f"A dataset name must be a string; got {name!r}.")
  base, sep, root = name.partition(":")
  if base not in _SPECS:
    raise ValueError(f"Unknown dataset name={name!r}; known datasets: "
                     f"{', '.join(dataset_names())} (a folder of class subfolders: "
                     "'folder:/path/to/root').")
  spec = _SPECS[base]
  if sep and not spec.folder:
    raise ValueError(f"Dataset {base!r} is not a folder dataset; {name!r} gives it a path.")
  if spec.folder and sep and not root:
    raise ValueError(f"Dataset name {name!r} has an empty path after ':'.")
  if spec.folder and not sep and spec.folder_name is None:
    raise ValueError(f"Dataset {base!r} needs its folder: '{base}:/path/to/root'.")
  return spec, (root or None)


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` of ``name`` (see :func:`parse_name` for the accepted names)."""
  return parse_name(name)[0]


def _split_classes(spec: DatasetSpec, protocol: Protocol, raw_labels: np.ndarray,
                   class_names: tuple[str, ...] | None) -> dict[str, np.ndarray]:
  """The raw class ids of each split, sorted (see the module docstring for the rule)."""
  min_images = (spec.min_images_per_class if protocol.min_images_per_class is None
                else protocol.min_images_per_class)
  if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or (
      min_images < 1):
    raise ValueError(f"min_images_per_class must be a positive integer; got {min_images!r}.")
  val_fraction = spec.val_fraction if protocol.val_fraction is None else protocol.val_fraction
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction!r}.")
  counts = np.bincount(raw_labels[raw_labels >= 0], minlength=len(class_names or ()))
  if spec.folder:
    if bool(protocol.train_classes) != bool(protocol.test_classes):
      raise ValueError("Give both train_classes and test_classes, or neither.")
    if protocol.train_classes:
      index = {n: i for i, n in enumerate(class_names)}
      missing = [c for c in protocol.train_classes + protocol.test_classes if c not in index]
      if missing:
        raise ValueError(f"{spec.name}: no class folder named {', '.join(map(repr, missing[:5]))}.")
      overlap = set(protocol.train_classes) & set(protocol.test_classes)
      if overlap:
        raise ValueError(f"{spec.name}: classes in both train_classes and test_classes: "
                         f"{sorted(overlap)[:5]}.")
      train = np.sort([index[c] for c in protocol.train_classes])
      test = np.sort([index[c] for c in protocol.test_classes])
    else:
      fraction = spec.train_fraction if protocol.train_fraction is None else (
          protocol.train_fraction)
      if not 0 < fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1); got {fraction!r}.")
      kept = np.flatnonzero(counts >= min_images)
      if kept.size < 2:
        raise ValueError(
            f"{spec.name}: {kept.size} class{'' if kept.size == 1 else 'es'} with at least "
            f"{min_images} images (min_images_per_class); a folder dataset needs at least 2 "
            "classes (training and test classes are disjoint), each a subfolder of images.")
      cut = int(round(fraction * kept.size))
      train, test = kept[:cut], kept[cut:]
  else:
    if protocol.train_classes or protocol.test_classes or protocol.train_fraction is not None:
      raise ValueError(f"Dataset {spec.name!r} has a fixed class split; train_fraction, "
                       "train_classes and test_classes are for folder datasets.")
    present = np.flatnonzero(counts)
    train = present[(present >= spec.train_labels.start) & (present < spec.train_labels.stop)]
    test = present[(present >= spec.test_labels.start) & (present < spec.test_labels.stop)]
  train, test = (c[counts[c] >= min_images] for c in (train, test))
  num_val = int(round(val_fraction * train.size))
  if val_fraction > 0 and num_val < 2:
    raise ValueError(f"{spec.name}: val_fraction={val_fraction} of {train.size} training classes "
                     f"is {num_val} class(es); a validation split needs at least 2.")
  return {"train": train[:train.size - num_val], "val": train[train.size - num_val:],
          "test": test}


class Source:
  """The pooled examples of one dataset: labels of all of them, and readers for any subset.

  ``raw_labels`` are the labels as stored; ``labels`` the protocol's renumbering (training
  classes ``0 .. T-1``, then validation, then test; ``-1`` for dropped images), which is what
  batches carry. Readers compare what they read with ``raw_labels``.
  """

  def __init__(self, spec: DatasetSpec, labels: np.ndarray,
               split_ranges: tuple[tuple[str, int, int], ...],
               class_names: tuple[str, ...] | None = None):
    self.spec = spec
    self.raw_labels = labels  # int64[N], pooled order
    self.labels = labels
    self.split_ranges = split_ranges  # (tfds split, start, stop) in pooled positions
    self.class_names = class_names
    self.cache_id = id(self)  # Shared by the protocol views of one source.
    self._classes = {}  # Split -> its (renumbered) class ids; set by with_protocol.

  def with_protocol(self, protocol: Protocol) -> Source:
    """A view with ``protocol``'s splits and renumbered labels (same readers and caches)."""
    view = copy.copy(self)
    split = _split_classes(self.spec, protocol, self.raw_labels, self.class_names)
    view.split_classes = split
    num_train = split["train"].size
    others = np.concatenate([split["val"], split["test"]])
    remap = np.full(max(int(self.raw_labels.max(initial=-1)) + 1, 1), -1, np.int64)
    if np.array_equal(split["train"], np.arange(num_train)) and np.all(others >= num_train):
      remap[np.arange(num_train)] = np.arange(num_train)  # Already 0 .. T-1: keep the ids.
      remap[others] = others
    else:
      order = np.concatenate([split["train"], others])
      remap[order] = np.arange(order.size)
    view.labels = np.where(self.raw_labels >= 0, remap[np.maximum(self.raw_labels, 0)], -1)
    view._classes = {name: remap[split[name]] for name in SPLITS}
    return view

  def positions(self, split: str) -> np.ndarray:
    """Sorted pooled positions of the examples of ``split`` (``"train"``, ``"val"``, ``"test"``)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {', '.join(SPLITS)} (the class-disjoint splits); "
                       f"got {split!r}.")
    return np.flatnonzero(np.isin(self.labels, self._classes[split]))

  def num_classes(self, split: str) -> int:
    return int(self._classes[split].size)

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
    super().__init__(_SPECS[_DIGITS], digits.target.astype(np.int64),
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

  def __init__(self, spec: DatasetSpec, data_dir, builder=None, class_names=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    self.spec = spec
    self.data_dir = data_dir
    self.builder = builder or tfds.builder(spec.tfds_name, data_dir=data_dir)
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
    super().__init__(spec, np.concatenate(labels), tuple(ranges), class_names)

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
    expected = self.raw_labels[positions]
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


class _FolderSource(_TfdsSource):
  """An image folder (:mod:`rankjax.data.image_folder`), prepared in ``data_dir`` on first use."""

  def __init__(self, spec: DatasetSpec, root: str, data_dir):
    builder = image_folder.prepare(root, data_dir)
    listing = builder._listing  # pylint: disable=protected-access
    if spec.expected is not None and (len(listing.classes), len(listing.files)) != spec.expected:
      raise ValueError(
          f"{listing.root} holds {len(listing.classes)} classes and {len(listing.files)} images; "
          f"dataset {spec.name!r} ({spec.description}) has {spec.expected[0]} and "
          f"{spec.expected[1]}. Is it the right folder? Any other folder is 'folder:PATH'.")
    spec = dataclasses.replace(
        spec, tfds_name=image_folder.BUILDER_NAME, splits=(image_folder.SPLIT,),
        label_key=image_folder.LABEL_KEY,
        num_channels=int(builder.info.metadata["num_channels"]))
    super().__init__(spec, data_dir, builder=builder, class_names=listing.classes)
    self.root = listing.root


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


def get_source(name: str, data_dir=None, protocol=None) -> Source:
  """The (cached) :class:`Source` of dataset ``name`` in ``data_dir``, split by ``protocol``.

  Args:
    name: a dataset name (:func:`parse_name`).
    data_dir: the TFDS data directory (``None``: TFDS's default); for a named folder dataset
      given without a path, also where its folder is (``data_dir/<folder_name>``).
    protocol: a :class:`Protocol` (or a mapping of its fields); ``None``: the dataset's defaults.
  """
  spec, root = parse_name(name)
  protocol = Protocol.from_config(protocol)
  if data_dir is not None and not os.fspath(data_dir):
    data_dir = None  # An empty config field means TFDS's default directory.
  if spec.folder and root is None:
    if data_dir is None:
      raise ValueError(f"Dataset {name!r} reads its folder {spec.folder_name!r} from data_dir, "
                       "which is not set. " + _FOLDER_HINT.format(name=name,
                                                                  folder=spec.folder_name))
    root = os.path.join(os.path.expanduser(os.fspath(data_dir)), spec.folder_name)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"Dataset {name!r} ({spec.description}) reads {root}, which does "
                              "not exist. " + _FOLDER_HINT.format(name=name,
                                                                  folder=spec.folder_name))
  key = (spec.name, _data_dir_key(data_dir) if spec.tfds_name or spec.folder else None,
         _data_dir_key(root) if root else None)
  if key not in _SOURCES:
    _check_has_data(spec)
    if spec.folder:
      _SOURCES[key] = _FolderSource(spec, root, data_dir)
    elif spec.tfds_name is None:
      _SOURCES[key] = _DigitsSource()
    else:
      logging.info("Reading the labels of %s (%s) from data_dir=%s.", name, spec.tfds_name,
                   data_dir)
      _SOURCES[key] = _TfdsSource(spec, data_dir)
  view_key = (key, protocol)
  if view_key not in _SOURCES:
    view = _SOURCES[key].with_protocol(protocol)
    _SOURCES[view_key] = view
    _log_split(name, view)
  return _SOURCES[view_key]


def _log_split(name: str, source: Source) -> None:
  counts = np.bincount(source.raw_labels[source.raw_labels >= 0])
  dropped = np.setdiff1d(np.flatnonzero(counts), np.concatenate(list(
      source.split_classes.values())))
  parts = [f"{s} {source.num_classes(s):,} classes / {source.positions(s).size:,} images"
           for s in SPLITS]
  names = ([source.class_names[i] for i in dropped] if source.class_names
           else [str(i) for i in dropped])
  logging.info("Dataset %s (%s): %s.%s", name, source.spec.description or source.spec.name,
               "; ".join(parts),
               f" Dropped {dropped.size:,} classes ({int(counts[dropped].sum()):,} images) with "
               f"fewer images than min_images_per_class: {', '.join(names[:20])}"
               f"{', ...' if len(names) > 20 else ''}." if dropped.size else "")


def cached_array(source: Source, kind: str, positions: np.ndarray, image_size=None, *,
                 slice_reads: bool = False) -> np.ndarray:
  """``source.decoded`` / ``source.encoded`` of ``positions``, cached (a few entries, LRU).

  ``slice_reads``: read through per-host read instructions (``split[lo:hi]``); the result is
  the same either way.
  """
  key = (source.cache_id, kind, image_size, positions.size, hash(positions.tobytes()))
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


def get_dataset_info(name: str, *, data_dir=None, protocol=None) -> DatasetInfo:
  """Protocol, preprocessing defaults and the class / image counts of dataset ``name``.

  The counts come from the data (one pass over the labels, cached per process), so a TFDS
  dataset must be prepared in ``data_dir`` (``None``: TFDS's default directory); a folder is
  prepared there on first use. ``protocol``: see :func:`get_source`.

  Raises:
    ValueError: unknown ``name``, a bad folder or protocol.
    DatasetNotPreparedError: the TFDS dataset is not in ``data_dir``.
  """
  source = get_source(name, data_dir, protocol)
  spec = source.spec
  count = {s: int(source.positions(s).size) for s in SPLITS}
  return DatasetInfo(
      name=name, tfds_name=spec.tfds_name, num_channels=spec.num_channels,
      grayscale=spec.num_channels == 1, image_size=spec.image_size,
      train_classes=source.num_classes("train"), val_classes=source.num_classes("val"),
      test_classes=source.num_classes("test"), num_train_examples=count["train"],
      num_val_examples=count["val"], num_test_examples=count["test"], augment=spec.augment,
      crop_fraction=spec.crop_fraction, resize_method=spec.resize_method,
      description=spec.description)
