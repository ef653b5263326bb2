r"""scikit-learn's bundled handwritten digits (no download): train on digits 0-4, test on 5-9.

Command::

  python -m rankjax.main --config=experiments/configs/digits.py:triplet_semihard \
      --workdir=/tmp/digits

The embedded default dataset: 1,797 8x8 grayscale images (about 180 per digit), upsampled to
16 px. Zero-shot: the embedding is learnt on digits 0-4 and retrieval is measured on the unseen
digits 5-9. A small ResNet (3x3 stem, four basic-block stages of 32-256 channels, as He et al.
2016 build for CIFAR), a 64-d head, batches of all five training classes x 8 images (x 2 for the
N-pair family, which takes one pair per class), Adam 1e-3, 300 steps. The loss's
hyper-parameters are its paper's (rankjax/configs.py). A smoke test of the whole pipeline that
runs on any laptop, not a benchmark.

``:<loss>,runlocal`` shrinks it to a few steps.
"""

from rankjax import configs


def get_config(arg: str | None = None):
  loss, flags = configs.parse_arg(arg, default_loss="triplet_semihard")
  c = configs.base_config()
  c.dataset = "digits"
  c.image_size = 16
  c.classes_per_batch, c.samples_per_class = 5, 8
  c.model.name = "small_resnet"
  c.model.embedding_dim = 64
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.steps = 300
  c.train.log_every = 50
  c.train.checkpoint_every = 100
  c.eval.batch_size = 128
  configs.with_loss(c, loss)
  if configs.loss_spec(loss).samples_per_class:  # Only 5 training classes: one pair each.
    c.classes_per_batch, c.samples_per_class = 5, 2
  if "runlocal" in flags:
    c.model.backbone_options.widths = (8, 16, 16, 32)
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
  return c
