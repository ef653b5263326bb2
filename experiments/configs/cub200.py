r"""CUB-200-2011 zero-shot retrieval: train on birds 1-100 (5,864 images), test on 101-200 (5,924).

Command (on an accelerator; TFDS ``caltech_birds2011`` prepared in ``--config.data_dir``)::

  python -m rankjax.main --config=experiments/configs/cub200.py:triplet_semihard \
      --config.data_dir=~/tensorflow_datasets --workdir=/tmp/cub200_triplet_semihard

Recipe: Roth, Milbich et al. 2020, "Revisiting Training Strategies and Generalization Performance
in Deep Metric Learning" (ICML): ImageNet ResNet-50 (Keras' weights) with frozen BatchNorm, a
128-d head, Adam lr 1e-5 with weight decay 4e-4, batch 112 (here 56 classes x 2 images), random
resized crop to 224 px and horizontal flip,
150 epochs (5,864 x 150 / 112 = 7,854 steps). Every 1,000 steps the validation split (the last
20% of the training classes, which therefore train on 80%) is evaluated and ``best/`` keeps the best
Recall@1; the test classes are evaluated once, at the end, on that checkpoint (Musgrave et al.
2020's protocol; the papers chose on the test classes). The loss's hyper-parameters, and
whether the head L2-normalises, are its paper's (rankjax/configs.py). bfloat16 compute on the
accelerator.

Their R@1 (ResNet-50, 128-d), not reproduced here: triplet semi-hard 61.4, N-pair 59.0, margin 63.4.

The N-pairs / angular recipe of Wang et al. 2017 (64 classes x 2, 512-d, alpha 45, lambda 2) and the
batch-hard recipe of Hermans et al. 2017 (P = 18, K = 4, soft margin) are flags (details in
``rankjax.recipes.roth2020_recipe``)::

  python -m rankjax.main --config=experiments/configs/cub200.py:npairs_angular,wang2017 ...
  python -m rankjax.main --config=experiments/configs/cub200.py:triplet_hard,hermans2017 ...

``:<loss>,runlocal`` is a few steps of a tiny ResNet at 64 px (smoke tests on mock data).

**Offline, on a CPU** (``:<loss>,offline``): dataset ``cub200_first50``, CUB-200-2011's first 50
classes (2,889 images; ``cub200/<NNN.Name>/*.jpg``): classes 1-25 train (the last 5 of them
validate), 26-50 test; the N-pair family trains on 20 classes x 2, every training class. Unpack
the tar into DATA_DIR; the CPU recipe is :func:`rankjax.recipes.cpu_photo_recipe` (ImageNet
EfficientNet-Lite0 fine-tuned at 112 px).
``:<loss>,offline,cache224`` is the CPU recipe at 224 px from a frozen-trunk cache (built in
DATA_DIR on the first run, reused by every later one; ``,imagenet_features`` added gives the
features at 224 px). ``:<loss>,offline,imagenet_features`` and ``:<loss>,offline,random_init``
are the untrained baselines (pooled features of the ImageNet network, and of a random one).
Numbers from it are of that partial set, not the full benchmark::

  tar xf cub200_first50.tar -C DATA_DIR
  python -m rankjax.main --config=experiments/configs/cub200.py:npairs,offline \
      --config.data_dir=DATA_DIR --workdir=/tmp/cub200_first50_npairs
  python -m rankjax.main --config=experiments/configs/cub200.py:npairs,offline,cache224 \
      --config.data_dir=DATA_DIR --workdir=/tmp/cub200_first50_npairs_224
"""

from rankjax import configs
from rankjax import recipes

OFFLINE_TRAIN_CLASSES = 20  # cub200_first50: classes 1-25 train, the last 5 of them validate.


def get_config(arg: str | None = None):
  loss, flags = configs.parse_arg(arg, default_loss="triplet_semihard",
                                  allowed_flags=recipes.FINE_GRAINED_FLAGS + ("offline",)
                                  + recipes.CPU_PHOTO_BASELINES + recipes.CPU_PHOTO_VARIANTS)
  cpu_only = recipes.CPU_PHOTO_BASELINES + recipes.CPU_PHOTO_VARIANTS
  if flags & set(cpu_only) and "offline" not in flags:
    raise ValueError(f"{', '.join(cpu_only)} are flags of the CPU recipe: add 'offline'.")
  if "offline" in flags:
    if flags & {"wang2017", "hermans2017"}:
      raise ValueError("'offline' is the CPU recipe; it does not combine with a published one.")
    c = recipes.cpu_photo_recipe("cub200_first50", loss, flags - {"offline"})
    if configs.loss_spec(loss).samples_per_class and "runlocal" not in flags:
      # One positive pair per class bounds the N-pair batch by the 20 training classes: 20 x 2.
      c.classes_per_batch = min(c.classes_per_batch, OFFLINE_TRAIN_CLASSES)
    return c
  return recipes.roth2020_recipe("cub200", loss, flags, steps=7854, eval_every=1000,
                                 checkpoint_every=1000)
