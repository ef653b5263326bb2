"""Pipeline tests on the real TFDS builders' features (mock records) and on scikit-learn digits."""

import collections
import logging

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from rankjax import data
from rankjax.data import testing

P, K, S = 8, 4, 32


def _fingerprint(image):
  return np.round(image * 1000).astype(np.int32).tobytes()


def _check_p_by_k(batch, p, k, allowed):
  labels = batch["label"]
  assert labels.dtype == np.int32 and labels.shape == (p * k,)
  table = labels.reshape(p, k)
  assert np.all(table == table[:, :1]) and len(set(table[:, 0].tolist())) == p
  assert set(labels.tolist()) <= set(allowed)
  assert batch["image"].dtype == np.float32 and np.all(np.isfinite(batch["image"]))


def _eval_all(name, **kwargs):
  images, labels, batches = [], [], 0
  for batch in data.eval_batches(name, **kwargs):
    batches += 1
    assert batch["mask"].dtype == np.bool_
    assert np.all(batch["label"][~batch["mask"]] == data.PADDING_LABEL)
    images.extend(batch["image"][batch["mask"]])
    labels.extend(batch["label"][batch["mask"]].tolist())
  return images, labels, batches


@pytest.fixture(scope="module")
def cub():
  with testing.mock_data("cub200", examples_per_class=(3, 7), seed=0) as records:
    yield records


def _expected_eval(records, labels, image_size, name="cub200"):
  """Each record of the class range, in pooled order, preprocessed independently of the pipeline."""
  chosen = [r for split in ("train", "test") for r in records[split] if r.label in labels]
  images = [data.preprocess_for_eval(tf.io.decode_image(r.image, channels=3).numpy(), name=name,
                                     image_size=image_size) for r in chosen]
  return images, [r.label for r in chosen]


def test_cub_splits_are_disjoint_and_complete(cub):
  info = data.get_dataset_info("cub200")
  counts = collections.Counter(r.label for split in cub.values() for r in split)
  assert sorted(counts) == list(range(200))  # The fake data has all 200 classes.
  # The validation split is the last 20% of the training classes.
  assert (info.train_classes, info.val_classes, info.test_classes) == (80, 20, 100)
  assert info.num_train_examples == sum(v for c, v in counts.items() if c < 80)
  assert info.num_val_examples == sum(v for c, v in counts.items() if 80 <= c < 100)
  assert info.num_test_examples == sum(v for c, v in counts.items() if c >= 100)
  _, train_labels, _ = _eval_all("cub200", batch_size=256, image_size=S, split="train")
  _, val_labels, _ = _eval_all("cub200", batch_size=256, image_size=S, split="val")
  _, test_labels, _ = _eval_all("cub200", batch_size=256, image_size=S)
  assert set(train_labels) == set(range(80)) and set(val_labels) == set(range(80, 100))
  assert set(test_labels) == set(range(100, 200))
  whole = data.get_dataset_info("cub200", protocol=data.Protocol(val_fraction=0.0))
  assert (whole.train_classes, whole.val_classes) == (100, 0)


