"""The training engine: optimizers and schedules, diagnostics, configs, checkpoints and resume."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import checkpoint
from rankjax import augment
from rankjax import configs
from rankjax import diagnostics
from rankjax import losses
from rankjax import train
from rankjax.evaluation import embed as eval_embed
from rankjax import optim
from rankjax import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
DATASET_CONFIGS = ("digits", "omniglot", "cub200", "cars196", "sop")


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _optimizer_config(**overrides):
  cfg = configs.base_config().optimizer
  cfg.update(overrides)
  return cfg


def _params():
  return {"backbone": {"conv": {"kernel": jnp.full((3, 3), 2.0)}, "bn": {"bias": jnp.ones(3)}},
          "head": {"projection": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)}}}


def _first_update(cfg, grads=None, total_steps=10):
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
  tx, schedules = optim.make_optimizer(cfg, params, total_steps)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.device_get(updates), schedules


# --- Learning-rate schedules. ---


def test_warmup_then_cosine_schedule_matches_the_formula():
  _, schedules = _first_update(_optimizer_config(learning_rate=0.4, warmup_steps=10,
                                                 schedule="cosine"), total_steps=110)
  s = schedules["backbone"]
  for t in (0, 5, 10, 35, 60, 109, 110):
    want = 0.4 * t / 10 if t < 10 else 0.4 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
    np.testing.assert_allclose(float(s(t)), want, rtol=1e-6, atol=1e-8)


def test_step_and_linear_schedules():
  _, schedules = _first_update(_optimizer_config(learning_rate=1.0, schedule="step",
                                                 decay_steps=(30, 60), decay_factor=0.1),
                               total_steps=100)
  got = [float(schedules["backbone"](t)) for t in (0, 29, 30, 59, 60, 99)]
  np.testing.assert_allclose(got, [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  _, schedules = _first_update(_optimizer_config(learning_rate=1.0, schedule="linear",
                                                 warmup_steps=20), total_steps=100)
  got = [float(schedules["backbone"](t)) for t in (10, 20, 60, 100)]
  np.testing.assert_allclose(got, [0.5, 1.0, 0.5, 0.0], rtol=1e-6, atol=1e-7)


# --- Optimizers. ---


def test_backbone_and_head_get_their_own_learning_rates():
  updates, schedules = _first_update(_optimizer_config(name="sgd", momentum=0.0,
                                                       learning_rate=0.1, head_learning_rate=1.0))
  np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -0.1)
  np.testing.assert_allclose(updates["backbone"]["bn"]["bias"], -0.1)
  np.testing.assert_allclose(updates["head"]["projection"]["kernel"], -1.0)
  np.testing.assert_allclose(updates["head"]["projection"]["bias"], -1.0)
  assert float(schedules["head"](0)) == pytest.approx(1.0)


def test_weight_decay_applies_to_kernels_only():
  # sgd: u = -lr (g + wd p) on kernels (p = 2), u = -lr g on biases.
  updates, _ = _first_update(_optimizer_config(name="sgd", momentum=0.0, learning_rate=0.1,
                                               weight_decay=0.5))
  np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -0.1 * (1 + 0.5 * 2))
  np.testing.assert_allclose(updates["head"]["projection"]["kernel"], -0.1 * (1 + 0.5 * 2))
  np.testing.assert_allclose(updates["head"]["projection"]["bias"], -0.1)
  # adamw, first step: u = -lr (g / (|g| + eps) + wd p), decoupled (float32 bias correction).
  updates, _ = _first_update(_optimizer_config(name="adamw", learning_rate=0.1, weight_decay=0.5,
                                               eps=1e-8))
  np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -0.1 * (1 / (1 + 1e-8) + 1.0),
                             rtol=1e-5)
  np.testing.assert_allclose(updates["backbone"]["bn"]["bias"], -0.1 / (1 + 1e-8), rtol=1e-5)


def test_rmsprop_and_momentum_first_steps():
  # rmsprop: nu = (1 - decay) g^2, u = -lr g / sqrt(nu + eps) (optax puts eps inside the sqrt).
  updates, _ = _first_update(_optimizer_config(name="rmsprop", learning_rate=0.01,
                                               rmsprop_decay=0.9, eps=1e-8, momentum=0.0))
  np.testing.assert_allclose(updates["head"]["projection"]["bias"],
                             -0.01 / math.sqrt(0.1 + 1e-8), rtol=1e-6)
  # sgd with momentum 0.9 over two steps of the same gradient: -lr g, then -lr (1 + 0.9) g.
  cfg = _optimizer_config(name="sgd", momentum=0.9, learning_rate=0.1)
  params = _params()
  tx, _ = optim.make_optimizer(cfg, params, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  _, opt_state = tx.update(grads, opt_state, params)
  updates, _ = tx.update(grads, opt_state, params)
  np.testing.assert_allclose(updates["head"]["projection"]["bias"], -0.1 * 1.9, rtol=1e-6)


def test_gradient_clipping_by_global_norm():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  norm = math.sqrt(sum(9.0 * p.size for p in jax.tree.leaves(params)))
  updates, _ = _first_update(_optimizer_config(name="sgd", momentum=0.0, learning_rate=1.0,
                                               grad_clip_norm=1.5), grads=grads)
  np.testing.assert_allclose(updates["head"]["projection"]["bias"], -3.0 * 1.5 / norm, rtol=1e-6)


def test_param_groups_by_path():
  groups = optim.param_groups(train_state.trainable_params(_params(), {"proxies": jnp.ones((5, 2)),
                                                                 "beta": jnp.ones(())}))
  assert groups["head"]["projection"]["kernel"] == "head"
  assert groups["backbone"]["conv"]["kernel"] == "backbone"
  assert groups["loss"] == {"proxies": "proxies", "beta": "beta"}


def test_loss_parameters_get_their_own_learning_rates():
  params = train_state.trainable_params(_params(), {"proxies": jnp.ones((5, 2)),
                                                    "beta": jnp.ones(3)})
  grads = jax.tree.map(jnp.ones_like, params)
  config = configs.with_loss(configs.base_config(), "proxy_anchor")
  for proxy_lr, expected in [(None, 0.1 * 100.0), (0.5, 0.5)]:
    config.optimizer = _optimizer_config(name="sgd", momentum=0.0, learning_rate=0.1,
                                         proxy_learning_rate=proxy_lr)
    rates = {**losses.get_spec("proxy_anchor").learning_rates(config), "beta": 0.01}
    tx, schedules = optim.make_optimizer(config.optimizer, params, 10, loss_learning_rates=rates)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["loss"]["proxies"], -expected, rtol=1e-6)
    np.testing.assert_allclose(updates["loss"]["beta"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["projection"]["bias"], -0.1, rtol=1e-6)
    assert float(schedules["proxies"](0)) == pytest.approx(expected)
    assert float(schedules["beta"](0)) == pytest.approx(0.01)
  no_loss_params = train_state.trainable_params(_params(), {})
  assert set(optim.make_optimizer(config.optimizer, no_loss_params, 10)[1]) == {"backbone", "head"}
  with pytest.raises(ValueError, match=r"parameters \['beta'\] have no learning rate"):
    optim.make_optimizer(config.optimizer, params, 10, loss_learning_rates={"proxies": 1.0})


def test_training_labels_follow_the_class_rotation():
  c = configs.base_config()
  assert configs.num_train_labels(c, 964) == 964
  c.rotate_classes = True
  assert configs.num_train_labels(c, 964) == 4 * 964


def _proxy_anchor_setup(train_classes=6):
  c = configs.base_config()
  configs.with_loss(c, "proxy_anchor")
  c.model.backbone_options.width = 4
  c.model.embedding_dim = 8
  info = type("Info", (), {"num_channels": 1, "train_classes": train_classes})
  graphdef, _, params, model_state = train_state.split_model(train.build_model(c, info))
  proxies = train.init_loss_params(c, info)
  tx, schedules = optim.make_optimizer(
      c.optimizer, train_state.trainable_params(params, proxies), 10,
      loss_learning_rates=losses.get_spec(c.loss.name).learning_rates(c))
  step = jax.jit(train_state.make_train_step(
      graphdef, losses.get_loss("proxy_anchor", **configs.loss_kwargs(c)), tx, schedules,
      train_state.diagnostics_kwargs(c)))
  return c, step, train_state.init_state(params, model_state, tx, loss_params=proxies)


def test_proxy_anchor_train_step_moves_the_proxies_of_the_batch_and_the_rest():
  c, step, state = _proxy_anchor_setup()
  assert "proxies" not in state["params"]  # the model holds nothing of the loss
  proxies = np.asarray(state["loss_params"]["proxies"])
  assert proxies.shape == (6, 8)
  assert 0.3 < proxies.std() < 0.9  # N(0, 2 / C), C = 6: std 0.58 (Proxy-Anchor's init)
  batch = {"image": jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
           "label": jnp.array([0, 0, 1, 1, 2, 2, 3, 3])}
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert float(metrics["lr/proxies"]) == pytest.approx(100 * c.optimizer.learning_rate)
  moved = np.abs(np.asarray(new_state["loss_params"]["proxies"]) - proxies).max(axis=1)
  assert np.all(moved > 0)  # classes 4 and 5 are not in the batch but are pushed away
  # Adam's first step moves every entry with a gradient by the learning rate.
  np.testing.assert_allclose(moved, 100 * c.optimizer.learning_rate, rtol=1e-3)


def test_loss_parameters_survive_a_checkpoint_round_trip(tmp_path):
  _, step, state = _proxy_anchor_setup()
  batch = {"image": jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
           "label": jnp.array([0, 0, 1, 1, 2, 2, 3, 3])}
  state, _ = step(state, batch)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  ckpts.save(1, train_state.model_variables(state), train_state.training_variables(state))
  ckpts.wait()
  fresh = _proxy_anchor_setup()[2]
  variables, training, _ = ckpts.restore_latest(train_state.model_variables(fresh),
                                                train_state.training_variables(fresh))
  ckpts.close()
  assert set(training) == {"opt_state", "loss_params"}
  np.testing.assert_array_equal(training["loss_params"]["proxies"],
                                state["loss_params"]["proxies"])
  assert not np.array_equal(training["loss_params"]["proxies"], fresh["loss_params"]["proxies"])
  for a, b in zip(jax.tree.leaves(training["opt_state"]), jax.tree.leaves(state["opt_state"])):
    np.testing.assert_array_equal(a, b)
  # The embedder's part of the checkpoint holds no proxies.
  model_only, _ = checkpoint.restore_model(str(tmp_path), train_state.model_variables(fresh))
  assert "proxies" not in model_only["params"]


# --- Diagnostics. ---


def _numpy_diagnostics(x, y, margin, pos_margin, neg_margin):
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  n = len(y)
  active = total = 0
  for a in range(n):
    for p in range(n):
      if p == a or y[p] != y[a]:
        continue
      for m in range(n):
        if y[m] == y[a]:
          continue
        total += 1
        active += d[a, p] - d[a, m] + margin > 0
  pos = (y[:, None] == y[None]) & ~np.eye(n, dtype=bool)
  neg = y[:, None] != y[None]
  active_pairs = ((pos & (d > pos_margin)) | (neg & (d < neg_margin))).sum() / (pos | neg).sum()
  return {"active_triplets": active / total, "mean_positive_distance": d[pos].mean(),
          "mean_negative_distance": d[neg].mean(),
          "mean_norm": np.linalg.norm(x, axis=1).mean(), "active_pairs": active_pairs}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnostics_match_a_brute_force_count(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(24, 5)).astype(np.float32)
  y = rng.integers(0, 5, size=24).astype(np.int32)
  got = jax.jit(lambda x, y: diagnostics.batch_diagnostics(
      x, y, margin=0.5, pos_margin=0.8, neg_margin=2.5))(x, y)
  want = _numpy_diagnostics(x.astype(np.float64), y, 0.5, 0.8, 2.5)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, err_msg=k)


def test_diagnostics_of_a_collapsed_and_of_a_degenerate_batch():
  # Collapsed: all points equal, every triplet is active with a positive margin.
  out = diagnostics.batch_diagnostics(jnp.ones((8, 4)), jnp.array([0, 0, 1, 1, 2, 2, 3, 3]),
                                      margin=0.1)
  assert float(out["active_triplets"]) == 1.0
  assert float(out["mean_positive_distance"]) == 0.0 == float(out["mean_negative_distance"])
  # One class only: no triplet and no negative pair; fractions are 0, never NaN.
  out = diagnostics.batch_diagnostics(jnp.ones((4, 4)), jnp.zeros(4, jnp.int32), margin=0.1)
  assert all(np.isfinite(float(v)) for v in out.values())
  assert float(out["active_triplets"]) == 0.0


# --- Rotation classes. ---


def test_rotate_classes_turns_each_class_as_one_and_relabels_it():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(12, 5, 5, 1)).astype(np.float32)
  labels = np.repeat(np.array([7, 2, 9, 4], np.int32), 3)
  seen = set()
  for step in range(6):
    out = jax.device_get(augment.rotate_classes({"image": images, "label": labels}, step,
                                              key=jax.random.key(1)))
    turns = out["label"] - 4 * labels
    assert set(turns) <= {0, 1, 2, 3}
    for i in range(12):
      np.testing.assert_array_equal(out["image"][i], np.rot90(images[i], turns[i], axes=(0, 1)))
    for c in range(4):  # One turn per class.
      assert len(set(turns[3 * c:3 * c + 3])) == 1
    seen.update(turns)
    again = augment.rotate_classes({"image": images, "label": labels}, step, key=jax.random.key(1))
    np.testing.assert_array_equal(again["label"], out["label"])  # Deterministic in the step.
  assert seen == {0, 1, 2, 3}


# --- Configs. ---


@pytest.mark.parametrize("dataset", DATASET_CONFIGS)
def test_every_dataset_config_builds_for_every_loss(dataset):
  module = _load_config_module(dataset)
  assert "python -m rankjax.main" in module.__doc__
  for loss in losses.loss_names():
    for arg in (loss, f"{loss},runlocal"):
      c = module.get_config(arg)
      configs.check_config(c)
      assert c.loss.name == loss
      assert c.dataset == dataset
      assert dict(c.loss[loss]) == dict(losses.get_spec(loss).defaults)
      if loss in ("npairs", "angular", "npairs_angular"):
        assert c.samples_per_class == 2


def test_pair_based_losses_keep_the_global_batch_size():
  module = _load_config_module("omniglot")
  a, b = module.get_config("triplet_semihard"), module.get_config("npairs")
  assert (a.classes_per_batch, a.samples_per_class) == (32, 4)
  assert (b.classes_per_batch, b.samples_per_class) == (64, 2)
  assert not configs.normalize_embeddings(b) and configs.normalize_embeddings(a)


@pytest.mark.parametrize("dataset", ["cub200", "cars196", "sop"])
def test_published_recipe_flags_of_the_fine_grained_configs(dataset):
  module = _load_config_module(dataset)
  roth = module.get_config("npairs_angular")
  assert (roth.classes_per_batch, roth.samples_per_class, roth.model.embedding_dim) == (56, 2, 128)
  wang = module.get_config("npairs_angular,wang2017")
  configs.check_config(wang)
  assert (wang.classes_per_batch, wang.samples_per_class) == (64, 2)
  assert wang.model.embedding_dim == 512 and wang.optimizer.name == "sgd"
  assert wang.loss.npairs_angular.alpha_degrees == 45.0
  assert wang.loss.npairs_angular.angular_weight == 2.0
  hermans = module.get_config("triplet_hard,hermans2017")
  configs.check_config(hermans)
  assert (hermans.classes_per_batch, hermans.samples_per_class) == (18, 4)
  assert hermans.loss.triplet_hard.soft and hermans.optimizer.learning_rate == 3e-4
  assert module.get_config("triplet_hard,hermans2017,runlocal").train.steps < 10
  with pytest.raises(ValueError, match="Choose one recipe"):
    module.get_config("npairs,wang2017,hermans2017")
  with pytest.raises(ValueError, match="could not read"):
    module.get_config("npairs,wide")  # An Omniglot flag.


def test_omniglot_wide_flag_widens_the_late_blocks():
  module = _load_config_module("omniglot")
  wide = module.get_config("triplet_semihard,wide")
  configs.check_config(wide)
  assert wide.model.name == "conv4"
  assert tuple(wide.model.backbone_options.widths) == (64, 128, 256, 512)
  assert not wide.model.backbone_options.pool_last and wide.model.embedding_dim == 512
  assert wide.affine.rotation_degrees > 0 and wide.affine.shift > 0
  assert wide.image_size == 40 and module.get_config("triplet_semihard").image_size == 28
  assert wide.eval.test_time_shift == 1
  assert module.get_config("triplet_semihard").eval.test_time_shift == 0
  assert "widths" not in module.get_config("triplet_semihard").model.backbone_options


def test_config_argument_errors():
  with pytest.raises(ValueError, match="expected one loss name"):
    configs.parse_arg("tripletsemihard", "npairs")
  assert configs.parse_arg(None, "npairs") == ("npairs", set())
  assert configs.parse_arg("angular,runlocal", "npairs") == ("angular", {"runlocal"})


def test_misspelled_config_key_is_an_error():
  config = configs.base_config()
  config.train.stpes = 3
  with pytest.raises(ValueError, match=r"Unknown config key 'train.stpes'. Did you mean 'steps'"):
    configs.check_config(config)
  locked = configs.base_config()
  locked.lock()
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    locked.train.stpes = 3


def _tiny_digits_config(**changes):
  config = _load_config_module("digits").get_config("triplet_semihard,runlocal")
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("changes, match", [
    ({"loss.name": "tripplet_semihard"}, "Unknown loss 'tripplet_semihard'"),
    ({"model.name": "resnet19"}, "unknown model name 'resnet19'"),
    ({"optimizer.name": "adagrad"}, "Unknown optimizer 'adagrad'"),
    ({"model.name": "conv4", "image_size": 12}, "needs images of at least 16x16 pixels; got 12x12"),
    ({"samples_per_class": 5}, "batch of 25 is not divisible by 8 devices"),
    ({"eval.batch_size": 100}, "config.eval.batch_size of 100 is not divisible by 8 devices"),
    ({"eval.best_metric": "recall@3"}, "best_metric='recall@3' is not one of config.eval.metrics"),
    ({"eval.metrics": ("recall@1", "mapr")}, "Unknown metric 'mapr'"),
])
def test_train_and_evaluate_errors_before_training(tmp_path, changes, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_tiny_digits_config(**changes), str(tmp_path))
  assert not os.path.exists(tmp_path / train.METRICS_FILE)


def test_unknown_config_key_in_train_and_evaluate(tmp_path):
  config = _tiny_digits_config()
  config.eval.evry = 5
  with pytest.raises(ValueError, match="Unknown config key 'eval.evry'. Did you mean 'every'"):
    train.train_and_evaluate(config, str(tmp_path))


# --- Checkpoints. ---


def test_checkpoints_round_trip_and_keep_the_best(tmp_path):
  model = {"params": {"head": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}},
           "model_state": {"0": {"mean": np.ones(3, np.float32)}}}
  opt = (np.float32(3.0), {"mu": np.full(4, 2.0, np.float32)})
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2, best_metric="map@r")
  assert ckpts.restore_latest(model, opt) is None
  for step in (2, 4, 6):
    ckpts.save(step, jax.tree.map(lambda x: x + step, model), opt)
  for step, value in ((2, 0.3), (4, 0.5), (6, 0.4)):
    ckpts.save_best(step, jax.tree.map(lambda x: x + step, model), {"map@r": value})
  ckpts.wait()
  restored_model, restored_opt, progress = ckpts.restore_latest(model, opt)
  ckpts.close()
  assert progress == {"step": 6, "data_position": 6}
  np.testing.assert_array_equal(restored_model["params"]["head"]["kernel"],
                                model["params"]["head"]["kernel"] + 6)
  np.testing.assert_array_equal(restored_opt[1]["mu"], opt[1]["mu"])
  assert sorted(os.listdir(tmp_path / checkpoint.LATEST_DIR)) == ["4", "6"]
  best, info = checkpoint.restore_model(str(tmp_path), model, which="best")
  assert info == {"step": 4, "metrics": {"map@r": 0.5}}
  np.testing.assert_array_equal(best["model_state"]["0"]["mean"], 5.0)


# --- Resume after SIGKILL: the real entry point, in subprocesses. ---


def _main_command(workdir, steps):
  return [sys.executable, "-m", "rankjax.main",
          f"--config={CONFIG_DIR}/digits.py:triplet_semihard,runlocal",
          f"--workdir={workdir}", f"--config.train.steps={steps}",
          "--config.train.checkpoint_every=3", "--config.train.log_every=3",
          # Digits 3-4 validate (the best checkpoint is chosen by them), 0-2 train.
          "--config.eval.every=6", "--config.protocol.val_fraction=0.4",
          "--config.classes_per_batch=3"]


def test_resume_after_sigkill_gives_the_same_metrics(tmp_path):
  # Two fake devices: the restore onto a multi-device mesh is exercised, compilation stays quick.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  steps = 12
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted run and the one to kill run side by side.
  reference = subprocess.Popen(_main_command(full, steps), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(_main_command(killed, steps), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first_checkpoint = killed / checkpoint.LATEST_DIR / "3"
  deadline = time.time() + 300
  while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  assert not (killed / train.METRICS_FILE).exists()

  resumed = subprocess.run(_main_command(killed, steps), env=env, cwd=REPO,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stderr
  _, stderr = reference.communicate()
  assert reference.returncode == 0, stderr[-3000:]
  want = json.loads((full / train.METRICS_FILE).read_text())
  got = json.loads((killed / train.METRICS_FILE).read_text())
  assert got == want
  assert {"recall@1", "recall@8", "map@r", "r_precision", "nmi"} <= set(got)
  assert got["checkpoint"] == "best" and got["selected_by"] == "val/recall@1"
  assert got["checkpoint_step"] in (6, 12)


# --- The validation split chooses the checkpoint; the test split is evaluated once. ---


def test_a_final_evaluation_of_the_val_split_keeps_the_validation_curve(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = _load_config_module("digits").get_config("triplet_semihard,runlocal")
  config.train.steps, config.eval.every, config.train.checkpoint_every = 4, 2, 2
  config.protocol.val_fraction = 0.4
  config.classes_per_batch = 3
  config.eval.split = "val"  # Exploring on validation: the final evaluation is of val too.
  metrics = train.train_and_evaluate(config, str(tmp_path))
  events = {}
  for path in (tmp_path / "tensorboard").glob("events*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        events.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
  # One point per evaluated step: the last step's is its own state's, not the best checkpoint's.
  assert sorted(s for s, _ in events["val/map@r"]) == [0, 2, 4]
  assert events["final/val/map@r"] == [(4, pytest.approx(metrics["map@r"], abs=1e-6))]


def test_best_checkpoint_is_chosen_by_the_validation_split(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = _load_config_module("digits").get_config("triplet_semihard,runlocal")
  config.train.steps, config.eval.every, config.train.checkpoint_every = 6, 2, 2
  config.protocol.val_fraction = 0.4  # Digits 3-4 validate, 0-2 train, 5-9 test.
  config.classes_per_batch = 3
  config.eval.best_metric = "map@r"
  metrics = train.train_and_evaluate(config, str(tmp_path))
  report = json.loads((tmp_path / train.METRICS_FILE).read_text())
  val = {}
  for path in (tmp_path / "tensorboard").glob("events*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == "val/map@r":
          val[event.step] = float(tf.make_ndarray(v.tensor))
  assert sorted(val) == [0, 2, 4, 6]  # Step 0: the untrained network, where the curve starts.
  assert report["step0/val/map@r"] == pytest.approx(val.pop(0), abs=1e-6)
  best = max(val.values())  # Step 0 never chooses the checkpoint.
  assert report["checkpoint"] == "best" and report["selected_by"] == "val/map@r"
  assert report["val/map@r"] == pytest.approx(best, abs=1e-6)
  assert val[report["checkpoint_step"]] == pytest.approx(best, abs=1e-6)
  # The reported test metrics are the best checkpoint's (not the last state's).
  variables, progress = checkpoint.restore_model(str(tmp_path), _abstract_variables(config),
                                                 which="best")
  assert progress["step"] == report["checkpoint_step"]
  from rankjax import data  # pylint: disable=g-import-not-at-top
  info = data.get_dataset_info("digits", protocol=config.protocol)
  assert (info.train_classes, info.val_classes, info.test_classes) == (3, 2, 5)
  _, eval_graphdef, _, _ = train_state.split_model(train.build_model(config, info))
  embed = eval_embed.make_eval_embed_fn(eval_graphdef, config)
  images, labels = [], []
  for batch in data.eval_batches("digits", batch_size=128, image_size=16, split="test"):
    images.append(np.asarray(embed(variables, batch["image"]))[batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  from rankjax import evaluation  # pylint: disable=g-import-not-at-top
  again = evaluation.retrieval_metrics(np.concatenate(images), np.concatenate(labels), ks=(1,))
  assert again["map@r"] == pytest.approx(metrics["map@r"], abs=1e-4)
  assert set(np.concatenate(labels).tolist()) == {5, 6, 7, 8, 9}


def _abstract_variables(config):
  from rankjax import data  # pylint: disable=g-import-not-at-top
  info = data.get_dataset_info(config.dataset, protocol=config.protocol)
  _, _, params, model_state = train_state.split_model(train.build_model(config, info))
  return {"params": params, "model_state": model_state}


def test_periodic_evaluation_without_a_validation_split_is_an_error(tmp_path):
  config = _load_config_module("digits").get_config("triplet_semihard,runlocal")
  config.eval.every = 2
  with pytest.raises(ValueError, match="has none under this protocol"):
    train.train_and_evaluate(config, str(tmp_path))


# --- The post-survey losses with parameters, end to end. ---


def _saved_loss_params(workdir, step):
  """The loss parameters of ``workdir``'s checkpoint at ``step``, as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), checkpoint.LATEST_DIR, str(step), "training")
  ckptr = ocp.StandardCheckpointer()
  metadata = ckptr.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  full = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return jax.tree.map(np.asarray, ckptr.restore(path, full)["loss_params"])


