"""The frozen-trunk activation cache, the PCA head and the step-0 evaluation.

The cache must change nothing but the speed: with one view, no augmentation and float32 storage,
its batches hold the frozen prefix of the uncached batches, a cached step's loss and gradients
equal the uncached step's, and evaluation from the cache equals evaluation from the images. A
cache is reused only when every input that determines it is the same.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rankjax import configs
from rankjax import data
from rankjax import frozen_cache
from rankjax import head_init
from rankjax import losses
from rankjax import optim
from rankjax import parallel
from rankjax import recipes
from rankjax import run_log
from rankjax import seeding
from rankjax import train
from rankjax import train_state
from rankjax.evaluation import embed as embed_lib

# Lite0's code at a fraction of its size (tests/test_efficientnet.py uses the same stages).
TINY = {"stages": ((1, 3, 1, 8, 1), (4, 5, 2, 8, 2), (4, 3, 2, 16, 1)), "stem_features": 8,
        "head_features": 32}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """20 class folders of 5 random JPEGs of 36 x 44: 10 train (2 of them validate), 10 test."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for c in range(20):
    os.makedirs(root / f"c{c:02d}")
    base = rng.integers(0, 256, (36, 44, 3))
    for i in range(5):  # Images of a class share a pattern, so retrieval has something to find.
      noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(noisy).save(root / f"c{c:02d}" / f"{i}.jpg", quality=95)
  return root


def _config(folder, tmp_path, **changes):
  """A few steps of a tiny Lite0 with 2 frozen blocks on ``folder``, cached in ``tmp_path``."""
  c = recipes.cpu_photo_recipe(f"folder:{folder}", "contrastive", set(), image_size=32)
  c.data_dir = str(folder.parent / f"{folder.name}_tfds")  # Prepared once for the module.
  c.frozen_cache.dir = str(tmp_path / "cache")
  c.model.pretrained = None
  c.model.embedding_dim = 16
  c.model.backbone_options = {**TINY, "frozen_blocks": 2}
  c.classes_per_batch, c.samples_per_class = 4, 2
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 4, 2, 2
  c.eval.every, c.eval.batch_size = 2, 16
  c.optimizer.learning_rate = c.optimizer.head_learning_rate = 1e-2
  c.augment = False
  c.frozen_cache.enabled = True
  c.frozen_cache.views = 1
  c.frozen_cache.dtype = "float32"
  c.update_from_flattened_dict(changes)
  return c


def _model(config):
  info = data.get_dataset_info(config.dataset, data_dir=config.data_dir,
                               protocol=config.protocol)
  return train.build_model(config, info)


def _prefix(model):
  model.eval()
  graphdef, state = nnx.split(model)
  model.train()
  return jax.jit(lambda x: nnx.merge(graphdef, state).frozen_prefix(x))


# --- The model: the prefix and the rest compose to the whole. ---


@pytest.mark.parametrize("frozen", [1, 2, 4])
def test_the_frozen_prefix_and_the_rest_compose_to_the_model(frozen):
  from rankjax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model("efficientnet_lite0", embedding_dim=16, normalize=True,
                           backbone_options={**TINY, "frozen_blocks": frozen}, rngs=nnx.Rngs(0))
  model.eval()
  images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  whole = model(images)
  parts = model.embed_from_frozen(model.frozen_prefix(images))
  np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-7)
  assert float(jnp.std(whole, axis=0).mean()) > 1e-3  # The images are told apart.
  assert len(model.backbone.frozen_modules()) == 2 + frozen


def test_a_model_without_a_frozen_prefix_says_so():
  from rankjax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model("efficientnet_lite0", backbone_options=TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no frozen prefix"):
    model.frozen_prefix(jnp.zeros((1, 32, 32, 3)))


# --- Exactness: one view, no augmentation, float32 storage. ---


def test_cached_batches_hold_the_prefix_of_the_uncached_batches(folder, tmp_path):
  config = _config(folder, tmp_path)
  model = _model(config)
  cache = frozen_cache.open_or_build(config, model)
  prefix = _prefix(model)
  cached = frozen_cache.train_batches(cache, config, start_step=0)
  plain = data.train_batches(
      config.dataset, classes_per_batch=4, samples_per_class=2, image_size=32,
      seed=seeding.stream_seed(config.seed, "data"), data_dir=config.data_dir, augment=False,
      protocol=config.protocol)
  for _ in range(3):
    a, b = next(cached), next(plain)
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["activation"], prefix(b["image"]), rtol=1e-5, atol=1e-6)


