"""Learning rates, weight decays and step counts that cannot train are errors at the config."""

import logging

import pytest

from rankjax import configs


def _config(**changes):
  config = configs.base_config()
  config.update_from_flattened_dict(changes)
  return config


def test_the_defaults_pass():
  configs.check_config(configs.base_config())


@pytest.mark.parametrize("changes", [
    {"train.steps": 0},  # Evaluates the untrained network.
    {"optimizer.learning_rate": 1e-9},
    {"optimizer.head_learning_rate": 0.5, "optimizer.proxy_learning_rate": 2.0},
    {"optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0},
    {"optimizer.weight_decay": 4e-4, "optimizer.grad_clip_norm": 1.0},
    {"optimizer.warmup_steps": 0, "eval.every": 0},
    {"optimizer.warmup_steps": 100, "eval.every": 50, "optimizer.decay_steps": (0, 500)},
    {"optimizer.learning_rate": 1},  # An integer is a number too.
])
def test_valid_values(changes):
  configs.check_config(_config(**changes))


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", -1.0, r"config.optimizer.learning_rate must be a positive number; "
                                      r"got -1.0 \(at 0 nothing trains, below 0 the loss is "
                                      r"climbed"),
    ("optimizer.learning_rate", 0.0, r"optimizer.learning_rate must be a positive number; got 0.0"),
    ("optimizer.learning_rate", float("nan"), r"learning_rate must be a positive number; got nan"),
    ("optimizer.learning_rate", float("inf"), r"learning_rate must be a positive number; got inf"),
    ("optimizer.head_learning_rate", 0.0, r"optimizer.head_learning_rate must be a positive"),
    ("optimizer.head_learning_rate", -1e-4, r"optimizer.head_learning_rate must be a positive"),
    ("optimizer.proxy_learning_rate", 0.0, r"optimizer.proxy_learning_rate must be a positive"),
    ("optimizer.proxy_learning_rate", -0.1, r"optimizer.proxy_learning_rate must be a positive"),
    ("optimizer.decay_factor", 0.0, r"optimizer.decay_factor must be a positive number; got 0.0"),
    ("optimizer.decay_factor", -0.1, r"optimizer.decay_factor must be a positive number"),
    ("optimizer.weight_decay", -1e-4, r"optimizer.weight_decay must be 0 \(off\) or positive; "
                                      r"got -0.0001"),
    ("optimizer.grad_clip_norm", -1.0, r"optimizer.grad_clip_norm must be 0 \(off\) or positive"),
    ("train.steps", -1, r"config.train.steps must be a non-negative integer; got -1"),
    ("optimizer.warmup_steps", -10, r"optimizer.warmup_steps must be a non-negative integer"),
    ("optimizer.decay_steps", (100, -5), r"optimizer.decay_steps\[1\] must be a non-negative"),
    ("eval.every", -1, r"config.eval.every must be a non-negative integer; got -1"),
    ("train.log_every", 0, r"config.train.log_every must be a positive integer; got 0"),
    ("train.checkpoint_every", -5, r"config.train.checkpoint_every must be a positive integer"),
    ("train.keep_checkpoints", 0, r"config.train.keep_checkpoints must be a positive integer"),
])
def test_invalid_values_are_errors_naming_the_field(key, value, message):
  with pytest.raises(ValueError, match=message):
    configs.check_config(_config(**{key: value}))


@pytest.mark.parametrize("loss", ["triplet_semihard", "contrastive", "npairs", "multi_similarity"])
def test_one_class_per_batch_is_an_error_for_losses_that_need_negatives(loss):
  config = configs.with_loss(_config(), loss)
  config.classes_per_batch = 1
  with pytest.raises(ValueError, match=r"classes_per_batch=1: loss .* a batch of one class has "
                                       r"none"):
    configs.check_config(config)


def test_one_class_per_batch_trains_a_proxy_loss():
  config = configs.with_loss(_config(), "proxy_anchor")
  config.classes_per_batch = 1
  configs.check_config(config)  # The proxies of the other classes are its negatives.


def test_a_pair_based_loss_with_more_than_two_samples_per_class_warns(caplog):
  config = configs.with_loss(_config(), "npairs")
  config.samples_per_class = 8
  with caplog.at_level(logging.WARNING):
    configs.check_config(config)
  assert any("uses 2 of the 8 images of each class" in r.getMessage() for r in caplog.records)
  caplog.clear()
  configs.check_config(configs.with_loss(_config(), "npairs"))
  assert not any("uses 2 of" in r.getMessage() for r in caplog.records)