@pytest.mark.parametrize("loss, shapes", [
    ("margin", {"beta": (5,)}), ("subcenter_arcface", {"proxies": (5, 3, 16)})])
def test_losses_with_parameters_train_end_to_end_and_repeat(tmp_path, loss, shapes):
  config = _load_config_module("digits").get_config(f"{loss},runlocal")
  config.model.embedding_dim = 16
  metrics = train.train_and_evaluate(config, str(tmp_path / "a"))
  assert all(np.isfinite(v) for v in metrics.values())
  steps = config.train.steps
  learned = _saved_loss_params(tmp_path / "a", steps)
  assert {k: v.shape for k, v in learned.items()} == shapes
  info = type("Info", (), {"num_channels": 1, "train_classes": 5})
  start = train.init_loss_params(config, info)
  for name, value in learned.items():
    assert np.all(np.isfinite(value))
    assert not np.allclose(value, np.asarray(start[name])), name  # The optimizer moved them.
  # The same seed gives the same run, margin's per-step sampling key included.
  again = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert again == metrics
  for name, value in _saved_loss_params(tmp_path / "b", steps).items():
    np.testing.assert_array_equal(value, learned[name])


def test_diagnostics_outside_the_step_equal_those_inside_it():
  c = configs.base_config()
  configs.with_loss(c, "triplet_semihard")
  c.model.backbone_options.width = 4
  c.model.embedding_dim = 8
  info = type("Info", (), {"num_channels": 1, "train_classes": 4})
  graphdef, _, params, model_state = train_state.split_model(train.build_model(c, info))
  tx, schedules = optim.make_optimizer(c.optimizer, params, 10)
  loss_fn = losses.get_loss("triplet_semihard", **configs.loss_kwargs(c))
  batch = {"image": jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
           "label": jnp.array([0, 0, 1, 1, 2, 2, 3, 3])}
  kwargs = train_state.diagnostics_kwargs(c)
  inside = jax.jit(train_state.make_train_step(graphdef, loss_fn, tx, schedules, kwargs))
  outside = jax.jit(train_state.make_train_step(graphdef, loss_fn, tx, schedules, None,
                                                batch_outputs=True))
  diagnose = jax.jit(train_state.make_diagnostics_fn(kwargs))
  state_in = state_out = train_state.init_state(params, model_state, tx)
  keys = set(diagnostics.batch_diagnostics(batch["image"].reshape(8, -1), batch["label"]))
  for _ in range(3):
    state_in, with_diagnostics = inside(state_in, batch)
    state_out, without, outputs = outside(state_out, batch)
    assert keys <= set(with_diagnostics) and not keys & set(without)
    assert outputs["embeddings"].shape == (8, 8)
    np.testing.assert_array_equal(outputs["label"], batch["label"])
    np.testing.assert_allclose(without["loss"], with_diagnostics["loss"], rtol=1e-6)
    separate = diagnose(outputs["embeddings"], outputs["label"])
    for key in keys:  # The same values, to the rounding of another fusion.
      np.testing.assert_allclose(separate[key], with_diagnostics[key], rtol=1e-5, atol=1e-7,
                                 err_msg=key)
