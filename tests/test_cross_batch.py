"""Cross-batch memory: the ring buffer, the XBM loss, devices, checkpoints and configs."""

import importlib.util
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from rankjax import checkpoint
from rankjax import configs
from rankjax import cross_batch
from rankjax import losses
from rankjax import parallel
from rankjax import train
from rankjax import optim
from rankjax import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(count, batch=16, dim=4, classes=6, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    yield (rng.normal(size=(batch, dim)).astype(np.float32),
           rng.integers(0, classes, size=batch).astype(np.int32))


# --- The ring buffer ------------------------------------------------------------------------------


def test_enqueue_writes_a_ring_and_reports_the_slots():
  memory = cross_batch.init_memory(10, 2)
  assert memory["embeddings"].shape == (10, 2) and np.all(np.asarray(memory["labels"]) == -1)
  expected_x, expected_y = np.zeros((10, 2), np.float32), -np.ones(10, np.int32)
  pointer = 0
  for step in range(5):  # batches of 4 into 10 slots: the third write wraps around
    x = np.full((4, 2), step, np.float32) + np.arange(4, dtype=np.float32)[:, None]
    y = np.arange(4, dtype=np.int32) + 10 * step
    memory, slots = jax.jit(cross_batch.enqueue)(memory, x, y)
    want = (pointer + np.arange(4)) % 10
    np.testing.assert_array_equal(slots, want)
    expected_x[want], expected_y[want] = x, y
    pointer = (pointer + 4) % 10
    np.testing.assert_array_equal(memory["embeddings"], expected_x)
    np.testing.assert_array_equal(memory["labels"], expected_y)
    assert int(memory["pointer"]) == pointer
  with pytest.raises(ValueError, match="A batch of 12 does not fit in a memory of 10"):
    cross_batch.enqueue(memory, np.zeros((12, 2), np.float32), np.zeros(12, np.int32))


# --- The XBM loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["contrastive", "triplet_semihard", "triplet_all",
                                  "multi_similarity", "supcon", "margin"])
def test_loss_with_memory_is_batch_loss_plus_weighted_memory_loss(name):
  loss_fn = losses.get_loss(name, **({"key": jax.random.key(1)} if name == "margin" else {}))
  settings = cross_batch.MemorySettings(size=40, start_step=2, weight=0.5)
  memory = cross_batch.init_memory(40, 4)
  ring_x, ring_y, pointer = np.zeros((40, 4), np.float32), -np.ones(40, np.int32), 0
  step_fn = jax.jit(jax.value_and_grad(
      lambda x, y, m, s: cross_batch.loss_with_memory(loss_fn, x, y, m, s, settings)[0]))
  full_fn = jax.jit(lambda x, y, m, s: cross_batch.loss_with_memory(loss_fn, x, y, m, s,
                                                                    settings))
  for step, (x, y) in enumerate(_batches(6)):
    value, grad = step_fn(x, y, memory, step)
    total, new_memory, memory_loss = full_fn(x, y, memory, step)
    batch_value, batch_grad = jax.value_and_grad(loss_fn)(x, y)
    if step < settings.start_step:  # warm-up: the memory is neither written nor used
      np.testing.assert_allclose(value, batch_value, rtol=1e-6)
      assert float(memory_loss) == 0.0
      np.testing.assert_array_equal(new_memory["labels"], ring_y)
    else:
      slots = (pointer + np.arange(16)) % 40
      ring_x[slots], ring_y[slots] = x, y
      pointer = (pointer + 16) % 40
      # The memory term: anchors from the batch, references the memory after the write, each
      # anchor's own copy left out; the memory carries no gradient.
      def against(z, r, y=y, labels=ring_y.copy(), slots=slots):
        return loss_fn(z, y, ref_embeddings=r, ref_labels=labels, ref_self_index=slots)

      mem_value, mem_grad = jax.value_and_grad(against)(x, ring_x)
      np.testing.assert_allclose(memory_loss, mem_value, rtol=1e-6)
      np.testing.assert_allclose(value, batch_value + 0.5 * mem_value, rtol=1e-5)
      np.testing.assert_allclose(grad, batch_grad + 0.5 * mem_grad, rtol=1e-4, atol=1e-6)
      np.testing.assert_array_equal(new_memory["embeddings"], ring_x)
      np.testing.assert_array_equal(new_memory["labels"], ring_y)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    memory = new_memory


