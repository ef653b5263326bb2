"""Reductions and option checks shared by the loss modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rankjax import similarity

def references(embeddings, labels, ref_embeddings, ref_labels, ref_self_index):
  """Checks the reference set; returns ``(ref_embeddings, masks)`` for the pairwise matrix.

  ``masks`` holds the keyword arguments of :func:`rankjax.similarity.positive_mask` (and of the
  :mod:`rankjax.mining` functions): ``{}`` without references.
  """
  ref_embeddings, ref_labels, ref_self_index = similarity.check_references(
      embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
  if ref_labels is None:
    return None, {}
  return ref_embeddings, {"ref_labels": ref_labels, "ref_self_index": ref_self_index}


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, and 0 (with a zero gradient) when ``count`` is 0."""
  count = jnp.asarray(count, jnp.float32)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  r""":math:`\log \sum_{mask} e^{x}` along ``axis``, stabilised by the masked maximum.

  Returns ``(value, nonempty)``: ``value`` is 0 where the mask is empty along ``axis`` (the
  caller decides what an empty sum means); both value and gradient are always finite.
  """
  nonempty = jnp.any(mask, axis=axis)
  peak = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  shifted = jnp.where(mask, x - peak, 0.0)
  total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=axis)
  value = jnp.log(jnp.where(nonempty, total, 1.0)) + jnp.squeeze(peak, axis)
  return jnp.where(nonempty, value, 0.0), nonempty


def log1p_sum_exp(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  r""":math:`\log(1 + \sum_{mask} e^{x})` along ``axis``: 0 for an empty mask, never inf or NaN."""
  peak = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  peak = lax.stop_gradient(jnp.maximum(peak, 0.0))  # the "1" is e^0, so the peak is at least 0
  shifted = jnp.where(mask, x - peak, 0.0)
  total = jnp.exp(-peak) + jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=axis,
                                   keepdims=True)
  return jnp.squeeze(jnp.log(total) + peak, axis)


def concrete_float(value, name: str):
  """``float(value)``, or None when ``value`` is traced (e.g. under ``vmap`` over a margin)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None
  except ValueError as error:
    raise ValueError(f"{name} must be a number; got {value!r}.") from error


def check_positive(value, name: str):
  """Raises ``ValueError`` when a concrete ``value`` is not a finite number > 0."""
  concrete = concrete_float(value, name)
  if concrete is not None and not (np.isfinite(concrete) and concrete > 0):
    raise ValueError(f"{name} must be a finite number > 0; got {value}.")


def check_choice(value, name: str, allowed: tuple[str, ...]):
  """Raises ``ValueError`` naming ``name`` when ``value`` is not one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def check_flag(value, name: str) -> bool:
  """A Python (or NumPy) bool option; anything else is a ``ValueError``."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False; got {value!r}.")
  return bool(value)