def _step_outputs(config, model, batch):
  """(loss, grad_norm, gradients, parameters after one SGD step) of the trainer's step."""
  loss_fn = losses.get_loss(config.loss.name, **configs.loss_kwargs(config))
  graphdef, _, params, model_state = train_state.split_model(model)
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.0
  tx, schedules = optim.make_optimizer(config.optimizer, params, 10)
  state = train_state.init_state(params, model_state, tx)
  step = jax.jit(train_state.make_train_step(graphdef, loss_fn, tx, schedules, None))
  new_state, metrics = step(state, batch)

  def loss(trainable):
    m = nnx.merge(graphdef, trainable, model_state)
    if "activation" in batch:
      e = m.embed_from_frozen(batch["activation"])
    else:
      e = m(batch["image"])
    return loss_fn(e, batch["label"])

  grads = jax.grad(loss)(params)
  return float(metrics["loss"]), float(metrics["grad_norm"]), grads, new_state["params"]


def test_a_cached_step_equals_the_uncached_step(folder, tmp_path):
  config = _config(folder, tmp_path)
  model = _model(config)
  cache = frozen_cache.open_or_build(config, model)
  cached = next(frozen_cache.train_batches(cache, config))
  plain = next(data.train_batches(
      config.dataset, classes_per_batch=4, samples_per_class=2, image_size=32,
      seed=seeding.stream_seed(config.seed, "data"), data_dir=config.data_dir, augment=False,
      protocol=config.protocol))
  loss_a, norm_a, grads_a, params_a = _step_outputs(config, model, {
      "activation": jnp.asarray(cached["activation"]), "label": jnp.asarray(cached["label"])})
  loss_b, norm_b, grads_b, params_b = _step_outputs(config, model, {
      "image": jnp.asarray(plain["image"]), "label": jnp.asarray(plain["label"])})
  assert loss_b > 0 and norm_b > 0  # A batch that trains: the comparison is not of zeros.
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  np.testing.assert_allclose(norm_a, norm_b, rtol=1e-5)
  leaves_a, leaves_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  assert len(leaves_a) == len(leaves_b)
  for ga, gb in zip(leaves_a, leaves_b):
    scale = float(jnp.max(jnp.abs(gb))) or 1.0
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-5 * scale)
  for pa, pb in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-7)


def test_evaluation_from_the_cache_equals_evaluation_from_images(folder, tmp_path):
  cached_config = _config(folder, tmp_path)
  plain_config = _config(folder, tmp_path, **{"frozen_cache.enabled": False})
  model = _model(cached_config)
  cache = frozen_cache.open_or_build(cached_config, model)
  _, eval_graphdef, params, model_state = train_state.split_model(model)
  variables = {"params": params, "model_state": model_state}
  mesh = parallel.make_mesh()
  for split in ("val", "test", "train"):
    a, la = embed_lib.embed_split(embed_lib.make_eval_embed_fn(eval_graphdef, cached_config, mesh),
                                  variables, mesh, cached_config, split=split, cache=cache)
    b, lb = embed_lib.embed_split(embed_lib.make_eval_embed_fn(eval_graphdef, plain_config, mesh),
                                  variables, mesh, plain_config, split=split)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # And the whole evaluation of train_and_evaluate (no training: steps=0).
  got = train.train_and_evaluate(_config(folder, tmp_path, **{"train.steps": 0, "eval.every": 0}),
                                 str(tmp_path / "cached"))
  want = train.train_and_evaluate(_config(folder, tmp_path, **{
      "train.steps": 0, "eval.every": 0, "frozen_cache.enabled": False}), str(tmp_path / "plain"))
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_float16_storage_rounds_the_activations_and_nothing_else(folder, tmp_path):
  model = _model(_config(folder, tmp_path))
  exact = frozen_cache.open_or_build(_config(folder, tmp_path), model)
  half = frozen_cache.open_or_build(_config(folder, tmp_path, **{"frozen_cache.dtype": "float16"}),
                                    model)
  assert half.directory != exact.directory
  assert half.arrays["test"].dtype == np.float16 and exact.arrays["test"].dtype == np.float32
  np.testing.assert_allclose(half.arrays["test"].astype(np.float32), exact.arrays["test"],
                             rtol=2 ** -10, atol=1e-4)
  assert not np.array_equal(half.arrays["test"].astype(np.float32), exact.arrays["test"])


