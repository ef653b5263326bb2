r"""Any folder of class subfolders of images: ``--config.dataset=folder:/path/to/root``.

Command (the folder is prepared once as TFRecords in ``--config.data_dir``, then streamed)::

  python -m rankjax.main --config=experiments/configs/folder.py:triplet_semihard \
      --config.dataset=folder:/path/to/root --config.data_dir=/path/to/tfds \
      --workdir=/tmp/folder_triplet_semihard

The classes, sorted by folder name, split in two: those with fewer than 2 images are dropped (the
log says which), the first half trains and the rest is the test set; the last 20% of the
training classes are the validation split that chooses the checkpoint
(``--config.protocol.train_fraction``, ``val_fraction``, ``min_images_per_class``, or explicit
``train_classes`` / ``test_classes`` change it). Grayscale and RGB folders; JPEG, PNG, BMP, GIF.

Recipe: :func:`rankjax.recipes.cpu_photo_recipe` (ImageNet EfficientNet-Lite0 fine-tuned at
112 px). ``:<loss>,imagenet_features`` evaluates the ImageNet network's pooled features as they
are, without training or head; ``:<loss>,random_init`` those of a random network (the baselines).
``:<loss>,runlocal`` is a few steps of a tiny ResNet (smoke tests).
"""

from rankjax import configs
from rankjax import recipes


def get_config(arg: str | None = None):
  loss, flags = configs.parse_arg(arg, default_loss="triplet_semihard",
                                  allowed_flags=recipes.CPU_PHOTO_FLAGS)
  # The path comes from the command line: "folder" alone is an error that asks for it.
  return recipes.cpu_photo_recipe("folder", loss, flags)
