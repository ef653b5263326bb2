"""The loss catalogue: each loss's spec, its learned parameters, a loss added from outside, and the
line that keeps every loss fact in rankjax/losses."""

import ast
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
from rankjax import losses
from rankjax import train
from rankjax.data import datasets
from rankjax.losses import spec as spec_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_LOSSES = ("proxy_anchor", "normalized_softmax", "arcface", "cosface", "subcenter_arcface")


def _digits_config(arg):
  spec = importlib.util.spec_from_file_location(
      "digits", os.path.join(REPO, "experiments", "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _init(name, *args, **options):
  return losses.get_spec(name).init_params(*args, **options)


def test_proxy_losses_have_one_proxy_per_training_label():
  for name in PROXY_LOSSES:
    spec = losses.get_spec(name)
    assert set(spec.params) == {"proxies"} and spec.learns_proxies
    params = _init(name, jax.random.key(0), 7, 5, **spec.defaults)
    # Sub-center ArcFace holds sub_centers proxies per class: [C, K, D].
    want = (7, 3, 5) if name == "subcenter_arcface" else (7, 5)
    assert params["proxies"].shape == want and params["proxies"].dtype == jnp.float32
  # The margin loss learns one beta per class, starting at loss.margin.beta.
  margin = losses.get_spec("margin")
  beta = margin.init_params(jax.random.key(0), 7, 5, **margin.defaults)["beta"]
  np.testing.assert_array_equal(beta, np.full(7, 1.2, np.float32))
  for name in ("contrastive", "triplet_semihard", "npairs", "multi_similarity"):
    assert not losses.get_spec(name).params
    assert _init(name, jax.random.key(0), 7, 5) == {}
  with pytest.raises(ValueError, match="one parameter row per training class; got num_classes=0"):
    _init("proxy_anchor", jax.random.key(0), 0, 5)


def test_init_draws_from_the_key_and_follows_the_seed():
  a = _init("proxy_anchor", jax.random.key(0), 4, 3)["proxies"]
  b = _init("proxy_anchor", jax.random.key(0), 4, 3)["proxies"]
  c = _init("proxy_anchor", jax.random.key(1), 4, 3)["proxies"]
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
    proxies = _init("proxy_anchor", jax.random.key(3), num_classes, 4096)["proxies"]
    np.testing.assert_allclose(np.std(proxies), np.sqrt(2.0 / num_classes), rtol=0.01)
    assert abs(float(np.mean(proxies))) < 0.01
  centers = _init("subcenter_arcface", jax.random.key(3), 100, 1024, sub_centers=3)["proxies"]
  np.testing.assert_allclose(np.std(centers), np.sqrt(2.0 / 100), rtol=0.01)


def test_proxies_train_at_100x_the_network_rate_unless_set():
  config = configs.with_loss(configs.base_config(), "cosface")
  config.optimizer.learning_rate = 3e-4
  assert losses.get_spec("cosface").learning_rates(config) == {"proxies": pytest.approx(3e-2)}
  config.optimizer.proxy_learning_rate = 0.5
  assert losses.get_spec("cosface").learning_rates(config) == {"proxies": 0.5}
  config = configs.with_loss(configs.base_config(), "margin")
  config.loss.margin.beta_learning_rate = 0.25
  assert losses.get_spec("margin").learning_rates(config) == {"beta": 0.25}


def test_config_names_and_get_loss_agree_for_every_name():
  config = configs.base_config()
  assert set(config.loss.keys()) == {"name", *losses.loss_names()}
  for name, spec in losses.CATALOGUE.items():
    assert spec.name == name
    assert losses.get_loss(name).func is spec.fn
    configs.check_loss_name(name)
    assert configs.parse_arg(name, "contrastive") == (name, set())
    assert dict(config.loss[name]) == dict(spec.defaults)
    with_it = configs.with_loss(configs.base_config(), name)
    configs.check_config(with_it)
    assert losses.get_loss(name, **configs.loss_kwargs(with_it)).func is spec.fn
  for other in ("triplet", "triplet_loss", "proxy_anchor_loss", "tripplet"):
    with pytest.raises(ValueError, match=f"Unknown loss {other!r}"):
      losses.get_loss(other)
    with pytest.raises(ValueError, match=f"config.loss.name: Unknown loss {other!r}"):
      configs.check_loss_name(other)


def test_each_spec_states_the_papers_conventions():
  # Independent of the catalogue: the normalisation and batch layout each paper defines.
  unnormalised = {"npairs", "npairs_angular", "lifted_structure"}
  assert {n for n, s in losses.CATALOGUE.items() if not s.normalize} == unnormalised
  assert {n: s.samples_per_class for n, s in losses.CATALOGUE.items() if s.samples_per_class} == {
      "npairs": 2, "angular": 2, "npairs_angular": 2}
  assert losses.get_spec("triplet_hard").fixed == {"mining": "hard"}
  assert losses.get_spec("contrastive").diagnostic_options({"pos_margin": 0.1, "neg_margin": 0.7,
                                                            "distance": "cosine"}) == {
      "distance": "cosine", "pos_margin": 0.1, "neg_margin": 0.7}
  assert losses.get_spec("npairs").diagnostic_options({"l2_reg": 0.1}) == {"distance": "euclidean"}
  assert all(s.paper and s.label for s in losses.CATALOGUE.values())
  table = losses.catalogue.catalogue_table()
  for name, s in losses.CATALOGUE.items():
    assert f"\n{name} " in table and s.paper in table
  assert table in losses.catalogue.__doc__


def test_a_spec_that_contradicts_its_function_is_an_error():
  base = dict(name="mine", label="mine", fn=losses.contrastive_loss, paper="-",
              defaults={"neg_margin": 0.5}, normalize=True)
  spec_lib.LossSpec(**base)
  for change, match in [({"defaults": {"alpha": 1.0}}, r"defaults \['alpha'\] are neither"),
                        ({"fixed": {"mining": "hard"}}, r"fixed \['mining'\] are not keyword"),
                        ({"diagnostics": ("margin",)}, r"diagnostics \['margin'\]"),
                        ({"group": "new"}, "group must be one of"),
                        ({"name": "my-loss"}, "not an identifier")]:
    with pytest.raises(ValueError, match=match):
      spec_lib.LossSpec(**{**base, **change})
  param = spec_lib.LossParam(init=lambda key, c, d, **_: jnp.zeros(c), learning_rate=lambda c: 1.0)
  with pytest.raises(ValueError, match="cannot be called 'head'"):
    spec_lib.LossSpec(**{**base, "fn": losses.proxy_anchor_loss, "defaults": {},
                         "params": {"head": param}})
  with pytest.raises(ValueError, match="already registered"):
    losses.register_loss(losses.get_spec("contrastive"))


def _scaled_ms_loss(embeddings, labels, *, proxies_scale, alpha=2.0, beta=50.0):
  """Multi-similarity times a learned per-class scale: a loss that is not built in."""
  scale = jnp.mean(proxies_scale[labels])
  return scale * losses.multi_similarity_loss(embeddings, labels, alpha=alpha, beta=beta)


@pytest.fixture
def registered_loss(monkeypatch):
  """A loss added from outside the library: one spec, registered, removed afterwards."""
  monkeypatch.setattr(losses.catalogue, "CATALOGUE", dict(losses.CATALOGUE))
  monkeypatch.setattr(losses, "CATALOGUE", losses.catalogue.CATALOGUE)
  seen = {}

  def init(key, num_classes, dim, *, alpha, **rest):
    seen.update(rest, alpha=alpha, dim=dim)
    return jnp.full((num_classes,), alpha / 2.0) + 0.0 * jax.random.normal(key, ())

  spec = losses.register_loss(losses.LossSpec(
      name="scaled_ms", label="scaled MS", fn=_scaled_ms_loss, paper="a test",
      defaults={"alpha": 2.0, "beta": 50.0, "scale_learning_rate": 0.25}, normalize=True,
      group="later", params={"proxies_scale": losses.LossParam(
          init=init, learning_rate=lambda config: config.loss.scaled_ms.scale_learning_rate,
          config_keys=("scale_learning_rate",))}))
  yield spec, seen


def test_a_registered_loss_gets_its_section_options_and_parameters(registered_loss):
  spec, seen = registered_loss
  config = configs.with_loss(configs.base_config(), "scaled_ms")
  configs.check_config(config)
  assert dict(config.loss.scaled_ms) == {"alpha": 2.0, "beta": 50.0, "scale_learning_rate": 0.25}
  assert configs.loss_kwargs(config) == {"alpha": 2.0, "beta": 50.0}
  params = train.init_loss_params(config, type("Info", (), {"train_classes": 3}))
  np.testing.assert_array_equal(params["proxies_scale"], [1.0, 1.0, 1.0])
  assert seen["dim"] == 128 and seen["beta"] == 50.0
  assert spec.learning_rates(config) == {"proxies_scale": 0.25}
  assert "scaled_ms" in losses.loss_names("later") and not spec.takes_key


def test_a_registered_loss_trains_end_to_end(registered_loss, tmp_path):
  # The "adding a loss" recipe: the spec alone makes it a config loss the trainer runs.
  config = _digits_config("scaled_ms,runlocal")
  config.train.steps = 3
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0.0 < metrics["recall@1"] <= 1.0


def _loss_name_literals(path, names):
  tree = ast.parse(open(path).read())
  docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and node.body and isinstance(node.body[0], ast.Expr)}
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docstrings and node.value in names]


def test_no_library_module_outside_the_losses_names_a_loss():
  names = set(losses.loss_names())
  found = {}
  for root, _, files in os.walk(os.path.join(REPO, "rankjax")):
    if os.path.relpath(root, REPO).startswith(os.path.join("rankjax", "losses")):
      continue
    for f in files:
      if f.endswith(".py"):
        hits = _loss_name_literals(os.path.join(root, f), names)
        if hits:
          found[os.path.relpath(os.path.join(root, f), REPO)] = hits
  assert not found, f"loss names outside rankjax/losses: {found}"


def test_the_line_check_sees_a_loss_name(tmp_path):
  path = tmp_path / "m.py"
  path.write_text('"""Docstring: contrastive."""\nx = "contrastive"\ny = "contrast"\n')
  assert _loss_name_literals(str(path), {"contrastive"}) == [(2, "contrastive")]


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
