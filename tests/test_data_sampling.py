"""Tests of the P x K index sampler, host class partitions and evaluation shards (pure numpy)."""

import collections

import numpy as np
import pytest

from rankjax.data import sampling


def _batch_table(sampler, labels, step, p, k):
  """The batch of ``step`` as a [P, K] table of labels, checking the P x K structure."""
  idx = sampler.batch_indices(step)
  assert idx.shape == (p * k,) and idx.dtype == np.int64
  table = labels[idx].reshape(p, k)
  assert np.all(table == table[:, :1]), "each class must fill K consecutive slots"
  assert len(set(table[:, 0].tolist())) == p, "the P classes of a batch must be distinct"
  return idx


def test_docstring_example_and_exact_epoch():
  # 6 classes x 4 images, P = 3, K = 2: a class epoch is 2 steps, a sample epoch 2 chunks, so
  # 4 steps x 6 images = 24 draws cover each of the 24 images exactly once.
  labels = np.repeat(np.arange(6), 4)
  sampler = sampling.ClassBalancedSampler(labels, classes_per_batch=3, samples_per_class=2,
                                          seed=0)
  assert sampler.steps_per_class_epoch == 2 and sampler.steps_per_epoch == 4
  drawn = np.concatenate([_batch_table(sampler, labels, s, 3, 2) for s in range(4)])
  np.testing.assert_array_equal(np.sort(drawn), np.arange(24))
  # The next epoch again covers everything exactly once, in another order.
  drawn2 = np.concatenate([sampler.batch_indices(s) for s in range(4, 8)])
  np.testing.assert_array_equal(np.sort(drawn2), np.arange(24))
  assert not np.array_equal(drawn, drawn2)


def test_every_class_once_per_class_epoch_with_top_up():
  # 10 classes, P = 4: class epochs of 3 steps, the last topped up with 2 extra classes.
  labels = np.repeat(np.arange(10), 6)
  sampler = sampling.ClassBalancedSampler(labels, classes_per_batch=4, samples_per_class=2,
                                          seed=3)
  assert sampler.steps_per_class_epoch == 3
  for class_epoch in range(4):
    steps = range(3 * class_epoch, 3 * class_epoch + 3)
    classes = [labels[_batch_table(sampler, labels, s, 4, 2)][::2] for s in steps]
    counts = collections.Counter(np.concatenate(classes).tolist())
    assert set(counts) == set(range(10))
    assert sum(counts.values()) == 12 and max(counts.values()) <= 2


def test_one_epoch_covers_every_image_with_unequal_classes():
  rng = np.random.default_rng(0)
  sizes = rng.integers(2, 15, size=37)
  labels = np.repeat(np.arange(37) * 7 + 3, sizes)  # Sparse, non-contiguous class ids.
  rng.shuffle(labels)
  p, k = 8, 3
  sampler = sampling.ClassBalancedSampler(labels, classes_per_batch=p, samples_per_class=k,
                                          seed=11)
  # ceil(37 / 8) = 5 steps per class epoch; the largest class (14) needs ceil(14 / 3) = 5 visits.
  assert sampler.steps_per_epoch == 5 * int(np.ceil(sizes.max() / k))
  seen = np.concatenate([_batch_table(sampler, labels, s, p, k)
                         for s in range(sampler.steps_per_epoch)])
  assert set(seen.tolist()) == set(range(labels.size))


