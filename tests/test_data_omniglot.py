"""Omniglot end to end: the npz -> TFDS conversion and the pipelines on the real 32,460 images."""

import collections
import fcntl
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rankjax import data
from rankjax.data import omniglot_from_npz

NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot_1623.npz")
P, K, S = 32, 4, 28


@pytest.fixture(scope="session")
def npz():
  if not os.path.exists(NPZ):
    pytest.skip(f"{NPZ} is not on this machine.")
  with np.load(NPZ) as f:
    return {k: f[k] for k in ("bits105", "images28", "label", "alphabet", "alphabet_names",
                              "character", "split")}


@pytest.fixture(scope="session")
def omniglot_dir(npz, tmp_path_factory):
  """Converts the npz once per test session, shared by pytest-xdist workers."""
  del npz  # Only to skip when the file is missing.
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # The folder all workers of this session share.
  data_dir = os.path.join(base, "omniglot_tfds")
  with open(data_dir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # One worker converts; the others then find it prepared.
    omniglot_from_npz.prepare(NPZ, data_dir)
  data.clear_cache()
  return data_dir


def _paper_ink(npz, rows):
  """The original 105 x 105 PNG pixels of ``rows``: paper 255, ink 0."""
  ink = np.unpackbits(npz["bits105"][rows], axis=1)[:, :105 * 105].reshape(-1, 105, 105)
  return np.where(ink == 1, 0, 255).astype(np.uint8)


def _to_uint8(images):
  """Inverse of the grayscale normalisation: [-1, 1] -> the uint8 pixel values."""
  return np.round((np.asarray(images)[..., 0] + 1) * 127.5).astype(np.uint8)


def _eval_all(**kwargs):
  images, labels = [], []
  for batch in data.eval_batches("omniglot", **kwargs):
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  return np.concatenate(images), np.concatenate(labels)


def test_converted_dataset_reads_like_tfds_omniglot(omniglot_dir, npz):
  builder = tfds.builder("omniglot", data_dir=omniglot_dir)
  assert builder.version == "3.0.0"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 19280, "test": 13180}
  features = builder.info.features
  assert features["image"].shape == (105, 105, 3) and features["label"].num_classes == 1623
  assert features["alphabet"].names == sorted(str(a) for a in npz["alphabet_names"])
  first_row = {int(label): i for i, label in reversed(list(enumerate(npz["label"])))}
  for split in ("train", "test"):
    ds = tfds.load("omniglot", split=f"{split}[:60]", data_dir=omniglot_dir, download=False)
    for ex in tfds.as_numpy(ds):
      label = int(ex["label"])
      assert (label < 964) == (split == "train")
      row = first_row[label]
      assert features["alphabet"].int2str(ex["alphabet"]) == str(
          npz["alphabet_names"][npz["alphabet"][row]])
      assert ex["alphabet_char_id"] == npz["character"][row] - 1
      assert features["label"].int2str(label) == (
          f"{npz['alphabet_names'][npz['alphabet'][row]]}_{npz['character'][row] - 1}")
      image = ex["image"]
      assert image.dtype == np.uint8 and image.shape == (105, 105, 3)
      np.testing.assert_array_equal(image[..., 0], image[..., 2])
      # The image is one of the 20 drawings of its character, pixel for pixel.
      drawings = _paper_ink(npz, np.flatnonzero(npz["label"] == label))
      assert np.any(np.all(drawings == image[None, ..., 0], axis=(1, 2)))


def test_info_p_by_k_determinism_and_resume(omniglot_dir):
  info = data.get_dataset_info("omniglot", data_dir=omniglot_dir)
  assert (info.train_classes, info.test_classes) == (964, 659)
  assert (info.num_train_examples, info.num_test_examples) == (19280, 13180)
  assert info.num_channels == 1 and info.grayscale and info.image_size == 28
  kwargs = dict(classes_per_batch=P, samples_per_class=K, image_size=S, seed=5,
                data_dir=omniglot_dir)
  straight = data.train_batches("omniglot", **kwargs)
  first = [next(straight) for _ in range(45)]
  for batch in first:
    assert batch["image"].shape == (P * K, S, S, 1) and batch["image"].dtype == np.float32
    table = batch["label"].reshape(P, K)
    assert np.all(table == table[:, :1]) and len(set(table[:, 0].tolist())) == P
    assert batch["label"].max() < 964
  again = data.train_batches("omniglot", **kwargs)
  resumed = data.train_batches("omniglot", start_step=40, **kwargs)
  for step, batch in enumerate(first):
    other = next(again)
    np.testing.assert_array_equal(other["image"], batch["image"])
    np.testing.assert_array_equal(other["label"], batch["label"])
    if step >= 40:
      other = next(resumed)
      np.testing.assert_array_equal(other["image"], batch["image"])
      np.testing.assert_array_equal(other["label"], batch["label"])


def test_epoch_covers_every_training_image_and_pixels_match_npz(omniglot_dir, npz):
  images, labels = _eval_all(batch_size=2048, image_size=S, split="train",
                             data_dir=omniglot_dir)
  pixels = _to_uint8(images)
  # Independent reference: the npz's area-averaged 28 x 28 images (ink 255), inverted.
  background = npz["split"] == 0
  expected = sorted(zip(npz["label"][background].tolist(),
                        [b.tobytes() for b in 255 - npz["images28"][background]]))
  assert sorted(zip(labels.tolist(), [p.tobytes() for p in pixels])) == expected

  steps = data.epoch_steps("omniglot", classes_per_batch=P, samples_per_class=K,
                           data_dir=omniglot_dir)
  assert steps == 31 * 5  # ceil(964 / 32) class-epoch steps x 20 / 4 chunks per character.
  batches = data.train_batches("omniglot", classes_per_batch=P, samples_per_class=K,
                               image_size=S, seed=0, data_dir=omniglot_dir)
  seen = collections.Counter()
  for _ in range(steps):
    batch = next(batches)
    seen.update(zip(batch["label"].tolist(), [p.tobytes() for p in _to_uint8(batch["image"])]))
  assert set(seen) == set(zip(labels.tolist(), [p.tobytes() for p in pixels]))


def test_eval_yields_each_test_image_once(omniglot_dir, npz):
  images, labels = _eval_all(batch_size=1000, image_size=S, data_dir=omniglot_dir)
  evaluation = npz["split"] == 1
  expected = sorted(zip(npz["label"][evaluation].tolist(),
                        [b.tobytes() for b in 255 - npz["images28"][evaluation]]))
  assert sorted(zip(labels.tolist(), [p.tobytes() for p in _to_uint8(images)])) == expected
  # preprocess_for_eval on the raw TFDS images (what rankjax.load_embedder feeds) is the same.
  raw = np.stack([ex["image"] for ex in tfds.as_numpy(tfds.load(
      "omniglot", split="test[:50]", data_dir=omniglot_dir, download=False))])
  np.testing.assert_allclose(data.preprocess_for_eval(raw, name="omniglot", image_size=S),
                             images[:50], atol=1e-6)


def test_not_prepared_errors_say_where_and_how(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.get_dataset_info("omniglot", data_dir=str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message and "python -m rankjax.data.omniglot_from_npz" in message
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build caltech_birds2011"):
    data.train_batches("cub200", classes_per_batch=4, samples_per_class=2, image_size=32,
                       seed=0, data_dir=str(tmp_path))
