r"""Cross-batch memory (XBM): the embeddings of past batches as references for a pair-based loss.

Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020: embeddings
drift slowly during training, so those computed at recent steps stand in for the current model's
and give each anchor far more positives and negatives than one batch holds. The memory is a ring
buffer of the last ``M`` embeddings (no gradient flows into it) and their labels; with
``config.xbm.enabled`` the train step's loss is, as in the authors' code,

.. math::
   L = \ell(X, X) + w\,\ell(X, \mathcal{M})

where :math:`\ell(X, \mathcal{M})` is the same loss with anchors from the batch :math:`X` and
positives and negatives from the memory :math:`\mathcal{M}` (``ref_embeddings=``, see
:mod:`rankjax.similarity`). At each step from ``start_step`` on (a warm-up, while embeddings still
move fast), the batch's embeddings are first written into the memory at slots
``(ptr + i) mod M`` and the pointer advances by ``B``; the memory term then runs over the whole
memory, the current batch's copies included, with each anchor's own copy excluded
(``ref_self_index``), as pytorch-metric-learning's ``CrossBatchMemory`` does. Before
``start_step`` the memory stays empty and :math:`L = \ell(X, X)`. Empty slots carry label -1 and
are in no pair.

On several devices the batch is the global batch, so the memory holds global batches and a step
is the same on any number of devices. The memory is part of the train state (``state["xbm"]``)
and of its checkpoints, so a resumed run continues with the same memory.

Only losses that take a reference set (``ref_embeddings``, ``ref_self_index``) can use it: those
whose spec ``takes_references`` (:mod:`rankjax.losses.catalogue`); :func:`check_loss` says which.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from rankjax import losses

EMPTY_LABEL = -1  # The label of a memory slot that holds nothing yet.


@dataclasses.dataclass(frozen=True)
class MemorySettings:
  """``config.xbm`` as the train step uses it.

  Attributes:
    size: ``M``, the number of embeddings the memory holds (at least one global batch).
    start_step: the first step (0-based, ``state["step"]``) that writes and uses the memory.
    weight: :math:`w`, the weight of the memory term.
  """
  size: int
  start_step: int
  weight: float


def settings(config) -> MemorySettings | None:
  """The :class:`MemorySettings` of ``config.xbm``, or None when it is disabled."""
  if not config.xbm.enabled:
    return None
  return MemorySettings(int(config.xbm.size), int(config.xbm.start_step), float(config.xbm.weight))


def check_loss(spec: losses.LossSpec) -> None:
  """Raises ``ValueError`` unless the loss of ``spec`` can compare the batch with a memory: a
  reference set and the index of each anchor's own copy in it (``ref_embeddings``,
  ``ref_self_index``)."""
  if not spec.takes_references:
    able = [s.name for s in losses.CATALOGUE.values() if s.takes_references]
    raise ValueError(f"config.xbm needs a loss that takes a reference set (ref_embeddings); "
                     f"{spec.name!r} does not. Those that do: {', '.join(able)}.")


def init_memory(size: int, embedding_dim: int) -> dict[str, jax.Array]:
  """An empty memory: ``{"embeddings": f32[M, D], "labels": int32[M] (-1), "pointer": int32[]}``."""
  if int(size) <= 0:
    raise ValueError(f"The memory size must be a positive integer; got {size}.")
  return {"embeddings": jnp.zeros((size, embedding_dim), jnp.float32),
          "labels": jnp.full((size,), EMPTY_LABEL, jnp.int32),
          "pointer": jnp.zeros((), jnp.int32)}


def enqueue(memory: dict[str, jax.Array], embeddings: jax.Array, labels: jax.Array
            ) -> tuple[dict[str, jax.Array], jax.Array]:
  """Writes the batch at slots ``(pointer + i) mod M``, oldest first overwritten.

  Args:
    memory: from :func:`init_memory` (or an earlier :func:`enqueue`).
    embeddings: ``f32[B, D]`` with ``B <= M``; stored without gradient.
    labels: ``int[B]``.

  Returns:
    ``(memory, slots int32[B])``: the new memory and where each row of the batch went (the
    ``ref_self_index`` of a loss against the new memory).
  """
  size = memory["labels"].shape[0]
  batch = embeddings.shape[0]
  if batch > size:
    raise ValueError(f"A batch of {batch} does not fit in a memory of {size}: config.xbm.size "
                     "must hold at least one global batch.")
  slots = (memory["pointer"] + jnp.arange(batch, dtype=jnp.int32)) % size
  stored = lax.stop_gradient(embeddings).astype(memory["embeddings"].dtype)
  return {"embeddings": memory["embeddings"].at[slots].set(stored),
          "labels": memory["labels"].at[slots].set(labels.astype(jnp.int32)),
          "pointer": (memory["pointer"] + batch) % size}, slots


def loss_with_memory(loss_fn: Callable[..., jax.Array], embeddings: jax.Array, labels: jax.Array,
                     memory: dict[str, jax.Array], step: jax.Array, memory_settings: MemorySettings,
                     **loss_options) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  r"""The XBM loss :math:`\ell(X, X) + w\,\ell(X, \mathcal{M})` of one step, and the new memory.

  From ``step >= start_step`` on the batch is enqueued first and the memory term computed
  against the updated memory (each anchor's own copy excluded); before, the memory is left
  untouched and the memory term is 0. Differentiable in ``embeddings`` (the memory is not).

  Returns:
    ``(loss f32[], memory, memory_loss f32[])``.
  """
  batch_loss = loss_fn(embeddings, labels, **loss_options)

  def with_memory(memory):
    memory, slots = enqueue(memory, embeddings, labels)
    value = loss_fn(embeddings, labels, ref_embeddings=memory["embeddings"],
                    ref_labels=memory["labels"], ref_self_index=slots, **loss_options)
    return value.astype(jnp.float32), memory

  def before_start(memory):
    return jnp.zeros((), jnp.float32), memory

  memory_loss, memory = lax.cond(step >= memory_settings.start_step, with_memory, before_start,
                                 memory)
  return batch_loss + memory_settings.weight * memory_loss, memory, memory_loss
