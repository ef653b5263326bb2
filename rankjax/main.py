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
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rankjax import configs
from rankjax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration: experiments/configs/<dataset>.py:<loss>[,runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the CPU into this many JAX devices (data-parallel on one host); "
    "default: JAX's (one).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # Before any device is used.
  config = _CONFIG.value
  configs.check_config(config)
  logging.info("Config:\n%s", config)
  metrics = train.train_and_evaluate(config, _WORKDIR.value)
  logging.info("Final metrics: %s", metrics)


if __name__ == "__main__":
  app.run(main)
