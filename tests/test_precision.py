"""The losses' pairwise matrices run at one documented precision: HIGHEST unless told otherwise.

On the CPU every precision computes in float32, so what is checked is that the option reaches
every matrix product, forward and backward: the ``precision`` of each ``dot_general`` in the
traced program (``jax.make_jaxpr``), sub-programs (custom VJPs, ``cond``, loops) included.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import configs
from rankjax import losses
from rankjax import similarity
from rankjax import train

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
DEFAULT = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)

X = jnp.asarray(np.random.default_rng(0).normal(size=(12, 4)), jnp.float32)
Y = jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])
REFS = jnp.asarray(np.random.default_rng(1).normal(size=(20, 4)), jnp.float32)
REF_LABELS = jnp.arange(20) % 5 - 1  # an empty slot (-1) in every five


def dot_precisions(jaxpr) -> list:
  """The ``precision`` parameter of every ``dot_general`` in ``jaxpr`` and its sub-jaxprs."""
  found = []

  def visit(value):
    if hasattr(value, "eqns"):  # a Jaxpr
      for eqn in value.eqns:
        if eqn.primitive.name == "dot_general":
          found.append(eqn.params["precision"])
        for param in eqn.params.values():
          visit(param)
    elif hasattr(value, "jaxpr"):  # a ClosedJaxpr
      visit(value.jaxpr)
    elif isinstance(value, (tuple, list)):
      for item in value:
        visit(item)

  visit(jaxpr.jaxpr)
  return found


def _loss_and_grad_jaxpr(fn, *args):
  return jax.make_jaxpr(jax.value_and_grad(fn))(*args)


def _extra_arguments(name):
  """What a loss takes besides the batch: its parameters (proxies, beta) and a PRNG key."""
  info = type("Info", (), {"train_classes": 4})
  config = configs.with_loss(configs.base_config(), name)
  config.model.embedding_dim = X.shape[1]
  extra = dict(train.init_loss_params(config, info))
  if losses.get_spec(name).takes_key:
    extra["key"] = jax.random.key(0)
  return extra


# Every config loss with the option; proxy_anchor and normalized_softmax have no precision=
# option yet and are checked at their (HIGHEST) default below.
PRECISION_LOSSES = [name for name, spec in losses.CATALOGUE.items()
                    if "precision" in inspect.signature(spec.fn).parameters]


@pytest.mark.parametrize("name", PRECISION_LOSSES)
def test_every_loss_runs_its_matmuls_at_highest_unless_told(name):
  extra = _extra_arguments(name)
  for options in ({}, {"distance": "cosine"}, {"distance": "squared_euclidean"}):
    fn = losses.get_loss(name)
    if options and "distance" not in fn.func.__kwdefaults__:
      continue
    jaxpr = _loss_and_grad_jaxpr(lambda x, o=options: fn(x, Y, **extra, **o), X)
    precisions = dot_precisions(jaxpr)
    assert precisions, "the loss has matrix products"
    assert all(p == HIGHEST for p in precisions), (name, options, precisions)
    jaxpr = _loss_and_grad_jaxpr(
        lambda x, o=options: fn(x, Y, precision="default", **extra, **o), X)
    assert all(p == DEFAULT for p in dot_precisions(jaxpr)), (name, options)
    assert len(dot_precisions(jaxpr)) == len(precisions)


def test_the_losses_without_the_option():
  assert set(losses.loss_names()) - set(PRECISION_LOSSES) <= {"proxy_anchor",
                                                               "normalized_softmax"}
  assert {"contrastive", "triplet_semihard", "triplet_hard", "triplet_all", "npairs", "angular",
          "npairs_angular", "lifted_structure", "multi_similarity"} <= set(PRECISION_LOSSES)


@pytest.mark.parametrize("name", ["contrastive", "triplet_semihard", "triplet_all",
                                  "multi_similarity"])
def test_the_precision_reaches_the_matrix_against_references(name):
  fn = losses.get_loss(name)

  def loss(x, r, **options):
    return fn(x, Y, ref_embeddings=r, ref_labels=REF_LABELS, **options)

  grads = jax.grad(loss, argnums=(0, 1))
  precisions = dot_precisions(jax.make_jaxpr(grads)(X, REFS))
  assert precisions and all(p == HIGHEST for p in precisions)
  fast = dot_precisions(jax.make_jaxpr(lambda x, r: grads(x, r, precision="default"))(X, REFS))
  assert fast and all(p == DEFAULT for p in fast)


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax"])
def test_proxy_losses_use_the_default_precision_of_the_similarities(name):
  fn = losses.get_loss(name)
  proxies = jnp.asarray(np.random.default_rng(2).normal(size=(4, 4)), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, p, y: fn(x, y, proxies=p), argnums=(0, 1)))(
      X, proxies, Y)
  precisions = dot_precisions(jaxpr)
  assert precisions and all(p == HIGHEST for p in precisions)


def test_similarity_functions_take_the_precision():
  for fn in (similarity.squared_euclidean_distances, similarity.cosine_similarities,
             similarity.pairwise_distances):
    for y in (None, REFS):
      default = dot_precisions(jax.make_jaxpr(lambda x, y=y: jnp.sum(fn(x, y)))(X))
      assert default and all(p == HIGHEST for p in default)
      for precision, expected in ((jax.lax.Precision.HIGH, (jax.lax.Precision.HIGH,) * 2),
                                  ("default", DEFAULT)):
        traced = jax.make_jaxpr(jax.grad(
            lambda x, y=y, p=precision: jnp.sum(fn(x, y, precision=p))))(X)
        assert all(p == expected for p in dot_precisions(traced)), (fn, precision)
  assert similarity.DEFAULT_PRECISION == jax.lax.Precision.HIGHEST


def test_precision_does_not_change_cpu_values():
  # On the CPU all settings compute in float32, so the option is free to change here.
  for name in ("triplet_semihard", "multi_similarity", "npairs"):
    fn = jax.jit(losses.get_loss(name), static_argnames="precision")
    np.testing.assert_allclose(float(fn(X, Y, precision="default")), float(fn(X, Y)), rtol=1e-6)


@pytest.mark.parametrize("name", ["triplet_semihard", "multi_similarity", "npairs", "angular"])
def test_an_unknown_precision_is_an_error(name):
  with pytest.raises(ValueError, match="precision='quickest' is not a matmul precision"):
    losses.get_loss(name)(X, Y, precision="quickest")
