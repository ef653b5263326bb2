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

Multi-host (a TPU pod slice, a GPU cluster, or several processes on one machine with
``python -m rankjax.launch``): call :func:`initialize_distributed` first, and
:func:`check_same_config` before training; every host then feeds its own slice of the global
batch (``process_index``/``process_count`` in :func:`rankjax.data.train_batches`) and
:func:`global_batch` assembles the global array from the per-host pieces without moving data
between hosts. :func:`to_host` gathers outputs back to every host; :func:`process_order` puts the
rows of per-host evaluation shards back in the dataset's order.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           initialization_timeout: int = 300,
                           heartbeat_timeout: int = 100) -> None:
  """Connects the processes of a multi-process job (``jax.distributed.initialize``); idempotent.

  Call it before anything touches a device. On a Cloud TPU pod slice and under SLURM or Open MPI
  JAX discovers the cluster by itself (leave the first three arguments ``None``); elsewhere (a
  Kubernetes job, several processes on one machine) pass all three.

  Args:
    coordinator_address: ``host:port`` of process 0, where JAX's coordination service listens
      (on that address alone for a loopback host such as 127.0.0.1, on every interface
      otherwise); a port already taken is an error naming it, before JAX starts.
    num_processes: the number of processes of the job.
    process_id: this process, in ``[0, num_processes)``.
    initialization_timeout: seconds to wait for every process to connect before failing.
    heartbeat_timeout: seconds after which a silent process counts as dead; the coordination
      service then stops every other process with an error naming it, instead of letting them
      wait forever in a collective.

  Raises:
    ValueError: a ``process_id`` outside ``[0, num_processes)`` or a timeout below 1 s.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1; got {num_processes}.")
  if process_id is not None and (process_id < 0 or (num_processes is not None and
                                                     process_id >= num_processes)):
    raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes}).")
  for name, value in (("initialization_timeout", initialization_timeout),
                      ("heartbeat_timeout", heartbeat_timeout)):
    if value < 1:
      raise ValueError(f"{name} must be at least 1 second; got {value}.")
  if jax.distributed.is_initialized():
    return
  bind_address = coordinator_bind_address(coordinator_address)
  if coordinator_address is not None and process_id == 0:
    check_coordinator_port_free(coordinator_address, bind_address)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout,
                             coordinator_bind_address=bind_address)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def coordinator_bind_address(coordinator_address: str | None) -> str | None:
  """Where process 0's coordination service listens: ``HOST:PORT`` itself for a loopback host
  (a job on one machine is reachable from this machine only), else None, JAX's default (every
  interface, which the other hosts of a cluster need).

  Example:
    >>> coordinator_bind_address("127.0.0.1:8476")
    '127.0.0.1:8476'
    >>> coordinator_bind_address("10.0.0.2:8476") is None
    True
  """
  if coordinator_address is None:
    return None
  host, _, port = coordinator_address.rpartition(":")
  if host not in _LOOPBACK_HOSTS:
    return None
  return f"{'127.0.0.1' if host == 'localhost' else host}:{port}"


def check_coordinator_port_free(coordinator_address: str, bind_address: str | None) -> None:
  """Raises ``RuntimeError`` naming the address if process 0 cannot listen on its port.

  JAX's own failure ("Failed to start RPC server") names neither the address nor the cause,
  and the other processes would wait for the coordinator until their initialization timeout.
  """
  host, _, port = (bind_address or f"0.0.0.0:{coordinator_address.rpartition(':')[2]}"
                   ).rpartition(":")
  host = host.strip("[]")
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, int(port)))
    except OSError as e:
      raise RuntimeError(
          f"Process 0 cannot listen on the coordinator address {coordinator_address} "
          f"(binding {host}:{port}: {e.strerror}): another job or program holds the port. "
          "Give a free port in --coordinator_address (python -m rankjax.launch picks one)."
      ) from None


def check_same_config(config: Any, workdir: str) -> None:
  """Raises ``ValueError`` on every process unless all processes got the same config and workdir.

  Each process hashes ``config`` (its JSON, keys sorted) and ``workdir``; the hashes are
  gathered to every process and compared, so a job whose processes were started with different
  overrides stops before training instead of training on inconsistent shards. A no-op in a
  single-process job.
  """
  if jax.process_count() == 1:
    return
  to_json = getattr(config, "to_json_best_effort", None)
  text = to_json(sort_keys=True) if to_json else json.dumps(config, sort_keys=True, default=str)
  mine = np.stack([_digest(text), _digest(os.path.abspath(workdir))])
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2, words]
  for i, what in enumerate(("config", "workdir")):
    differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p, i], every[0, i])]
    if differ:
      raise ValueError(
          f"The processes of this job were started with different {what}s: process(es) "
          f"{differ} differ from process 0 ({what} hash {_hex(every[differ[0], i])} vs "
          f"{_hex(every[0, i])}). Every process must get the same --config file, the same "
          "--config.* overrides and the same --workdir (a directory all processes share); only "
          "--process_id differs between them.")


def _digest(text: str) -> np.ndarray:
  """The first 128 bits of the SHA-256 of ``text`` as uint32[4] (gatherable without x64)."""
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32).copy()


def _hex(words: np.ndarray) -> str:
  return np.asarray(words, np.uint32).tobytes().hex()[:12]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every host).

  The default orders the devices process by process, so each process's devices hold one
  contiguous block of a batch: the global batch is the processes' batches concatenated in
  process order (:func:`global_batch`).
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if not devices:
    raise ValueError("devices must hold at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its leading axis split over the ``"data"`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def jit_data_parallel(step: Callable, state: Any, mesh: Mesh, *, donate: bool = True,
                      batch_outputs: bool = False) -> tuple[Callable, Any]:
  """Jits ``step(state, batch) -> (state, outputs)`` data-parallel over ``mesh``.

  The state (any pytree) is replicated and, with ``donate``, donated (updated in place); the
  batch is split along its leading axis; the outputs (metrics) are replicated. With
  ``batch_outputs``, the step is ``step(state, batch) -> (state, outputs, per_example)`` and
  ``per_example`` (leading axis the batch) stays split like the batch.

  Returns:
    ``(jitted step, state sharding)``; place the initial state with
    ``jax.device_put(state, sharding)``.
  """
  state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
  out_shardings = (state_sharding, replicated(mesh))
  if batch_outputs:
    out_shardings += (batch_sharded(mesh),)
  jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharded(mesh)),
                   out_shardings=out_shardings, donate_argnums=(0,) if donate else ())
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


def process_order(rows: np.ndarray, batch_size: int, *, num_processes: int | None = None
                  ) -> np.ndarray:
  """Regroups the rows of consecutive global batches by the process that fed them.

  ``rows`` holds global batches of ``batch_size`` rows one after another, each the concatenation
  of the processes' equal parts (:func:`global_batch`). Returns process 0's part of every batch
  (in batch order), then process 1's, and so on. When each process walks its own contiguous shard
  of a dataset (:func:`rankjax.data.eval_batches`), that is the dataset in its own order, the
  order a single process sees. The identity in a single-process job.

  Example (two processes, global batches of 4; process 0 walks items 0-3, process 1 items 4-7)::

    >>> process_order(np.array([0, 1, 4, 5, 2, 3, 6, 7]), 4, num_processes=2)
    array([0, 1, 2, 3, 4, 5, 6, 7])
  """
  n = jax.process_count() if num_processes is None else num_processes
  rows = np.asarray(rows)
  if n == 1:
    return rows
  if batch_size % n or rows.shape[0] % batch_size:
    raise ValueError(f"{rows.shape[0]} rows are not whole global batches of {batch_size} split "
                     f"over {n} processes.")
  blocks = rows.reshape(rows.shape[0] // batch_size, n, batch_size // n, *rows.shape[1:])
  return blocks.swapaxes(0, 1).reshape(rows.shape)
