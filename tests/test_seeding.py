"""One root key per seed: every stream of every seed is its own."""

import itertools

import jax
import numpy as np
import pytest

from rankjax import seeding


def test_streams_of_every_seed_differ():
  seeds = range(-2, 20)
  values = {(s, name): seeding.stream_seed(s, name) for s in seeds for name in seeding.STREAMS}
  assert len(set(values.values())) == len(values)  # No two (seed, stream) pairs share a seed.
  # The old scheme's overlap (seed s's augmentation key was seed s + 1's init key) is gone.
  for s in seeds:
    assert seeding.stream_seed(s, "device_augment") != seeding.stream_seed(s + 1, "init")
  keys = [jax.random.key_data(seeding.stream_key(s, n)).tolist()
          for s, n in itertools.product(range(5), seeding.STREAMS)]
  assert len({tuple(k) for k in keys}) == len(keys)


def test_streams_are_a_function_of_the_seed_and_name():
  assert seeding.stream_seed(3, "data") == seeding.stream_seed(3, "data")
  np.testing.assert_array_equal(jax.random.key_data(seeding.stream_key(3, "init")),
                                jax.random.key_data(jax.random.fold_in(
                                    jax.random.key(3), seeding._stream_id("init"))))
  assert 0 <= seeding.stream_seed(0, "nmi") < 2 ** 32


def test_bad_names_and_seeds():
  with pytest.raises(ValueError, match="Unknown random stream 'augment'"):
    seeding.stream_seed(0, "augment")
  with pytest.raises(ValueError, match="seed must be an integer"):
    seeding.stream_key(1.5, "init")