def test_eval_yields_every_test_image_once_in_order(cub):
  expected_images, expected_labels = _expected_eval(cub, range(100, 200), S)
  images, labels, batches = _eval_all("cub200", batch_size=64, image_size=S)
  assert batches == -(-len(expected_labels) // 64)
  assert labels == expected_labels
  np.testing.assert_allclose(np.stack(images), np.stack(expected_images), atol=1e-5)


def test_train_batches_p_by_k_deterministic_and_resumable(cub):
  kwargs = dict(classes_per_batch=P, samples_per_class=K, image_size=S, seed=3)
  first = [next(it) for it in [data.train_batches("cub200", **kwargs)] for _ in range(5)]
  for batch in first:
    _check_p_by_k(batch, P, K, range(100))
    assert batch["image"].shape == (P * K, S, S, 3)
  again = data.train_batches("cub200", **kwargs)
  for batch in first:
    other = next(again)
    np.testing.assert_array_equal(other["label"], batch["label"])
    np.testing.assert_array_equal(other["image"], batch["image"])
  resumed = data.train_batches("cub200", start_step=3, **kwargs)
  for batch in first[3:]:
    other = next(resumed)
    np.testing.assert_array_equal(other["label"], batch["label"])
    np.testing.assert_array_equal(other["image"], batch["image"])
  reseeded = next(data.train_batches("cub200", **{**kwargs, "seed": 4}))
  assert not np.array_equal(reseeded["image"], first[0]["image"])


def test_one_epoch_covers_every_training_image(cub):
  all_train, labels, _ = _eval_all("cub200", batch_size=256, image_size=S, split="train")
  steps = data.epoch_steps("cub200", classes_per_batch=P, samples_per_class=K)
  batches = data.train_batches("cub200", classes_per_batch=P, samples_per_class=K,
                               image_size=S, seed=0, augment=False)
  seen = set()
  for _ in range(steps):
    batch = next(batches)
    _check_p_by_k(batch, P, K, range(100))
    seen.update(_fingerprint(image) for image in batch["image"])
  assert seen == {_fingerprint(image) for image in all_train}
  assert len(labels) == len(set(_fingerprint(i) for i in all_train))  # Distinct fake images.


def test_multi_host_global_batches_and_eval_shards(cub):
  kwargs = dict(classes_per_batch=P, samples_per_class=K, image_size=S, seed=1)
  hosts = [data.train_batches("cub200", process_index=h, process_count=2, **kwargs)
           for h in range(2)]
  host_classes = [set(), set()]
  for _ in range(4):
    parts = [next(it) for it in hosts]
    for h, part in enumerate(parts):
      _check_p_by_k(part, P // 2, K, range(100))
      host_classes[h].update(part["label"].tolist())
    global_batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}
    _check_p_by_k(global_batch, P, K, range(100))
  assert not host_classes[0] & host_classes[1]
  # Each host evaluates its contiguous shard (read with its own read instructions); in host
  # order the shards are the single-host pass, and both hosts yield the same number of batches.
  single_images, single_labels, _ = _eval_all("cub200", batch_size=64, image_size=S)
  shards = [_eval_all("cub200", batch_size=64, image_size=S, process_index=h, process_count=2)
            for h in range(2)]
  assert shards[0][2] == shards[1][2]
  assert shards[0][1] + shards[1][1] == single_labels
  np.testing.assert_allclose(np.stack(shards[0][0] + shards[1][0]), np.stack(single_images),
                             atol=1e-6)


def test_small_classes_sampled_with_replacement_warn_once(cub, caplog):
  counts = collections.Counter(r.label for split in cub.values() for r in split if r.label < 80)
  small = sum(1 for c in counts.values() if c < 6)
  with caplog.at_level(logging.WARNING):
    batches = data.train_batches("cub200", classes_per_batch=P, samples_per_class=6,
                                 image_size=S, seed=0)
    data.train_batches("cub200", classes_per_batch=P, samples_per_class=6, image_size=S, seed=1)
  warnings = [r.getMessage() for r in caplog.records if "with replacement" in r.getMessage()]
  assert warnings == [f"cub200: {small} of 80 training classes have fewer than "
                      "samples_per_class=6 images; they are sampled with replacement."]
  _check_p_by_k(next(batches), P, 6, range(80))


def test_argument_errors(cub):
  kwargs = dict(image_size=S, seed=0)
  with pytest.raises(ValueError, match="Unknown dataset name='cub'"):
    data.train_batches("cub", classes_per_batch=P, samples_per_class=K, **kwargs)
  with pytest.raises(ValueError, match=r"classes_per_batch=81 exceeds the 80 training classes "
                     r"of 'cub200'.*N-pairs"):
    data.train_batches("cub200", classes_per_batch=81, samples_per_class=2, **kwargs)
  with pytest.raises(ValueError, match="samples_per_class=1: a ranking loss needs K >= 2"):
    data.train_batches("cub200", classes_per_batch=P, samples_per_class=1, **kwargs)
  with pytest.raises(ValueError, match="classes_per_batch=7 is not divisible by process_count=2"):
    data.train_batches("cub200", classes_per_batch=7, samples_per_class=K, process_index=0,
                       process_count=2, **kwargs)
  with pytest.raises(ValueError, match="batch_size=9 is not divisible by process_count=2"):
    data.eval_batches("cub200", batch_size=9, image_size=S, process_index=1, process_count=2)
  with pytest.raises(ValueError, match="split must be one of train, val, test"):
    data.eval_batches("cub200", batch_size=8, image_size=S, split="validation")
  with pytest.raises(ValueError, match="augment has unknown keys"):
    data.train_batches("cub200", classes_per_batch=P, samples_per_class=K, augment={"crop": 1},
                       **kwargs)


def test_plain_tfds_mock_data_is_enough_for_one_host():
  # The default tfds.testing.mock_data (random labels, same records in every split, slices
  # ignored) still feeds valid single-host batches; other modules' tests may rely on it.
  data.clear_cache()
  try:
    with tfds.testing.mock_data(num_examples=400):
      info = data.get_dataset_info("cub200")
      assert (info.num_train_examples + info.num_val_examples + info.num_test_examples
              == 800)  # train + test records
      batch = next(data.train_batches("cub200", classes_per_batch=4, samples_per_class=2,
                                      image_size=16, seed=0))
      _check_p_by_k(batch, 4, 2, range(100))
      _, labels, _ = _eval_all("cub200", batch_size=100, image_size=16)
      assert len(labels) == info.num_test_examples
  finally:
    data.clear_cache()


def test_cars196_label_boundary():
  with testing.mock_data("cars196", examples_per_class=(2, 3), seed=1) as records:
    info = data.get_dataset_info("cars196")
    assert (info.train_classes, info.val_classes, info.test_classes) == (78, 20, 98)
    batch = next(data.train_batches("cars196", classes_per_batch=78, samples_per_class=2,
                                    image_size=16, seed=0))
    _check_p_by_k(batch, 78, 2, range(78))  # All 78 training classes, 0-77, in one batch.
    _, labels, _ = _eval_all("cars196", batch_size=128, image_size=16, split="val")
    assert set(labels) == set(range(78, 98))
    _, labels, _ = _eval_all("cars196", batch_size=128, image_size=16)
    assert set(labels) == set(range(98, 196))
    assert len(labels) == sum(1 for s in records.values() for r in s if r.label >= 98)


def test_sop_uses_its_own_splits():
  with testing.mock_data("sop", num_train_classes=40, num_test_classes=30,
                         examples_per_class=(2, 5), seed=2) as records:
    assert {r.label for r in records["train"]} == set(range(40))
    info = data.get_dataset_info("sop")
    assert (info.train_classes, info.val_classes, info.test_classes) == (32, 8, 30)
    assert info.num_train_examples + info.num_val_examples == len(records["train"])
    assert info.num_test_examples == len(records["test"])
    batch = next(data.train_batches("sop", classes_per_batch=10, samples_per_class=4,
                                    image_size=16, seed=0))
    _check_p_by_k(batch, 10, 4, range(32))
    _, labels, _ = _eval_all("sop", batch_size=32, image_size=16)
    assert labels == [r.label for r in records["test"]]
    assert min(labels) >= 11318


def test_digits_protocol_and_pixels():
  digits = sk_datasets.load_digits()
  counts = np.bincount(digits.target)
  info = data.get_dataset_info("digits")
  assert (info.train_classes, info.test_classes) == (5, 5)
  assert info.num_train_examples == counts[:5].sum() and info.num_test_examples == counts[5:].sum()
  # At image_size=8 there is no resize: the eval images are round(v * 255 / 16), normalised.
  images, labels, batches = _eval_all("digits", batch_size=100, image_size=8)
  test = digits.target >= 5
  expected = np.round(digits.images[test] * 255 / 16) / 127.5 - 1
  assert labels == digits.target[test].tolist() and batches == -(-test.sum() // 100)
  np.testing.assert_allclose(np.stack(images)[..., 0], expected, atol=1e-6)
  batches = data.train_batches("digits", classes_per_batch=5, samples_per_class=3, image_size=16,
                               seed=0)
  for _ in range(3):
    batch = next(batches)
    _check_p_by_k(batch, 5, 3, range(5))
    assert batch["image"].shape == (15, 16, 16, 1)
  # The numpy fast path applies exactly preprocess_for_eval.
  raw = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  train_images, train_labels, _ = _eval_all("digits", batch_size=1000, image_size=16,
                                            split="train")
  np.testing.assert_allclose(
      np.stack(train_images),
      data.preprocess_for_eval(raw[digits.target < 5], name="digits", image_size=16), atol=1e-6)
  assert train_labels == digits.target[digits.target < 5].tolist()


def test_augmentation_options_on_an_in_memory_dataset():
  kwargs = dict(classes_per_batch=5, samples_per_class=2, image_size=16, seed=0)
  plain = next(data.train_batches("digits", **kwargs))
  augmented = [next(data.train_batches("digits", augment=a, **kwargs))
               for a in (True, {"scale": (0.5, 1.0), "flip": False}, data.Augment(flip=False))]
  for batch in augmented:
    _check_p_by_k(batch, 5, 2, range(5))
    np.testing.assert_array_equal(batch["label"], plain["label"])  # Same schedule.
    assert batch["image"].shape == (10, 16, 16, 1)
    assert not np.array_equal(batch["image"], plain["image"])
  again = next(data.train_batches("digits", augment=True, **kwargs))
  np.testing.assert_array_equal(again["image"], augmented[0]["image"])
  assert not np.array_equal(augmented[1]["image"], augmented[2]["image"])
  disabled = next(data.train_batches("digits", augment={"enabled": False}, **kwargs))
  np.testing.assert_array_equal(disabled["image"], plain["image"])


@pytest.mark.parametrize("augment", [False, True])
def test_data_shards_make_the_global_batch_independent_of_the_process_count(augment):
  # One process holding both data shards yields what two processes, one shard each, yield
  # together: the same classes, images and (augmented) crops, in the same order.
  kwargs = dict(classes_per_batch=4, samples_per_class=3, image_size=16, seed=3, augment=augment,
                num_shards=2)
  alone = data.train_batches("digits", process_index=0, process_count=1, **kwargs)
  pair = [data.train_batches("digits", process_index=h, process_count=2, **kwargs)
          for h in range(2)]
  for _ in range(3):
    parts = [next(it) for it in pair]
    batch = next(alone)
    _check_p_by_k(batch, 4, 3, range(5))
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    assert set(parts[0]["label"].tolist()) <= {0, 2, 4} and set(parts[1]["label"]) <= {1, 3}
  # The default, one shard per process, is the single-shard schedule on one process.
  default = next(data.train_batches("digits", **{**kwargs, "num_shards": None}))
  one = next(data.train_batches("digits", **{**kwargs, "num_shards": 1}))
  np.testing.assert_array_equal(default["image"], one["image"])


def test_data_shard_errors():
  kwargs = dict(samples_per_class=2, image_size=16, seed=0)
  with pytest.raises(ValueError, match="num_shards=3 is not a multiple of process_count=2"):
    data.train_batches("digits", classes_per_batch=3, num_shards=3, process_index=0,
                       process_count=2, **kwargs)
  with pytest.raises(ValueError, match="classes_per_batch=5 is not divisible by num_shards=2"):
    data.train_batches("digits", classes_per_batch=5, num_shards=2, **kwargs)
  with pytest.raises(ValueError, match="num_shards must be >= 1; got 0"):
    data.train_batches("digits", classes_per_batch=4, num_shards=0, **kwargs)