# --- Views: drawn once from the cache seed; a run's seed picks among them. ---


def test_augmented_views_come_from_the_cache_seed_and_differ(folder, tmp_path):
  config = _config(folder, tmp_path, augment=True, **{"frozen_cache.views": 3,
                                                      "frozen_cache.dtype": "float16"})
  model = _model(config)
  cache = frozen_cache.open_or_build(config, model)
  train_views = cache.arrays["train"]
  assert train_views.shape[:2] == (cache.positions["train"].size, 3)
  assert not np.array_equal(train_views[:, 0], train_views[:, 1])
  # Another run seed reads the same cache; another cache seed is another cache.
  other_run = _config(folder, tmp_path, augment=True, seed=5,
                      **{"frozen_cache.views": 3, "frozen_cache.dtype": "float16"})
  assert frozen_cache.open_or_build(other_run, model).directory == cache.directory
  other_cache = _config(folder, tmp_path, augment=True, **{
      "frozen_cache.views": 3, "frozen_cache.dtype": "float16", "frozen_cache.seed": 1})
  assert frozen_cache.open_or_build(other_cache, model).directory != cache.directory
  # Every view is read, and a resumed iterator continues the same sequence.
  batches = frozen_cache.train_batches(cache, config)
  seen = [next(batches) for _ in range(6)]
  resumed = frozen_cache.train_batches(cache, config, start_step=4)
  for want in seen[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["activation"], want["activation"])
    np.testing.assert_array_equal(got["label"], want["label"])
  chosen = np.concatenate([frozen_cache.view_choice(0, s, 8, 3) for s in range(6)])
  assert set(chosen.tolist()) == {0, 1, 2}


def test_more_than_one_view_without_augmentation_is_an_error(folder, tmp_path):
  config = _config(folder, tmp_path, **{"frozen_cache.views": 2})
  with pytest.raises(ValueError, match="views=1"):
    frozen_cache.open_or_build(config, _model(config))


# --- The key: any change of an input is another cache. ---


@pytest.mark.parametrize("changes", [
    {"image_size": 40},
    {"frozen_cache.dtype": "bfloat16"},
    {"model.backbone_options": {**TINY, "frozen_blocks": 1}},
    {"seed": 3},  # Another initialisation of the (unpretrained) prefix: other weights.
    {"protocol.val_fraction": 0.5},
    {"augment": True, "frozen_cache.views": 1},
    {"augment": True, "frozen_cache.views": 1, "augment_options.antialias": True},
    {"augment": True, "frozen_cache.views": 1, "augment_options.scale": (0.5, 1.0)},
    {"model.dtype": "bfloat16"},
])
def test_a_change_of_any_input_changes_the_key(folder, tmp_path, changes):
  base = _config(folder, tmp_path)
  other = _config(folder, tmp_path, **changes)
  key = lambda c: frozen_cache.cache_key(  # pylint: disable=g-long-lambda
      c, _model(c), data.datasets.get_source(c.dataset, c.data_dir, c.protocol),
      data.pipeline.resolve_augment(configs.augment_setting(c), data.datasets.get_spec(c.dataset)))
  a, b = key(base), key(other)
  assert a != b
  assert frozen_cache._directory_name(a) != frozen_cache._directory_name(b)  # pylint: disable=protected-access


