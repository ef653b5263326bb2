r"""Cars196 zero-shot retrieval: train on car models 1-98 (8,054 images), test on 99-196 (8,131).

Command (on an accelerator; TFDS ``cars196`` prepared in ``--config.data_dir``)::

  python -m rankjax.main --config=experiments/configs/cars196.py:triplet_semihard \
      --config.data_dir=~/tensorflow_datasets --workdir=/tmp/cars196_triplet_semihard

Recipe: Roth, Milbich et al. 2020, "Revisiting Training Strategies and Generalization Performance
in Deep Metric Learning" (ICML): ImageNet ResNet-50 (Keras' weights) with frozen BatchNorm, a
128-d head, Adam lr 1e-5 with weight decay 4e-4, batch 112 (here 56 classes x 2 images), random
resized crop to 224 px and horizontal flip,
150 epochs (8,054 x 150 / 112 = 10,787 steps). Every 1,000 steps the validation split (the last
20% of the training classes, which therefore train on 80%) is evaluated and ``best/`` keeps the best
Recall@1; the test classes are evaluated once, at the end, on that checkpoint (Musgrave et al.
2020's protocol; the papers chose on the test classes). The loss's hyper-parameters, and
whether the head L2-normalises, are its paper's (rankjax/configs.py). bfloat16 compute on the
accelerator.

Their R@1 (ResNet-50, 128-d), not reproduced here: triplet semi-hard 75.2, N-pair 69.5, margin 79.3.

The N-pairs / angular recipe of Wang et al. 2017 (64 classes x 2, 512-d, alpha 45, lambda 2) and the
batch-hard recipe of Hermans et al. 2017 (P = 18, K = 4, soft margin) are flags (details in
``rankjax.recipes.roth2020_recipe``)::

  python -m rankjax.main --config=experiments/configs/cars196.py:npairs_angular,wang2017 ...
  python -m rankjax.main --config=experiments/configs/cars196.py:triplet_hard,hermans2017 ...

``:<loss>,runlocal`` is a few steps of a tiny ResNet at 64 px (smoke tests on mock data).

**Offline, on a CPU** (``:<loss>,offline``): dataset ``cars196_half``, the Stanford Cars
train-annotation half (8,144 images, all 196 classes, about half of each class's images;
``cars196/<NNN>_<Make_Model_Year>/*.jpg``): classes 1-98 train (the last 20 of them validate),
99-196 (4,092 images) test. Unpack the tar into DATA_DIR; the CPU recipe
is :func:`rankjax.recipes.cpu_photo_recipe` (ImageNet EfficientNet-Lite0 fine-tuned at 112 px).
``:<loss>,offline,cache224`` is the CPU recipe at 224 px from a frozen-trunk cache (built in
DATA_DIR on the first run, reused by every later one; ``,imagenet_features`` added gives the
features at 224 px). ``:<loss>,offline,imagenet_features`` and ``:<loss>,offline,random_init``
are the untrained baselines (pooled features of the ImageNet network, and of a random one).
Numbers from it are of that partial set, not the full benchmark::

  tar xf cars196_half.tar -C DATA_DIR
  python -m rankjax.main --config=experiments/configs/cars196.py:npairs,offline \
      --config.data_dir=DATA_DIR --workdir=/tmp/cars196_half_npairs
  python -m rankjax.main --config=experiments/configs/cars196.py:npairs,offline,cache224 \
      --config.data_dir=DATA_DIR --workdir=/tmp/cars196_half_npairs_224
"""

from rankjax import configs
from rankjax import recipes


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
    return recipes.cpu_photo_recipe("cars196_half", loss, flags - {"offline"})
  return recipes.roth2020_recipe("cars196", loss, flags, steps=10787, eval_every=1000,
                                 checkpoint_every=1000)