@pytest.mark.parametrize("name", ["supcon", "margin"])
def test_supcon_and_margin_leave_out_each_anchors_own_copy(name):
  # The batch as its own references with ref_self_index = i is the loss without references: the
  # same value, and the gradients through anchors and references add up to its gradient. Margin
  # draws the same negatives from the same key over the same distances.
  options = {"key": jax.random.key(3)} if name == "margin" else {}
  fn = losses.get_loss(name, **options)
  x, y = next(_batches(1, seed=7))
  value, grad = jax.value_and_grad(fn)(x, y)
  with_refs, (grad_x, grad_r) = jax.value_and_grad(
      lambda z, r: fn(z, y, ref_embeddings=r, ref_labels=y, ref_self_index=np.arange(16)),
      argnums=(0, 1))(x, x)
  assert float(value) > 0
  np.testing.assert_allclose(float(with_refs), float(value), rtol=1e-5)
  np.testing.assert_allclose(grad_x + grad_r, grad, rtol=1e-4, atol=1e-6)
  # Without the index each anchor meets its own copy, which changes the loss.
  plain = fn(x, y, ref_embeddings=x, ref_labels=y)
  assert abs(float(plain) - float(value)) > 1e-4


def test_memory_term_equals_pytorch_metric_learning_cross_batch_memory():
  # Batch-all triplets (mean over the active ones) are defined alike in both libraries; PML's
  # CrossBatchMemory writes the batch at (ptr + i) mod M, then compares the batch with the memory,
  # each sample's own slot removed: rankjax's memory term, step by step through a wrap-around.
  torch = pytest.importorskip("torch")
  pml = pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import distances as pml_distances  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml_losses  # pylint: disable=g-import-not-at-top
  del pml
  theirs = pml_losses.CrossBatchMemory(
      pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distances.LpDistance(
          normalize_embeddings=False, p=2, power=1)), embedding_size=4, memory_size=40)
  loss_fn = losses.get_loss("triplet_all", margin=0.2)
  settings = cross_batch.MemorySettings(size=40, start_step=0, weight=1.0)
  memory = cross_batch.init_memory(40, 4)
  step = jax.jit(lambda x, y, m: cross_batch.loss_with_memory(loss_fn, x, y, m, 0, settings))
  for x, y in _batches(5, seed=3):
    _, memory, ours = step(x, y, memory)
    expected = theirs(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-5)


# --- One device and eight ------------------------------------------------------------------------


def _tiny_xbm_setup(loss_name="triplet_semihard", size=40, start_step=1):
  config = configs.with_loss(configs.base_config(), loss_name)
  config.model.name = "small_resnet"
  config.model.backbone_options.widths = (8, 8)
  config.model.backbone_options.stage_sizes = (1, 1)
  config.model.embedding_dim = 16
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  graphdef, _, params, model_state = train_state.split_model(
      train.build_model(config, types.SimpleNamespace(num_channels=1)))
  tx, schedules = optim.make_optimizer(config.optimizer, params, total_steps=10)
  settings = cross_batch.MemorySettings(size=size, start_step=start_step, weight=1.0)
  step = train_state.make_train_step(
      graphdef, losses.get_loss(loss_name, **configs.loss_kwargs(config)), tx, schedules,
      train_state.diagnostics_kwargs(config), memory=settings)
  state = train_state.init_state(params, model_state, tx, xbm=cross_batch.init_memory(size, 16))
  return step, jax.device_get(state)


