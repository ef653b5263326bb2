r"""Fake TFDS data for tests and benchmarks: ``mock_data(name)`` on the real builders' features.

``tfds.testing.mock_data`` replaces a builder's records with random ones drawn from its real
feature spec, but its default generator yields the same records for every split, ignores slices
(``train[10:20]``) and draws labels uniformly at random. The zero-shot protocol needs more:
this context manager keeps ``tfds.testing.mock_data``'s patching (no files, no download, the real
``FeaturesDict`` encodes and decodes every record) and supplies records that follow each
dataset's protocol:

* cub200 / cars196: every class (of both halves) has images in both TFDS splits, as the real
  ones do;
* sop / omniglot: the TFDS train split holds the training classes, test the test classes;
* each split is in a random (fixed) order and honours slices, so per-host read instructions
  can be tested.

Example::

  >>> from rankjax import data
  >>> from rankjax.data import testing
  >>> with testing.mock_data("cub200", examples_per_class=(4, 8)):
  ...   info = data.get_dataset_info("cub200")
  >>> info.train_classes, info.val_classes, info.test_classes
  (80, 20, 100)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import types
from typing import Callable

import numpy as np
import tensorflow as tf

from rankjax.data import datasets


@dataclasses.dataclass(frozen=True)
class FakeRecord:
  """One fake record: the encoded image, its label and its TFDS split."""
  image: bytes
  label: int
  split: str


def random_jpeg(rng: np.random.Generator, height: int, width: int, channels: int = 3,
                quality: int = 90) -> bytes:
  """A smooth random colour image (upsampled noise plus gradients) encoded as JPEG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), channels))
  image = Image.fromarray(coarse.astype(np.uint8).squeeze()).resize((width, height),
                                                                    Image.BILINEAR)
  array = np.asarray(image, np.float32).reshape(height, width, channels)
  array += rng.normal(0, 12, size=array.shape)  # Texture, so the JPEG is not trivially small.
  buffer = io.BytesIO()
  Image.fromarray(np.clip(array, 0, 255).astype(np.uint8).squeeze()).save(
      buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def random_png(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> bytes:
  """Random binary ink on white paper (Omniglot-like), encoded as PNG."""
  ink = rng.uniform(size=(height, width)) < 0.1
  return tf.io.encode_png(np.repeat(np.where(ink, 0, 255).astype(np.uint8)[..., None],
                                    channels, axis=-1)).numpy()


def make_records(name: str, *, num_train_classes: int | None = None,
                 num_test_classes: int | None = None, examples_per_class=(2, 6),
                 image_fn: Callable[[np.random.Generator, int], bytes] | None = None,
                 seed: int = 0) -> dict[str, list[FakeRecord]]:
  """Fake records of dataset ``name`` per TFDS split, following the dataset's protocol.

  Args:
    name: a TFDS-backed rankjax dataset (cub200, cars196, sop, omniglot).
    num_train_classes, num_test_classes: how many classes of each half to use (the first ones of
      each label range; default: all of them).
    examples_per_class: an int, or an inclusive range ``(low, high)`` drawn per class.
    image_fn: ``(rng, record_index) -> encoded image bytes``; default: small random JPEGs
      (105 x 105 PNGs for omniglot, whose feature has that fixed shape).
    seed: seed of everything random here.
  """
  spec = datasets.get_spec(name)
  if spec.tfds_name is None:
    raise ValueError(f"{name!r} is not a TFDS dataset.")
  rng = np.random.default_rng(seed)
  if image_fn is None:
    if name == "omniglot":
      image_fn = lambda r, i: random_png(r, 105, 105)
    else:
      image_fn = lambda r, i: random_jpeg(r, int(r.integers(12, 48)), int(r.integers(12, 48)))
  low, high = ((examples_per_class, examples_per_class)
               if isinstance(examples_per_class, int) else examples_per_class)
  halves = [(spec.train_labels, num_train_classes, "train"),
            (spec.test_labels, num_test_classes, "test")]
  # Real CUB / Cars split every class between both TFDS splits; SOP / Omniglot split by class.
  mixed = name in ("cub200", "cars196")
  records = {s: [] for s in spec.splits}
  index = 0
  for labels, count, split in halves:
    for label in labels[:count]:
      for _ in range(int(rng.integers(low, high + 1))):
        where = spec.splits[int(rng.integers(2))] if mixed else split
        records[where].append(FakeRecord(image_fn(rng, index), int(label), where))
        index += 1
  for split in records:
    order = rng.permutation(len(records[split]))
    records[split] = [records[split][i] for i in order]
  return records


def _as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False, *,
                tfds_name, records, label_key, **kwargs):
  """Replaces ``FileReaderBuilder._as_dataset``: reads ``records`` through the real features."""
  del read_config, shuffle_files, kwargs
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  if builder.name != tfds_name:
    raise ValueError(f"rankjax.data.testing.mock_data mocks {tfds_name!r}, not {builder.name!r}.")
  sizes = {s: types.SimpleNamespace(num_examples=len(r), shard_lengths=[len(r)])
           for s, r in records.items()}
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  chosen = [r for ins in instructions for r in records[ins.splitname][ins.from_:ins.to]]

  features = builder.info.features
  if isinstance(decoders, tfds.decode.PartialDecoding):
    features = decoders.extract_features(features)
    decoders = decoders.decoders
  generator = mocking.RandomFakeGenerator(features, num_examples=len(chosen))

  def examples():
    for i, record in enumerate(chosen):
      example = generator[i]  # Random values for the features other than image and label.
      if "image" in example:
        example["image"] = record.image
      if label_key in example:
        example[label_key] = record.label
      yield features.encode_example(example)

  specs = features.get_serialized_info()
  ds = tf.data.Dataset.from_generator(
      examples, output_signature=tf.nest.map_structure(
          lambda t: tf.TensorSpec(t.shape, t.dtype), specs))
  ds = ds.apply(tf.data.experimental.assert_cardinality(len(chosen)))
  return ds.map(functools.partial(features.decode_example, decoders=decoders))


@contextlib.contextmanager
def mock_data(name: str, *, records: dict[str, list[FakeRecord]] | None = None, **kwargs):
  """Within the context, TFDS serves fake records of dataset ``name`` (see :func:`make_records`).

  Args:
    name: a TFDS-backed rankjax dataset.
    records: the records per TFDS split; default ``make_records(name, **kwargs)``.
    **kwargs: passed to :func:`make_records`.

  The rankjax data caches are cleared on entry and exit, so nothing read from the fake data
  outlives it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = datasets.get_spec(name)
  if records is None:
    records = make_records(name, **kwargs)

  def as_dataset(builder, *args, **kw):
    return _as_dataset(builder, *args, tfds_name=spec.tfds_name, records=records,
                       label_key=spec.label_key, **kw)

  datasets.clear_cache()
  try:
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_dataset_fn=as_dataset):
      yield records
  finally:
    datasets.clear_cache()

