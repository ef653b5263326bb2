r"""Command-line entry point: ``python -m rankjax.main --config=FILE[:ARG] --workdir=DIR``.

Example (Omniglot, semi-hard triplets; the config's docstring says what it reaches)::

  python -m rankjax.main --config=experiments/configs/omniglot.py:triplet_semihard \
      --workdir=/tmp/omniglot --config.data_dir=/tmp/tfds --config.train.steps=200

Every config field can be overridden with ``--config.<field>=<value>``; a misspelled field is an
error. Running the same command again resumes from the last checkpoint in ``--workdir``.

``--cpu_devices=N`` splits the host CPU into N JAX devices for the data-parallel step (each
device computes its share of the batch on its own thread); on CPU-only machines this uses the
cores better than one device does (benchmarks/cpu_devices.py). The results do not depend on it
beyond float rounding: the loss always sees the whole global batch.

**Several processes** (one per host of a TPU pod slice or a GPU cluster, or several on one machine)
run the same command with the same config; only the launch flags differ. ``--distributed`` joins
the job through JAX's own discovery (Cloud TPU, SLURM, Open MPI); elsewhere name it with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (process 0 listens on
HOST:PORT). ``python -m rankjax.launch`` starts such a job on one machine; docs/distributed.md
covers clusters.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rankjax import configs
from rankjax import parallel
from rankjax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration: experiments/configs/<dataset>.py:<loss>[,runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the CPU into this many JAX devices (data-parallel on one host); "
    "default: JAX's (one).", lower_bound=1)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process job: jax.distributed.initialize() discovers the "
    "other processes (Cloud TPU, SLURM, Open MPI) unless --coordinator_address, --num_processes "
    "and --process_id name them. Implied by any of those, and by config.distributed.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT where process 0 runs JAX's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process, 0 .. num_processes - 1.", lower_bound=0)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join.", lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds after which a silent process counts as dead and every "
    "other process stops with an error.", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


@flags.multi_flags_validator(["num_processes", "process_id"],
                             message="--process_id must be smaller than --num_processes.")
def _check_process_id(values):
  n, i = values["num_processes"], values["process_id"]
  return n is None or i is None or i < n


def initialize_devices(config) -> None:
  """Applies the device flags (CPU devices, the distributed job) before any device is used."""
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  named = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or config.distributed or any(v is not None for v in named):
    parallel.initialize_distributed(
        coordinator_address=named[0], num_processes=named[1], process_id=named[2],
        initialization_timeout=_INITIALIZATION_TIMEOUT.value,
        heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  initialize_devices(config)
  configs.check_config(config)
  logging.info("Config:\n%s", config)
  metrics = train.train_and_evaluate(config, _WORKDIR.value)
  logging.info("Final metrics: %s", metrics)


if __name__ == "__main__":
  app.run(main)