def test_one_step_with_memory_on_8_devices_equals_1_device():
  step, state0 = _tiny_xbm_setup()
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
              "label": rng.permutation(np.repeat(np.arange(8, dtype=np.int32), 2))}
             for _ in range(4)]
  results = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    jitted, sharding = parallel.jit_data_parallel(step, state0, mesh)
    state = jax.device_put(state0, sharding)
    history = []
    for batch in batches:  # warm-up step, then three with the memory (the last one wraps)
      state, metrics = jitted(state, parallel.global_batch(batch, mesh))
      history.append(jax.device_get(metrics))
    results[n] = jax.device_get(state), history
  (state1, history1), (state8, history8) = results[1], results[8]
  assert float(history1[0]["xbm_loss"]) == 0.0 and float(history1[-1]["xbm_loss"]) > 0.0
  for m1, m8 in zip(history1, history8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m8["xbm_loss"], m1["xbm_loss"], rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(state1) == jax.tree.structure(state8)
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # The memory holds the three global batches after the warm-up, the oldest partly overwritten.
  labels = state8["xbm"]["labels"]
  np.testing.assert_array_equal(labels[:8], batches[3]["label"][8:])
  np.testing.assert_array_equal(labels[8:16], batches[1]["label"][8:])
  np.testing.assert_array_equal(labels[16:32], batches[2]["label"])
  np.testing.assert_array_equal(labels[32:], batches[3]["label"][:8])
  assert int(state8["xbm"]["pointer"]) == 8


# --- Checkpoints: a resumed run continues with the same memory ------------------------------------


def _digits_config(steps):
  spec = importlib.util.spec_from_file_location(
      "digits", os.path.join(REPO, "experiments", "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("triplet_semihard,runlocal")
  config.train.steps = steps
  config.train.checkpoint_every = 2
  config.xbm.enabled = True
  config.xbm.size = 100  # 2.5 batches of 40: the ring wraps
  config.xbm.start_step = 1
  return config


def _latest_state(workdir, config):
  from rankjax import data  # pylint: disable=g-import-not-at-top
  info = data.get_dataset_info(config.dataset)
  _, _, params, model_state = train_state.split_model(train.build_model(config, info))
  tx, _ = optim.make_optimizer(config.optimizer, params, config.train.steps)
  state = train_state.init_state(params, model_state, tx,
                           xbm=cross_batch.init_memory(config.xbm.size, 64))
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    variables, training, progress = ckpts.restore_latest(train_state.model_variables(state),
                                                         train_state.training_variables(state))
  finally:
    ckpts.close()
  return {**variables, **training}, progress


def test_resumed_run_continues_with_the_same_memory(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  want = train.train_and_evaluate(_digits_config(4), straight)
  train.train_and_evaluate(_digits_config(2), resumed)  # stops after 2 steps (as if killed) ...
  partial, _ = _latest_state(resumed, _digits_config(4))
  assert int(partial["xbm"]["pointer"]) == 40  # one batch written (step 1; step 0 warms up)
  extended = _digits_config(4)
  extended.train.allow_config_changes = True  # Extending train.steps, the one change.
  got = train.train_and_evaluate(extended, resumed)  # ... and resumes from step 2
  assert got == want
  final_straight, progress = _latest_state(straight, _digits_config(4))
  final_resumed, _ = _latest_state(resumed, _digits_config(4))
  assert progress["step"] == 4
  assert int(final_straight["xbm"]["pointer"]) == 20  # three batches of 40 into 100 slots
  for a, b in zip(jax.tree.leaves(final_straight), jax.tree.leaves(final_resumed)):
    np.testing.assert_array_equal(a, b)


# --- Memory: M = 65,536 at D = 128, B = 512 under 2 GiB -------------------------------------------

def _benchmark_module():
  spec = importlib.util.spec_from_file_location(
      "losses_benchmark", os.path.join(REPO, "benchmarks", "losses.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_memory_of_65536_at_batch_512_is_under_two_gib():
  # The largest-footprint losses in a fresh process each: semi-hard with SOP-like classes (about
  # 6 per class in the memory: positive slots), batch-all with 128 classes (512 positives per
  # anchor: sorted rows).
  # The benchmark's own script: the XBM step's value and gradient, jitted, in a fresh process.
  script = _benchmark_module().XBM_MEMORY_SCRIPT
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = [("triplet_semihard", 11318), ("triplet_all", 128)]
  procs = {run: subprocess.Popen([sys.executable, "-c", script, run[0], str(run[1]), "65536"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for run in runs}
  peaks = {}
  for run, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    peaks[run] = int(out.split()[-1])
  assert max(peaks.values()) < 2048, f"peak RSS in MiB: {peaks}"


# --- Configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    ({"loss.name": "npairs"}, "config.xbm needs a loss that takes a reference set.*'npairs' "
                              "does not. Those that do: contrastive, triplet_semihard"),
    ({"loss.name": "proxy_anchor"}, "'proxy_anchor' does not"),
    ({"xbm.size": 20}, r"config.xbm.size must be an integer of at least the global batch \(32\)"),
    ({"xbm.start_step": -1}, "config.xbm.start_step must be an integer >= 0"),
    ({"xbm.weight": -0.5}, "config.xbm.weight must be a finite number >= 0"),
])
def test_bad_xbm_configs_are_errors(changes, match):
  config = configs.base_config()
  config.classes_per_batch, config.samples_per_class = 8, 4
  config.xbm.enabled = True
  for key, value in changes.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  with pytest.raises(ValueError, match=match):
    configs.check_config(config)


def test_losses_that_take_a_memory():
  able = {name for name, spec in losses.CATALOGUE.items() if spec.takes_references}
  assert able == {"contrastive", "triplet_semihard", "triplet_hard", "triplet_all",
                  "multi_similarity", "supcon", "margin"}
  with pytest.raises(ValueError, match="'npairs' does not. Those that do: contrastive"):
    cross_batch.check_loss(losses.get_spec("npairs"))
  config = configs.base_config()
  config.xbm.enabled = True
  configs.check_config(config)  # triplet_semihard, 32 x 4 into 8192: fine
  assert cross_batch.settings(config) == cross_batch.MemorySettings(8192, 2000, 1.0)
  config.xbm.enabled = False
  assert cross_batch.settings(config) is None
