r"""The digits config at test size, for the multi-process tests (tests/test_distributed.py).

The same file drives every topology (one process x 4 CPU devices, two processes x 2 devices):
only the launch line differs. ``:<loss>`` as in experiments/configs/digits.py (default N-pairs,
a smooth loss, so that float rounding stays float rounding: no hard selection for a last-bit
difference to flip).
"""

from experiments.configs import digits


def get_config(arg: str | None = None):
  c = digits.get_config(arg or "npairs")
  c.classes_per_batch = 4  # Of the 5 training classes: 2 per data shard.
  c.data_shards = 2  # Fixed, so the global batches are the same on 1 and on 2 processes.
  c.model.backbone_options.widths = (8, 16)
  c.model.backbone_options.stage_sizes = (1, 1)
  c.model.embedding_dim = 16
  c.train.steps = 24
  c.train.log_every = 4
  c.train.checkpoint_every = 8
  c.eval.batch_size = 128
  return c
