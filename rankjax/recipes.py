r"""The shared recipes of the experiment configs (``experiments/configs/<dataset>.py``).

* :func:`roth2020_recipe` -- the ResNet-50 recipe of Roth, Milbich et al. 2020 for CUB-200-2011,
  Cars196 and Stanford Online Products on an accelerator, with the Wang et al. 2017 and Hermans et
  al. 2017 variants as flags (``FINE_GRAINED_FLAGS``).
* :func:`cpu_photo_recipe` -- ImageNet EfficientNet-Lite0 fine-tuned on a CPU in minutes: the
  protocol of the offline LFW, Cars196-half and CUB first-50 sets and of any image folder, with its
  untrained baselines as flags (``CPU_PHOTO_FLAGS``).

Each returns a config of :func:`rankjax.configs.base_config` with the loss's paper
hyper-parameters (:func:`rankjax.configs.with_loss`); an experiment file picks the dataset and
passes its flags (``configs.parse_arg``).
"""

from __future__ import annotations

import ml_collections

from rankjax import configs

# The flags of the cub200, cars196 and sop configs: a published recipe, and/or a smoke-test size.
FINE_GRAINED_FLAGS = ("wang2017", "hermans2017", "runlocal")


def roth2020_recipe(dataset: str, loss: str, flags: set[str], *, steps: int,
                    eval_every: int, checkpoint_every: int) -> ml_collections.ConfigDict:
  """The fine-grained / SOP recipe of Roth, Milbich et al. 2020, shared by cub200, cars196 and sop.

  ImageNet ResNet-50 with frozen BatchNorm, 224 px, 128-d, batch 112 (56 classes x 2), Adam 1e-5
  with weight decay 4e-4, bfloat16 compute. Two other published recipes replace the batch,
  optimizer and loss settings (the backbone stays Roth et al.'s):

  * ``"wang2017"``: the N-pairs / angular recipe of Wang et al. 2017, "Deep Metric Learning with
    Angular Loss" (ICCV): batches of 64 classes x 2 images, a 512-d embedding, alpha = 45 degrees
    and lambda = 2 for N-pairs + angular (the defaults of ``npairs_angular``), SGD with momentum
    0.9 at 1e-4 (their solver; the learning rate is common re-implementations', not checked here
    against the paper);
  * ``"hermans2017"``: the batch-hard recipe of Hermans et al. 2017, "In Defense of the Triplet
    Loss for Person Re-Identification": P = 18 classes x K = 4 images, Adam 3e-4 decayed by 10x
    for the last 10,000 of 25,000 steps (they decay exponentially), and the soft margin for
    ``triplet_hard``.

  ``"runlocal" in flags`` shrinks any of them to a few steps of a tiny ResNet at 64 px (smoke tests
  on mock data).
  """
  c = configs.base_config()
  c.dataset = dataset
  c.image_size = 224
  c.classes_per_batch, c.samples_per_class = 56, 2
  c.model.name = "resnet50"
  c.model.pretrained = "imagenet"
  c.model.freeze_batchnorm = True
  c.model.embedding_dim = 128
  c.model.dtype = "bfloat16"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.weight_decay = 4e-4
  c.train.steps = steps
  c.train.log_every = 100
  c.train.checkpoint_every = checkpoint_every
  c.eval.every = eval_every
  c.eval.batch_size = 256
  configs.with_loss(c, loss)
  if {"wang2017", "hermans2017"} <= set(flags):
    raise ValueError("Choose one recipe: 'wang2017' or 'hermans2017', not both.")
  if "wang2017" in flags:
    c.classes_per_batch, c.samples_per_class = 64, 2
    c.model.embedding_dim = 512
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 1e-4
  if "hermans2017" in flags:
    c.classes_per_batch, c.samples_per_class = 18, 4
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "step"
    c.optimizer.decay_steps = (15000,)
    c.train.steps = 25000
    c.loss.triplet_hard.soft = True
  if "runlocal" in flags:
    _runlocal(c, image_size=64, eval_every=0)
    c.optimizer.learning_rate = 1e-3
  return c


# The flags of the CPU photo recipe (lfw, folder, and the offline variants of cub200 / cars196):
# the two untrained baselines, and the smoke-test size.
CPU_PHOTO_BASELINES = ("imagenet_features", "random_init")
# The recipe at the encoder's own scale, from a frozen-trunk cache (see cpu_photo_recipe).
CPU_PHOTO_VARIANTS = ("cache224",)
CPU_PHOTO_FLAGS = CPU_PHOTO_BASELINES + CPU_PHOTO_VARIANTS + ("runlocal",)


