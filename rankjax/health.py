r"""Non-finite training stops the run: the loss and gradient norm of each step, and the parameters.

A diverged run (a learning rate far too high, a corrupt input) otherwise trains on NaN weights to
the end and reports metrics of nothing. :class:`FiniteGuard` keeps each step's ``loss`` and
``grad_norm`` as the device arrays the step returned (no host sync per step) and checks them on
the host when the trainer asks, at each logging step and before each checkpoint save (with the
parameters too), so a non-finite state is never checkpointed: the last good checkpoint is kept.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

WATCHED_METRICS = ("loss", "grad_norm")


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or parameter."""


def non_finite_leaves(tree: Any) -> list[str]:
  """The paths (``"params/head/kernel"``) of the floating-point leaves of ``tree`` that hold a
  NaN or an infinity; ``[]`` when all are finite."""
  flags = _finite_flags(tree)
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, ok in jax.tree_util.tree_leaves_with_path(jax.device_get(flags)) if not ok]


@jax.jit
def _finite_flags(tree: Any) -> Any:
  def finite(x):
    x = jnp.asarray(x)
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jax.tree.map(finite, tree)


class FiniteGuard:
  """Collects the watched metrics of each step and raises :class:`NonFiniteError` on the host.

  Example::

    guard = FiniteGuard(describe_kept=ckpts.latest_description)
    for step in ...:
      state, metrics = train_step(state, batch)
      guard.add(step, metrics)
      if step % log_every == 0:
        guard.check()
      if step % checkpoint_every == 0:
        guard.check(state["params"])   # before the save: a NaN state is never saved
        ckpts.save(...)
  """

  def __init__(self, describe_kept: Callable[[], str] | None = None):
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._describe_kept = describe_kept

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, {k: metrics[k] for k in WATCHED_METRICS if k in metrics}))

  def check(self, params: Any = None) -> None:
    """Raises if a step since the last check, or ``params`` (the state after them), is not finite.

    The error names the first bad step and the checkpoint that is kept.
    """
    pending, self._pending = jax.device_get(self._pending), []
    for step, values in pending:
      bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
      if bad:
        raise NonFiniteError(
            f"Training diverged at step {step}: "
            f"{', '.join(f'{k} is {v}' for k, v in bad.items())}. {self._kept()}")
    if params is not None:
      bad_leaves = non_finite_leaves(params)
      if bad_leaves:
        step = pending[-1][0] if pending else "?"
        raise NonFiniteError(
            f"Training diverged: after step {step} the parameters {', '.join(bad_leaves[:3])} "
            f"hold non-finite values. {self._kept()}")

  def _kept(self) -> str:
    where = self._describe_kept() if self._describe_kept else "the last checkpoint"
    return (f"Nothing was saved of the diverged state; kept: {where}. Lower "
            "config.optimizer.learning_rate or clip gradients (config.optimizer.grad_clip_norm).")
