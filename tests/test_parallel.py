"""Data parallelism: mesh, batch sharding, and one step on 8 devices == one step on 1 device."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import configs
from rankjax import parallel
from rankjax import train
from rankjax import optim
from rankjax import train_state


def test_mesh_spans_all_devices_on_one_data_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == jax.device_count() == 8  # conftest's fake CPU devices.


def test_global_batch_is_split_along_the_leading_axis():
  mesh = parallel.make_mesh()
  images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = parallel.global_batch({"image": images, "label": np.arange(16, dtype=np.int32)}, mesh)
  shards = batch["image"].addressable_shards
  assert len(shards) == 8
  for shard in shards:
    np.testing.assert_array_equal(np.asarray(shard.data), images[shard.index])
    assert shard.data.shape == (2, 3)
  np.testing.assert_array_equal(parallel.to_host(batch["image"]), images)


@pytest.mark.parametrize("size", [12, 100, 7])
def test_batch_not_divisible_by_device_count_is_a_clear_error(size):
  with pytest.raises(ValueError, match=f"batch of {size} is not divisible by 8 devices"):
    parallel.check_global_batch_size(size, parallel.make_mesh())


def test_ragged_batch_entries_are_an_error():
  with pytest.raises(ValueError, match="same leading size"):
    parallel.global_batch({"image": np.zeros((8, 2)), "label": np.zeros(16)}, parallel.make_mesh())


def _tiny_setup(loss_name):
  config = configs.with_loss(configs.base_config(), loss_name)
  config.model.name = "small_resnet"
  config.model.backbone_options.widths = (8, 8)
  config.model.backbone_options.stage_sizes = (1, 1)
  config.model.embedding_dim = 16
  config.image_size = 8
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.head_learning_rate = 0.5
  config.optimizer.weight_decay = 1e-3
  model = train.build_model(config, types.SimpleNamespace(num_channels=1))
  graphdef, _, params, model_state = train_state.split_model(model)
  tx, schedules = optim.make_optimizer(config.optimizer, params, total_steps=10)
  from rankjax import losses  # pylint: disable=g-import-not-at-top
  loss_fn = losses.get_loss(loss_name, **configs.loss_kwargs(config))
  step = train_state.make_train_step(graphdef, loss_fn, tx, schedules,
                                     train_state.diagnostics_kwargs(config))
  state = jax.device_get(train_state.init_state(params, model_state, tx))
  return graphdef, loss_fn, step, state


@pytest.mark.parametrize("loss_name", ["triplet_semihard", "npairs"])
def test_one_step_on_8_devices_equals_one_step_on_1_device(loss_name):
  """The loss sees the global batch: negatives come from every device, BatchNorm is global."""
  graphdef, loss_fn, step, state0 = _tiny_setup(loss_name)
  rng = np.random.default_rng(0)
  # 8 classes x 2: with 8 devices each device holds 2 images, so per-device losses would differ.
  labels = np.repeat(np.arange(8, dtype=np.int32), 2)
  batch = {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32), "label": labels}

  results = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    jitted, sharding = parallel.jit_data_parallel(step, state0, mesh)
    state = jax.device_put(state0, sharding)
    gbatch = parallel.global_batch(batch, mesh)
    assert len(gbatch["image"].sharding.device_set) == n
    for _ in range(2):  # Two steps: momentum and BatchNorm statistics carry over.
      state, metrics = jitted(state, gbatch)
    results[n] = jax.device_get((state, metrics))

  (state1, metrics1), (state8, metrics8) = results[1], results[8]
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5, atol=1e-5)
  flat1, tree1 = jax.tree.flatten(state1)
  flat8, tree8 = jax.tree.flatten(state8)
  assert tree1 == tree8
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)

  # And the loss is the loss of the whole batch's embeddings, computed without any sharding:
  # the second step's loss from the parameters after one step.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  jitted1, sharding1 = parallel.jit_data_parallel(step, state0, parallel.make_mesh(
      jax.devices()[:1]))
  after_one, _ = jitted1(jax.device_put(state0, sharding1), batch)
  model = nnx.merge(graphdef, after_one["params"], after_one["model_state"])
  expected = loss_fn(model(jnp.asarray(batch["image"])), jnp.asarray(labels))
  np.testing.assert_allclose(metrics8["loss"], expected, rtol=1e-5, atol=1e-6)
  # A per-device loss (each device's 2 images alone, then averaged) is something else entirely.
  embeddings = model(jnp.asarray(batch["image"]))
  per_device = np.mean([loss_fn(embeddings[2 * i:2 * i + 2], labels[2 * i:2 * i + 2])
                        for i in range(8)])
  assert abs(per_device - float(expected)) > 1e-3


def test_process_order_regroups_global_batches_by_process():
  # 3 processes, global batches of 6 (2 rows each); process p walks its own items 10p, 10p + 1...
  shards = [np.arange(4) + 10 * p for p in range(3)]
  rows = np.concatenate([np.concatenate([s[2 * b:2 * b + 2] for s in shards]) for b in range(2)])
  np.testing.assert_array_equal(parallel.process_order(rows, 6, num_processes=3),
                                np.concatenate(shards))
  features = np.stack([rows, -rows], axis=1)  # Trailing axes travel with their rows.
  np.testing.assert_array_equal(parallel.process_order(features, 6, num_processes=3)[:, 1],
                                -np.concatenate(shards))
  np.testing.assert_array_equal(parallel.process_order(rows, 6), rows)  # One process here.
  with pytest.raises(ValueError, match="not whole global batches of 4 split over 3 processes"):
    parallel.process_order(rows, 4, num_processes=3)


def test_mesh_orders_devices_process_by_process():
  mesh = parallel.make_mesh()
  keys = [(d.process_index, d.id) for d in mesh.devices.flat]
  assert keys == sorted(keys)


def test_same_config_check_is_free_on_one_process_and_distributed_arguments_are_checked():
  parallel.check_same_config(configs.base_config(), "/tmp/anywhere")  # Nothing to compare with.
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    parallel.initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2,
                                    process_id=2)
  with pytest.raises(ValueError, match="heartbeat_timeout must be at least 1 second"):
    parallel.initialize_distributed(heartbeat_timeout=0)
