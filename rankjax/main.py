r"""Command-line entry point: ``python -m rankjax.main --config=FILE[:ARG] --workdir=DIR``.

Example (Omniglot, semi-hard triplets; the config's docstring says what it reaches)::

  python -m rankjax.main --config=experiments/configs/omniglot.py:triplet_semihard \
      --workdir=/tmp/omniglot --config.data_dir=/tmp/tfds --config.train.steps=200

Every config field can be overridden with ``--config.<field>=<value>``; a misspelled field is an
error. Running the same command again resumes from the last checkpoint in ``--workdir``.
"""

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  configs.check_config(config)
  logging.info("Config:\n%s", config)
  metrics = train.train_and_evaluate(config, _WORKDIR.value)
  logging.info("Final metrics: %s", metrics)


if __name__ == "__main__":
  app.run(main)