def cpu_photo_recipe(dataset: str, loss: str, flags: set[str], *,
                     image_size: int = 112) -> ml_collections.ConfigDict:
  """Fine-tuning ImageNet EfficientNet-Lite0 on a photo or face folder, in minutes on a CPU.

  The protocol every loss shares on the offline sets (``lfw``, ``cars196_half``,
  ``cub200_first50``) and on any ``folder:PATH``: EfficientNet-Lite0 with its ImageNet weights
  and frozen BatchNorm (Roth et al. 2020 freeze it too), a 128-d head, ``image_size`` px random
  resized crops and flips, batches of 16 classes x 4 images (32 x 2 for the N-pair family), Adam
  with the head at 10x the backbone's learning rate, 200 steps; only the last 5 MBConv blocks, the
  1280-channel head convolution and the embedding head train (``frozen_blocks=11``). The
  validation split (the last 20% of the training classes) is evaluated every 25 steps and its
  MAP@R chooses the checkpoint whose test metrics are reported. ``"runlocal"`` shrinks it to a
  few steps of a tiny network (smoke tests).

  The baselines every table shows beside the trained losses, with the same evaluation (``loss``
  only names the run): ``"imagenet_features"``, the pooled 1280-d features of the ImageNet network
  without training or head; ``"random_init"``, the same of a randomly initialised network.

  ``"cache224"``: the encoder at the scale it was trained on, cheaply (:func:`_cache224`): 224 px
  (the stored images upsampled), the stem and the first 13 of the 16 MBConv blocks frozen and
  computed once into a frozen-trunk cache of 8 augmented views per training image
  (:mod:`rankjax.frozen_cache`), the head started on the principal axes of the training images'
  features (:mod:`rankjax.head_init`), Adam at 1e-4 for the last three blocks, the head
  convolution and the head, with a 50-step warm-up and a cosine decay over 400 steps, the
  validation split every 50 steps (a checkpoint with each). With a
  baseline flag, that baseline at 224 px.
  """
  c = configs.base_config()
  c.dataset = dataset
  c.image_size = image_size
  c.classes_per_batch, c.samples_per_class = 16, 4
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = "imagenet"
  c.model.freeze_batchnorm = True
  # The stem and the first 11 of the 16 MBConv blocks stay at their ImageNet weights: no backward
  # through them makes a step 3x faster, and the validation metrics were as good as fine-tuning
  # everything (the training sets have 20 to 672 classes).
  c.model.backbone_options.frozen_blocks = 11
  c.model.embedding_dim = 128
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.head_learning_rate = 1e-3
  c.train.steps = 200
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.eval.every = 25
  c.eval.best_metric = "map@r"  # Steadier than Recall@1 on validation splits of a few classes.
  c.eval.batch_size = 128
  if "cache224" in flags:
    _cache224(c)
  configs.with_loss(c, loss)
  if "runlocal" in flags:
    _runlocal(c, image_size=32, eval_every=2)
  if flags & set(CPU_PHOTO_BASELINES):
    if len(flags & set(CPU_PHOTO_BASELINES)) > 1:
      raise ValueError(f"choose one baseline of {', '.join(CPU_PHOTO_BASELINES)}; got "
                       f"{', '.join(sorted(flags))}.")
    c.model.embedding_dim = None  # The pooled features, no head.
    c.model.head_init = "random"
    c.train.steps = 0
    c.eval.every = 0
    if "random_init" in flags:
      c.model.pretrained = None
  return c


def _cache224(c: ml_collections.ConfigDict) -> None:
  """The CPU photo recipe at 224 px from a frozen-trunk cache (settings chosen on validation).

  Chosen on the validation classes of Cars196 half with contrastive, by MAP@R (the numbers are in
  experiments/results/faces_vs_fine_grained.md): the PCA head starts above a random one and ends
  above it; 1e-4 with the cosine decay levels off where 3e-4 over-fits and 3e-5 ends lower; with
  16 or 15 blocks frozen the runs level off lower than with 13, and 13 frozen levels off within
  400 steps (validation MAP@R 0.181, against 0.178 over 1,000 steps and 0.165 with 16 frozen).
  """
  c.image_size = 224
  c.model.backbone_options.frozen_blocks = 13
  c.model.head_init = "pca"
  c.frozen_cache.enabled = True
  c.frozen_cache.views = 8
  c.augment_options.antialias = True
  c.optimizer.learning_rate = 1e-4
  c.optimizer.head_learning_rate = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 50
  c.train.steps = 400
  c.train.log_every = 50
  c.train.checkpoint_every = 50
  c.eval.every = 50


def _runlocal(c: ml_collections.ConfigDict, *, image_size: int, eval_every: int) -> None:
  """Shrinks a recipe to a smoke test: 4 steps of a tiny random ResNet on 4 x 2 batches."""
  c.image_size = image_size
  c.classes_per_batch, c.samples_per_class = 4, 2
  c.model.name = "resnet_tiny"
  c.model.pretrained = None
  c.model.freeze_batchnorm = False
  c.model.dtype = "float32"
  c.model.backbone_options = ml_collections.ConfigDict()
  c.train.steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.eval.every = eval_every
  c.eval.batch_size = 16