def test_samples_in_a_chunk_are_distinct_and_classes_smaller_than_k_repeat_evenly():
  labels = np.array([0] * 2 + [1] * 7 + [2] * 3 + [3] * 9)
  sampler = sampling.ClassBalancedSampler(labels, classes_per_batch=2, samples_per_class=4,
                                          seed=5)
  assert sampler.num_classes_smaller_than_k == 2  # classes 0 (2 images) and 2 (3 images)
  for step in range(40):
    idx = _batch_table(sampler, labels, step, 2, 4).reshape(2, 4)
    for chunk in idx:
      n = int(np.sum(labels == labels[chunk[0]]))
      counts = np.bincount(chunk, minlength=labels.size)[chunk]
      if n >= 4:
        assert np.all(counts == 1)
      else:  # With replacement, as evenly as possible: each image ceil(4/n) or floor(4/n) times.
        assert set(collections.Counter(chunk.tolist()).values()) <= {4 // n, -(-4 // n)}
        assert len(set(chunk.tolist())) == n


def test_deterministic_and_resumable_at_any_step():
  labels = np.repeat(np.arange(23), 5)
  make = lambda seed: sampling.ClassBalancedSampler(
      labels, classes_per_batch=6, samples_per_class=2, seed=seed)
  sequential = make(7)
  straight = [sequential.batch_indices(s) for s in range(60)]
  # A fresh sampler asked for step 37 first (a resumed run) gives the same batches from there.
  resumed = make(7)
  for s in range(37, 60):
    np.testing.assert_array_equal(resumed.batch_indices(s), straight[s])
  # Random access in any order, too.
  other = make(7)
  for s in [59, 3, 41, 0, 22]:
    np.testing.assert_array_equal(other.batch_indices(s), straight[s])
  different = make(8)
  assert any(not np.array_equal(different.batch_indices(s), straight[s]) for s in range(5))
  tuple_seed = sampling.ClassBalancedSampler(labels, classes_per_batch=6, samples_per_class=2,
                                             seed=(7, 1, 0))
  assert any(not np.array_equal(tuple_seed.batch_indices(s), straight[s]) for s in range(5))


def test_sampler_rejects_bad_arguments():
  labels = np.repeat(np.arange(4), 3)
  with pytest.raises(ValueError, match="classes_per_batch=5 exceeds the 4 classes"):
    sampling.ClassBalancedSampler(labels, classes_per_batch=5, samples_per_class=2, seed=0)
  with pytest.raises(ValueError, match="samples_per_class must be >= 1"):
    sampling.ClassBalancedSampler(labels, classes_per_batch=2, samples_per_class=0, seed=0)
  with pytest.raises(ValueError, match="rank-1 integer"):
    sampling.ClassBalancedSampler(labels.astype(float), classes_per_batch=2,
                                  samples_per_class=2, seed=0)
  with pytest.raises(ValueError, match="seed must be an integer"):
    sampling.ClassBalancedSampler(labels, classes_per_batch=2, samples_per_class=2, seed=1.5)
  sampler = sampling.ClassBalancedSampler(labels, classes_per_batch=2, samples_per_class=2,
                                          seed=0)
  with pytest.raises(ValueError, match="step must be >= 0"):
    sampler.batch_indices(-1)


def test_partition_classes_round_robin_and_disjoint():
  classes = np.array([9, 2, 5, 7, 0, 4, 1])
  parts = [sampling.partition_classes(classes, h, 3) for h in range(3)]
  # Sorted: 0 1 2 4 5 7 9 -> host 0: 0 4 9; host 1: 1 5; host 2: 2 7.
  np.testing.assert_array_equal(parts[0], [0, 4, 9])
  np.testing.assert_array_equal(parts[1], [1, 5])
  np.testing.assert_array_equal(parts[2], [2, 7])


def test_even_shard_matches_tfds_even_splits_sizes():
  assert [sampling.even_shard(10, h, 3) for h in range(3)] == [(0, 4), (4, 7), (7, 10)]
  assert [sampling.even_shard(2, h, 4) for h in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
  assert sampling.even_shard(7, 0, 1) == (0, 7)


def test_check_process():
  assert sampling.check_process(1, 2) == (1, 2)
  assert sampling.check_process(None, None) == (0, 1)  # This single JAX process.
  with pytest.raises(ValueError, match="process_index must be an integer in"):
    sampling.check_process(2, 2)
  with pytest.raises(ValueError, match="process_count must be an integer >= 1"):
    sampling.check_process(0, 0)