def test_a_cache_is_reused_only_when_its_key_matches(folder, tmp_path, caplog):
  config = _config(folder, tmp_path)
  model = _model(config)
  caplog.set_level("INFO")
  first = frozen_cache.open_or_build(config, model)
  assert "Built in" in caplog.text and "on disk" in caplog.text
  stamp = os.path.getmtime(os.path.join(first.directory, "test.bin"))
  caplog.clear()
  again = frozen_cache.open_or_build(config, model)
  assert again.directory == first.directory and "Reused" in caplog.text
  assert os.path.getmtime(os.path.join(first.directory, "test.bin")) == stamp
  # A key.json that does not match (written by other code, edited) is never trusted.
  key_file = os.path.join(first.directory, frozen_cache.KEY_FILE)
  key = json.load(open(key_file))
  key["prefix_sha256"] = "0" * 64
  json.dump(key, open(key_file, "w"))
  caplog.clear()
  rebuilt = frozen_cache.open_or_build(config, model)
  assert "Built in" in caplog.text
  assert json.load(open(key_file))["prefix_sha256"] == frozen_cache.prefix_fingerprint(model)
  np.testing.assert_array_equal(rebuilt.arrays["test"], first.arrays["test"])


def test_an_unfinished_build_is_never_read_and_is_cleaned_up(folder, tmp_path):
  config = _config(folder, tmp_path)
  model = _model(config)
  cache = frozen_cache.open_or_build(config, model)
  # A build killed half-way leaves its temporary directory (of a process that no longer runs).
  dead = f"{cache.directory}.tmp-999999999"
  os.makedirs(dead)
  open(os.path.join(dead, "test.bin"), "wb").close()
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(cache.directory)
  rebuilt = frozen_cache.open_or_build(config, model)
  assert not os.path.exists(dead)
  assert rebuilt.arrays["test"].shape[0] == rebuilt.positions["test"].size > 0


# --- The trainer on the cache: config errors, resume, step-0 evaluation. ---


@pytest.mark.parametrize("changes, match", [
    ({"model.backbone_options": TINY}, "frozen_blocks > 0"),
    ({"affine.rotation_degrees": 10.0}, "config.affine"),
    ({"rotate_classes": True}, "config.rotate_classes"),
    ({"frozen_cache.dtype": "int8"}, "frozen_cache.dtype"),
    ({"frozen_cache.views": 0}, "frozen_cache.views"),
    ({"model.head_init": "zeros"}, "head_init"),
])
def test_config_errors(folder, tmp_path, changes, match):
  with pytest.raises(ValueError, match=match):
    configs.check_config(_config(folder, tmp_path, **changes))


def test_a_cached_run_resumes_where_it_stopped(folder, tmp_path):
  config = _config(folder, tmp_path, **{"train.steps": 4})
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  # The same run stopped after its checkpoint at step 2 (a constant learning rate, so the first
  # two steps of a 2-step run are those of the 4-step run), then continued.
  train.train_and_evaluate(_config(folder, tmp_path, **{"train.steps": 2}),
                           str(tmp_path / "split"))
  config.train.allow_config_changes = True  # Extending train.steps is the one change.
  resumed = train.train_and_evaluate(config, str(tmp_path / "split"))
  assert resumed == pytest.approx(whole, abs=1e-6)
  assert json.load(open(tmp_path / "split" / train.METRICS_FILE))["checkpoint_step"] == json.load(
      open(tmp_path / "whole" / train.METRICS_FILE))["checkpoint_step"]


def test_a_fresh_run_evaluates_the_validation_split_at_step_0(folder, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(_config(folder, tmp_path), str(workdir))
  report = json.load(open(workdir / train.METRICS_FILE))
  curve = run_log.read_scalars(str(workdir), "val/map@r")
  assert sorted(curve) == [0, 2, 4]
  assert report["step0/val/map@r"] == pytest.approx(curve[0], rel=1e-6)
  # The step-0 numbers are the untrained network's: a run without steps, evaluated on val.
  untrained = train.train_and_evaluate(
      _config(folder, tmp_path, **{"train.steps": 0, "eval.every": 0, "eval.split": "val"}),
      str(tmp_path / "untrained"))
  for k, v in untrained.items():
    assert report[f"step0/val/{k}"] == pytest.approx(v, abs=1e-6), k
  assert report["checkpoint_step"] in (2, 4)  # Step 0 never chooses the checkpoint.


# --- The PCA head. ---


def test_pca_projection_is_the_principal_axes_scaled_to_unit_mean_norm():
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  features = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0
  kernel, bias = head_init.pca_projection(features, 4)
  embeddings = features @ kernel + bias
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1).mean(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(embeddings.mean(axis=0), 0.0, atol=1e-5)
  reference = PCA(n_components=4).fit_transform(features)
  scale = np.linalg.norm(reference, axis=1).mean()
  for j in range(4):  # The same axes up to their sign.
    np.testing.assert_allclose(np.abs(embeddings[:, j]), np.abs(reference[:, j]) / scale,
                               rtol=1e-3, atol=1e-4)
  gram = kernel.T @ kernel
  np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-5 * gram.max())
  # A function of the data alone: the same on a reordered copy.
  again, _ = head_init.pca_projection(features[::-1], 4)
  np.testing.assert_allclose(again, kernel, rtol=1e-4, atol=1e-6)


