r"""LFW-a faces, identity-disjoint retrieval: 672 people train, 168 validate, 840 test.

Data: the aligned, grayscale LFW-a (Huang et al. 2007; aligned by Wolf, Hassner and Taigman
2009): 13,233 images of 5,749 people as class folders ``lfw_a/<Person_Name>/*.jpg`` (128 x 128,
the central 160 px of the 250 px originals). Unpack it into a directory and pass that as
``--config.data_dir`` (the folder is prepared there once as TFRecords)::

  tar xf lfw_a.tar -C DATA_DIR
  python -m rankjax.main --config=experiments/configs/lfw.py:triplet_hard \
      --config.data_dir=DATA_DIR --workdir=/tmp/lfw_triplet_hard

Protocol (dataset ``lfw``, :mod:`rankjax.data.datasets`): the 1,680 people with two or more
images, sorted by name; the first 840 train, of which the last 168 are the validation split that
chooses the checkpoint, and the other 840 people (4,126 images) are the test set, each image a
query against all the others (cosine). The 4,069 people with a single image are not used.

Recipe: :func:`rankjax.recipes.cpu_photo_recipe` at 112 px (faces are grayscale: the network sees
the gray channel repeated as RGB). ``:<loss>,imagenet_features`` and ``:<loss>,random_init``
evaluate the baselines (the ImageNet network's pooled features without training, and a random
network's); ``:<loss>,runlocal`` is a few steps of a tiny ResNet (smoke tests).
``:<loss>,cache224`` is the recipe at 224 px from a frozen-trunk cache (built in DATA_DIR on the
first run, reused later)::

  python -m rankjax.main --config=experiments/configs/lfw.py:triplet_hard,cache224 \
      --config.data_dir=DATA_DIR --workdir=/tmp/lfw_triplet_hard_224
"""

from rankjax import configs
from rankjax import recipes


def get_config(arg: str | None = None):
  loss, flags = configs.parse_arg(arg, default_loss="triplet_hard",
                                  allowed_flags=recipes.CPU_PHOTO_FLAGS)
  return recipes.cpu_photo_recipe("lfw", loss, flags, image_size=112)
