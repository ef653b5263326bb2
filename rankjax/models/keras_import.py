r"""ImageNet ResNet-50 weights from ``keras.applications`` into the NNX ``ResNet50``.

TensorFlow ships Keras, and Keras downloads (once, into its own cache ``~/.keras/models``) the
ImageNet weights of ResNet-50 v1. This module copies them into the NNX ResNet-50 and saves them as
a pickle-free ``.npz`` file (:mod:`rankjax.models.weights`), which
``get_model("resnet50", pretrained=path)`` loads.

The mapping, for every Keras ``{block}_conv`` / ``{block}_bn`` pair (``conv1``,
``conv{2..5}_block{b}_{0..3}`` where ``_0`` is the projection shortcut):

* kernel: unchanged (Keras and Flax both store ``[kh, kw, in, out]``);
* BatchNorm ``gamma, beta, moving_variance`` -> ``scale, bias, var``;
* Keras' convolution bias :math:`c` feeds the BatchNorm, and
  :math:`\mathrm{BN}_\mu(Wx + c) = \mathrm{BN}_{\mu - c}(Wx)`, so the running mean becomes
  :math:`\mu - c` and the NNX convolutions need no bias. (In training mode the batch mean absorbs
  :math:`c` anyway.)

Input convention: Keras' ResNet50 expects "caffe" inputs (BGR, 0-255, minus the per-channel mean
``[103.939, 116.779, 123.68]``, no scaling). rankjax's input pipelines give RGB images standardised
with the ImageNet mean and standard deviation (``(x / 255 - mean) / std``), so a converted
model carries the affine map between the two (:func:`keras_input_transform`) and applies it before
its stem; the features then equal Keras' to float32 rounding.

Command line (on a machine with internet; ``--random_init`` for an offline check)::

  python -m rankjax.models.keras_import --output=resnet50_imagenet.npz
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from rankjax.models import resnet, weights

# torchvision's ImageNet statistics, which rankjax's input pipelines standardise RGB images with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keras.applications.imagenet_utils, mode="caffe": subtracted from BGR images in 0-255.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
KERAS_CAFFE = "keras_caffe_from_imagenet_standardized"
IMAGENET_FILE = "resnet50_keras_imagenet.npz"


def keras_input_transform():
  r"""``(scale, offset, reverse_channels)`` from standardised RGB to Keras' caffe input.

  .. math:: x_\text{caffe} = \mathrm{BGR}\big(255\,(\sigma x + m) - \mu_\text{caffe}\big)
  """
  scale = tuple(255.0 * s for s in IMAGENET_STD)
  offset = tuple(255.0 * m - c for m, c in zip(IMAGENET_MEAN, CAFFE_MEAN_BGR[::-1]))
  return scale, offset, True


def _block_names(stage_sizes):
  """Yields ``(nnx conv path, nnx bn path, keras prefix)`` for every conv/BN pair of ResNet-50."""
  yield ("stem_conv",), ("stem_bn",), "conv1"
  for s, num_blocks in enumerate(stage_sizes):
    for b in range(num_blocks):
      base = ("stages", s, b)
      prefix = f"conv{s + 2}_block{b + 1}"
      for i in (1, 2, 3):
        yield base + (f"conv{i}",), base + (f"bn{i}",), f"{prefix}_{i}"
      if b == 0:
        yield base + ("shortcut_conv",), base + ("shortcut_bn",), f"{prefix}_0"


def keras_resnet50_arrays(keras_model) -> dict[str, np.ndarray]:
  """The variables of :data:`~rankjax.models.resnet.ResNet50` from a Keras ResNet50 model.

  Args:
    keras_model: ``keras.applications.ResNet50(...)``, with or without its top.

  Returns:
    ``{"stages/0/0/conv1/kernel": array, ...}``: every variable of the NNX backbone.
  """
  arrays = {}
  for conv_path, bn_path, keras_prefix in _block_names((3, 4, 6, 3)):
    kernel, conv_bias = keras_model.get_layer(keras_prefix + "_conv").get_weights()
    bn = keras_model.get_layer(keras_prefix + "_bn")
    if not np.isclose(bn.epsilon, resnet.KERAS_BN_EPSILON):
      raise ValueError(f"{bn.name} has epsilon {bn.epsilon}; ResNet50 uses "
                       f"{resnet.KERAS_BN_EPSILON}.")
    gamma, beta, moving_mean, moving_var = bn.get_weights()
    conv_key, bn_key = "/".join(map(str, conv_path)), "/".join(map(str, bn_path))
    arrays[conv_key + "/kernel"] = kernel
    arrays[bn_key + "/scale"] = gamma
    arrays[bn_key + "/bias"] = beta
    arrays[bn_key + "/mean"] = moving_mean - conv_bias
    arrays[bn_key + "/var"] = moving_var
  return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def convert_keras_resnet50(keras_model, output_path: str | os.PathLike) -> str:
  """Converts a Keras ResNet50 into a rankjax weights file at ``output_path`` and returns the path.

  Load it with ``rankjax.models.get_model("resnet50", pretrained=output_path, rngs=...)``.
  """
  # Abstract: every variable is overwritten, so skip the random initialisation.
  backbone = nnx.eval_shape(
      lambda: resnet.ResNet50(input_transform=keras_input_transform(), rngs=nnx.Rngs(0)))
  weights.assign_arrays(backbone, keras_resnet50_arrays(keras_model), source="the Keras model")
  weights.save_weights(backbone, output_path, architecture="resnet50",
                       input_convention=KERAS_CAFFE, source="keras.applications.ResNet50")
  return os.fspath(output_path)


def default_cache_dir() -> str:
  """``$RANKJAX_CACHE_DIR``, else ``~/.cache/rankjax``."""
  return os.environ.get("RANKJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "rankjax")


def imagenet_resnet50_file(cache_dir: str | None = None) -> str:
  """The path of the converted ImageNet ResNet-50, converting it on first use.

  Keras fetches its weights (about 94 MB) into ``~/.keras/models`` the first time; later calls
  read the converted file from ``cache_dir``.

  Raises:
    RuntimeError: the weights could not be obtained (no internet access, typically), with the two
      ways around it.
  """
  path = os.path.join(cache_dir or default_cache_dir(), IMAGENET_FILE)
  if os.path.exists(path):
    return path
  import keras  # Imported here: TensorFlow takes seconds to import and only this path needs it.
  try:
    keras_model = keras.applications.ResNet50(weights="imagenet", include_top=False)
  except Exception as e:  # Keras raises a bare Exception for a failed download.
    raise RuntimeError(
        "pretrained='imagenet' could not fetch Keras' ImageNet ResNet50 weights "
        f"({type(e).__name__}: {e}). This needs internet access once; Keras then caches the file "
        "in ~/.keras/models. Without internet here: on a machine with it, run "
        "`python -m rankjax.models.keras_import --output=resnet50_imagenet.npz`, copy the file, "
        "and pass pretrained='path/to/resnet50_imagenet.npz'.") from e
  return convert_keras_resnet50(keras_model, path)


def main(argv):
  del argv
  import keras
  if FLAGS.random_init:
    keras_model = keras.applications.ResNet50(weights=None, include_top=False)
  else:
    keras_model = keras.applications.ResNet50(weights="imagenet", include_top=False)
  print("wrote", convert_keras_resnet50(keras_model, FLAGS.output))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("output", IMAGENET_FILE, "Where to write the converted .npz weights.")
  flags.DEFINE_bool("random_init", False,
                    "Convert a randomly initialised Keras ResNet50 (no download; for checks).")
  FLAGS = flags.FLAGS
  app.run(main)