def test_pca_projection_errors():
  with pytest.raises(ValueError, match="at least 4 features and 5 training images"):
    head_init.pca_projection(np.ones((4, 8)), 4)
  with pytest.raises(ValueError, match="not all finite"):
    head_init.pca_projection(np.full((10, 8), np.nan), 4)


def test_the_pca_head_is_the_same_from_the_cache_and_from_images(folder, tmp_path):
  cached_config = _config(folder, tmp_path, **{"model.head_init": "pca"})
  plain_config = _config(folder, tmp_path, **{"model.head_init": "pca",
                                              "frozen_cache.enabled": False})
  model = _model(cached_config)
  cache = frozen_cache.open_or_build(cached_config, model)
  _, eval_graphdef, params, model_state = train_state.split_model(model)
  variables = {"params": params, "model_state": model_state}
  mesh = parallel.make_mesh()
  a = head_init.pca_head_params(cached_config, eval_graphdef, variables, mesh, cache)
  b = head_init.pca_head_params(plain_config, eval_graphdef, variables, mesh)
  np.testing.assert_allclose(a["kernel"], b["kernel"], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-3, atol=1e-5)
  assert a["kernel"].shape == params["head"]["projection"]["kernel"].shape
  # A run starts from it: untrained, its embeddings of the training images are the projection.
  config = _config(folder, tmp_path, **{"model.head_init": "pca", "train.steps": 0,
                                        "eval.every": 0, "eval.split": "train"})
  got = train.train_and_evaluate(config, str(tmp_path / "pca"))
  features, labels = embed_lib.embed_split(
      head_init.make_pooled_fn(eval_graphdef, from_frozen=False), variables, mesh, plain_config,
      split="train")
  kernel, bias = head_init.pca_projection(features, a["kernel"].shape[1])
  embeddings = features @ kernel + bias
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  from rankjax import evaluation  # pylint: disable=g-import-not-at-top
  evaluator = evaluation.Evaluator(config.eval.metrics, distance=config.eval.distance,
                                   nmi_seed=seeding.stream_seed(config.seed, "nmi"))
  want = {k: float(v) for k, v in evaluator.run(embeddings, labels)}
  random_head = train.train_and_evaluate(
      _config(folder, tmp_path, **{"train.steps": 0, "eval.every": 0, "eval.split": "train"}),
      str(tmp_path / "random"))
  assert got == pytest.approx(want, abs=1e-4)
  assert got != pytest.approx(random_head, abs=1e-4)


def test_hosts_read_their_shards_and_together_make_the_global_batch(folder, tmp_path):
  config = _config(folder, tmp_path, augment=True, data_shards=2, **{
      "frozen_cache.views": 3, "frozen_cache.dtype": "float16"})
  cache = frozen_cache.open_or_build(config, _model(config))
  one = frozen_cache.train_batches(cache, config, process_index=0, process_count=1)
  hosts = [frozen_cache.train_batches(cache, config, process_index=h, process_count=2)
           for h in (0, 1)]
  for _ in range(3):
    want = next(one)
    parts = [next(h) for h in hosts]
    assert parts[0]["label"].size == want["label"].size // 2
    for key in ("activation", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
  # Evaluation: each host its contiguous shard, padded to the same number of batches.
  whole = list(frozen_cache.eval_batches(cache, config, split="test", batch_size=16))
  halves = [list(frozen_cache.eval_batches(cache, config, split="test", batch_size=16,
                                           process_index=h, process_count=2)) for h in (0, 1)]
  assert len(halves[0]) == len(halves[1])
  got = np.concatenate([b["activation"][b["mask"]] for h in halves for b in h])
  np.testing.assert_array_equal(got, np.concatenate([b["activation"][b["mask"]] for b in whole]))
