"""Device mesh, shardings and global batches for data-parallel training.

rankjax trains data-parallel with ``jax.jit`` over a 1-D mesh whose single axis, ``"data"``, spans
every device of every host (DESIGN.md: jit + ``NamedSharding``, not ``pmap``). Parameters and
optimizer state are replicated; the batch is split along its leading axis. Because the jitted step
sees the *global* batch as one array, a ranking loss computed inside it compares every embedding
with every other one, whichever device produced it: negatives come from the whole global batch, and
BatchNorm statistics are global too (XLA inserts the all-reduces).

Single host::

  mesh = make_mesh()
  batch = global_batch({"image": images, "label": labels}, mesh)   # numpy in, sharded jax.Array out

Multi-host (a TPU pod slice, a GPU cluster): call :func:`initialize_distributed` first; every host
then feeds its own slice of the global batch (``process_index``/``process_count`` in
:func:`rankjax.data.train_batches`) and :func:`global_batch` assembles the global array from the
per-host pieces without moving data between hosts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def initialize_distributed(**kwargs) -> None:
  """Connects the hosts of a multi-host job (``jax.distributed.initialize``); idempotent.

  On Cloud TPU and under SLURM / Open MPI the coordinator is discovered automatically; elsewhere
  pass ``coordinator_address=``, ``num_processes=`` and ``process_id=``.
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices must hold at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its leading axis split over the ``"data"`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def jit_data_parallel(step: Callable, state: Any, mesh: Mesh, *, donate: bool = True
                      ) -> tuple[Callable, Any]:
  """Jits ``step(state, batch) -> (state, outputs)`` data-parallel over ``mesh``.

  The state (any pytree) is replicated and, with ``donate``, donated (updated in place); the
  batch is split along its leading axis; the outputs (metrics) are replicated.

  Returns:
    ``(jitted step, state sharding)``; place the initial state with
    ``jax.device_put(state, sharding)``.
  """
  state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
  jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharded(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
  return jitted, state_sharding


def check_global_batch_size(global_batch_size: int, mesh: Mesh, *,
                            what: str = "batch") -> None:
  """Raises ``ValueError`` unless ``global_batch_size`` splits evenly over the mesh's devices.

  Example:
    >>> check_global_batch_size(96, make_mesh(jax.devices()[:1]))  # fine on one device
  """
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(
        f"{what} of {global_batch_size} is not divisible by {n} devices: choose a global batch "
        f"size that is a multiple of {n} (e.g. {max(n, global_batch_size // n * n)} or "
        f"{(global_batch_size // n + 1) * n}).")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what} of {global_batch_size} is not divisible by "
                     f"{jax.process_count()} hosts.")


def global_batch(host_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this host's numpy batch into global arrays sharded along the ``"data"`` axis.

  Args:
    host_batch: a dict of arrays whose leading axis is this host's share of the global batch
      (on a single host, the whole global batch).
    mesh: the mesh from :func:`make_mesh`.

  Returns:
    The same dict of ``jax.Array`` with leading size ``host size * process_count``, sharded with
    :func:`batch_sharded`.
  """
  sharding = batch_sharded(mesh)
  sizes = {k: np.shape(v)[0] for k, v in host_batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"every entry of the batch needs the same leading size; got {sizes}.")
  check_global_batch_size(next(iter(sizes.values())) * jax.process_count(), mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(host_batch), sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def to_host(x: Any) -> Any:
  """Fetches (possibly multi-host sharded) arrays to numpy on every host, in global order."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)
