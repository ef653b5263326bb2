"""What resuming a workdir checks: the config, the lock, finite training, sound checkpoints."""

import json
import os
import socket

import jax.numpy as jnp
import numpy as np
import pytest

from rankjax import checkpoint
from rankjax import configs
from rankjax import health
from rankjax import resume
from rankjax import workdir_lock


def _recorded(tmp_path, **changes):
  """A workdir whose config.json is the base config, and a config with ``changes``."""
  resume.write_config(str(tmp_path), configs.base_config(), num_channels=1)
  config = configs.base_config()
  config.update_from_flattened_dict(changes)
  return config


def test_a_new_workdir_or_the_same_config_passes(tmp_path):
  resume.check_config(str(tmp_path), configs.base_config())
  resume.check_config(str(tmp_path), _recorded(tmp_path))


def test_every_differing_field_is_listed(tmp_path):
  config = _recorded(tmp_path, **{"optimizer.learning_rate": 0.01, "seed": 3})
  with pytest.raises(resume.ConfigChangedError) as error:
    resume.check_config(str(tmp_path), config)
  assert "optimizer.learning_rate: 0.001 -> 0.01" in str(error.value)
  assert "seed: 0 -> 3" in str(error.value)
  assert "--config.train.allow_config_changes=True" in str(error.value)


@pytest.mark.parametrize("changes, refused", [
    ({"train.steps": 3000, "train.log_every": 10, "eval.every": 100}, None),
    ({"train.steps": 1000}, "train.steps: 1500 -> 1000"),  # Shorter: never.
    ({"train.checkpoint_every": 100, "model.embedding_dim": 64}, "model.embedding_dim"),
])
def test_the_opt_in_allows_the_safe_fields_only(tmp_path, changes, refused):
  config = _recorded(tmp_path, **changes, **{"train.allow_config_changes": True})
  if refused is None:
    resume.check_config(str(tmp_path), config)
  else:
    with pytest.raises(resume.ConfigChangedError, match=refused) as error:
      resume.check_config(str(tmp_path), config)
    assert "train.checkpoint_every: 500 -> 100" not in str(error.value)


def test_a_checkpoint_past_the_last_step_is_an_error():
  resume.check_restored_step(100, 100, "w")
  with pytest.raises(ValueError, match="at step 100, past config.train.steps=50"):
    resume.check_restored_step(100, 50, "w")


def test_the_workdir_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirInUseError) as error:
      with workdir_lock.hold(str(tmp_path)):
        pass
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(error.value)
  with workdir_lock.hold(str(tmp_path)):  # Released at the end of the block.
    pass


def test_non_finite_leaves_are_named():
  tree = {"params": {"head": jnp.array([1.0, jnp.nan]), "body": jnp.ones(2)},
          "count": jnp.int32(3), "scale": jnp.array(jnp.inf)}
  assert sorted(health.non_finite_leaves(tree)) == ["params/head", "scale"]
  assert health.non_finite_leaves({"a": jnp.zeros(3)}) == []


def test_the_guard_names_the_first_non_finite_step_and_the_kept_checkpoint():
  guard = health.FiniteGuard(describe_kept=lambda: "ckpt/4")
  guard.add(5, {"loss": jnp.float32(0.3), "grad_norm": jnp.float32(1.0)})
  guard.check({"w": jnp.ones(2)})
  guard.add(6, {"loss": jnp.float32(0.3), "grad_norm": jnp.float32(jnp.inf)})
  guard.add(7, {"loss": jnp.float32(jnp.nan), "grad_norm": jnp.float32(jnp.nan)})
  with pytest.raises(health.NonFiniteError, match=r"diverged at step 6: grad_norm is inf.*ckpt/4"):
    guard.check()
  guard.add(8, {"loss": jnp.float32(0.3)})
  with pytest.raises(health.NonFiniteError, match=r"after step 8 the parameters w"):
    guard.check({"w": jnp.array([jnp.nan])})


def _tree(value):
  return {"params": {"w": np.full(4, value, np.float32)}}


def test_a_repeated_best_save_is_skipped_and_evaluations_are_recorded(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), best_metric="recall@1")
  ckpts.save_best(2, _tree(2.0), {"recall@1": 0.5})
  ckpts.close()
  again = checkpoint.Checkpoints(str(tmp_path), best_metric="recall@1")
  assert again.evaluation(2) == {"recall@1": 0.5} and again.evaluation(4) is None
  again.save_best(2, _tree(2.0), {"recall@1": 0.5})  # A resumed run repeating step 2.
  again.save_best(4, _tree(4.0), {"recall@1": 0.4})
  again.close()
  assert json.loads((tmp_path / checkpoint.EVALUATIONS_FILE).read_text()) == {
      "val": {"2": {"recall@1": 0.5}, "4": {"recall@1": 0.4}}}
  _, best = checkpoint.restore_model(str(tmp_path), _tree(0.0), which="best")
  assert best["step"] == 2


def _saved(tmp_path, steps):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  for step in steps:
    ckpts.save(step, _tree(float(step)), _tree(-float(step)))
  ckpts.close()
  for step in steps:
    assert (tmp_path / checkpoint.LATEST_DIR / str(step) / checkpoint.CHECKSUMS_FILE).exists()


def _damage(step_dir):
  """Changes one byte of the largest file of the model item."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir / "model") for n in ns]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, caplog):
  _saved(tmp_path, (2, 4))
  _damage(tmp_path / checkpoint.LATEST_DIR / "4")
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  with caplog.at_level("WARNING"):
    model, training, progress = ckpts.restore_latest(_tree(0.0), _tree(0.0))
  assert progress["step"] == 2 and float(model["params"]["w"][0]) == 2.0
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert "checksums" in warning and os.path.join(checkpoint.LATEST_DIR, "4") in warning
  assert f"Resuming from {os.path.join(str(tmp_path), checkpoint.LATEST_DIR, '2')}" in warning
  assert ckpts.latest_step == 2 and os.listdir(tmp_path / checkpoint.CORRUPT_DIR)
  ckpts.save(4, _tree(4.0), _tree(-4.0))  # The step can be saved again.
  ckpts.close()


def test_non_finite_values_in_a_checkpoint_are_corruption_too(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  ckpts.save(2, _tree(np.nan), _tree(0.0))
  ckpts.close()
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=r"No checkpoint in .* can be restored: .*non-finite values in model"):
    ckpts.restore_latest(_tree(0.0), _tree(0.0))
  ckpts.close()
