"""Parameters that belong to the loss: the registry, their config keys, an embedder without them."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets

import rankjax
from rankjax import configs
from rankjax import evaluation
from rankjax import loss_params
from rankjax import train
from rankjax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config(arg):
  spec = importlib.util.spec_from_file_location(
      "digits", os.path.join(REPO, "experiments", "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_proxy_losses_have_one_proxy_per_training_label():
  for name in configs.PROXY_LOSSES:
    assert set(loss_params.specs(name)) == {"proxies"}
    params = loss_params.init_loss_params(name, 7, 5, jax.random.key(0),
                                          **configs.LOSS_DEFAULTS[name])
    # Sub-center ArcFace holds sub_centers proxies per class: [C, K, D].
    want = (7, 3, 5) if name == "subcenter_arcface" else (7, 5)
    assert params["proxies"].shape == want and params["proxies"].dtype == jnp.float32
  # The margin loss learns one beta per class, starting at loss.margin.beta.
  beta = loss_params.init_loss_params("margin", 7, 5, jax.random.key(0),
                                      **configs.LOSS_DEFAULTS["margin"])["beta"]
  start = configs.LOSS_DEFAULTS["margin"]["beta"]
  np.testing.assert_array_equal(beta, np.full(7, start, np.float32))
  for name in ("contrastive", "triplet_semihard", "npairs", "multi_similarity"):
    assert not loss_params.has_params(name)
    assert loss_params.init_loss_params(name, 7, 5, jax.random.key(0)) == {}
  with pytest.raises(ValueError, match="one parameter row per training class; got num_classes=0"):
    loss_params.init_loss_params("proxy_anchor", 0, 5, jax.random.key(0))


def test_init_draws_from_the_key_and_follows_the_seed():
  a = loss_params.init_loss_params("proxy_anchor", 4, 3, jax.random.key(0))["proxies"]
  b = loss_params.init_loss_params("proxy_anchor", 4, 3, jax.random.key(0))["proxies"]
  c = loss_params.init_loss_params("proxy_anchor", 4, 3, jax.random.key(1))["proxies"]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  config = configs.with_loss(configs.base_config(), "normalized_softmax")
  info = type("Info", (), {"train_classes": 6})
  first = train.init_loss_params(config, info)["proxies"]
  config.seed = 1
  assert not np.allclose(train.init_loss_params(config, info)["proxies"], first)
  config.rotate_classes = True
  assert train.init_loss_params(config, info)["proxies"].shape == (24, 128)


def test_proxies_start_at_the_kaiming_fan_out_scale():
  # kaiming_normal_(mode="fan_out") on a [C, D] weight: std sqrt(2 / C), C the class rows.
  # At least 200,000 draws: the sample std's standard error is under 0.16%, so 1% is 6 of them.
  for num_classes in (50, 200):
    proxies = loss_params.init_loss_params("proxy_anchor", num_classes, 4096,
                                           jax.random.key(3))["proxies"]
    np.testing.assert_allclose(np.std(proxies), np.sqrt(2.0 / num_classes), rtol=0.01)
    assert abs(float(np.mean(proxies))) < 0.01
  centers = loss_params.init_loss_params("subcenter_arcface", 100, 1024, jax.random.key(3),
                                         sub_centers=3)["proxies"]
  np.testing.assert_allclose(np.std(centers), np.sqrt(2.0 / 100), rtol=0.01)


def test_a_registered_parameter_gets_its_options_and_its_config_keys(monkeypatch):
  # A learnable scale for multi-similarity, as a new loss would declare one: its shape follows the
  # loss's options and its learning rate a key of the loss's config section, which the loss
  # itself never receives.
  monkeypatch.setattr(loss_params, "_REGISTRY", dict(loss_params._REGISTRY))  # pylint: disable=protected-access
  seen = {}

  def init(key, num_classes, dim, *, alpha, **rest):
    seen.update(rest, alpha=alpha, dim=dim)
    return jnp.full((num_classes,), alpha) + 0.0 * jax.random.normal(key, ())

  loss_params.register("multi_similarity", alpha=loss_params.LossParam(
      init=init, learning_rate=lambda config: config.loss.multi_similarity.alpha_learning_rate,
      config_keys=("alpha_learning_rate",)))
  config = configs.with_loss(configs.base_config(), "multi_similarity")
  config.loss.multi_similarity.alpha_learning_rate = 0.25
  assert "alpha_learning_rate" not in configs.loss_kwargs(config)
  assert configs.loss_kwargs(config)["alpha"] == 2.0
  params = train.init_loss_params(config, type("Info", (), {"train_classes": 3}))
  np.testing.assert_array_equal(params["alpha"], [2.0, 2.0, 2.0])
  assert seen["dim"] == 128 and seen["beta"] == 50.0
  assert loss_params.learning_rates("multi_similarity", config) == {"alpha": 0.25}
  with pytest.raises(ValueError, match="cannot be called 'head'"):
    loss_params.register("contrastive", head=loss_params.LossParam(init=init,
                                                                   learning_rate=lambda c: 1.0))


def test_load_embedder_needs_neither_the_dataset_nor_the_loss(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = _digits_config("proxy_anchor,runlocal")
  config.train.steps = 2
  metrics = train.train_and_evaluate(config, workdir)

  def unavailable(*args, **kwargs):
    raise AssertionError("the embedder read the dataset")

  monkeypatch.setattr(datasets, "get_source", unavailable)
  monkeypatch.setattr(datasets, "get_dataset_info", unavailable)
  monkeypatch.setattr(rankjax.data, "get_dataset_info", unavailable)
  digits = sklearn.datasets.load_digits()
  keep = digits.target >= 5
  images = np.round(digits.images[keep] * 255 / 16).astype(np.uint8)[..., None]
  embeddings = rankjax.load_embedder(workdir)(images)
  assert embeddings.shape == (len(images), 64)
  # The embedder gives the embeddings the run was evaluated on.
  again = evaluation.retrieval_metrics(embeddings, digits.target[keep], ks=(1, 8))
  for key in ("recall@1", "recall@8", "map@r"):
    assert again[key] == pytest.approx(metrics[key], abs=2 / len(images)), key
