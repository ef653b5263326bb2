"""Saving and loading a module's weights as a plain ``.npz`` file (no pickle).

The file holds one array per variable (parameters and BatchNorm statistics), keyed by its path in
the module (``stages/0/1/conv1/kernel``), plus string metadata under ``__meta__/``: which
architecture it fits and the input convention its weights expect. ``np.load(...,
allow_pickle=False)`` reads it, so loading a downloaded file cannot execute code.

Example:
  >>> import tempfile, os
  >>> from flax import nnx
  >>> from rankjax.models import resnet
  >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")
  >>> save_weights(resnet.ResNetTiny(rngs=nnx.Rngs(0)), path, architecture="resnet_tiny")
  >>> load_weights(resnet.ResNetTiny(rngs=nnx.Rngs(1)), path, architecture="resnet_tiny")
  {'architecture': 'resnet_tiny', 'format_version': '1'}
"""

from __future__ import annotations

import os
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT_VERSION = "1"
_META = "__meta__/"


def _key(path) -> str:
  return "/".join(map(str, path))


def module_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
  """Every variable of ``module`` as ``{path: numpy array}``."""
  return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module))}


def save_weights(module: nnx.Module, path: str | os.PathLike, *, architecture: str,
                 **metadata: str) -> None:
  """Writes every variable of ``module`` and ``metadata`` to the ``.npz`` file ``path``.

  The write is atomic (a temporary file renamed into place), so an interrupted conversion never
  leaves a truncated file for a later run to load.
  """
  arrays = module_arrays(module)
  meta = {"architecture": architecture, "format_version": FORMAT_VERSION, **metadata}
  arrays.update({_META + k: np.array(str(v)) for k, v in meta.items()})
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp creates it private; the weights are meant to be shared.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The ``__meta__`` strings of a weights file."""
  with np.load(path, allow_pickle=False) as f:
    return {k[len(_META):]: str(f[k]) for k in f.files if k.startswith(_META)}


def load_weights(module: nnx.Module, path: str | os.PathLike, *,
                 architecture: str | None = None,
                 optional_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
  """Loads the ``.npz`` file ``path`` into ``module`` in place and returns its metadata.

  ``module`` may be abstract (``nnx.eval_shape(lambda: ResNet50(rngs=...))``), which skips the
  random initialisation that loading would overwrite. Arrays of the file under one of
  ``optional_prefixes`` (e.g. ``("classifier/",)``: an ImageNet classifier) are skipped when the
  module has no such variables.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file was written for another ``architecture``, or its variables do not match
      the module's (missing, unexpected or differently shaped arrays are listed).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained weights file {path!r} does not exist.")
  with np.load(path, allow_pickle=False) as f:
    meta = {k[len(_META):]: str(f[k]) for k in f.files if k.startswith(_META)}
    stored = {k: f[k] for k in f.files if not k.startswith(_META)}
  if architecture is not None and meta.get("architecture") != architecture:
    raise ValueError(f"{path!r} holds weights for {meta.get('architecture')!r}, not for "
                     f"{architecture!r}.")
  assign_arrays(module, stored, source=repr(path), optional_prefixes=optional_prefixes)
  return meta


def assign_arrays(module: nnx.Module, arrays: dict[str, np.ndarray], *, source: str,
                  optional_prefixes: tuple[str, ...] = ()) -> None:
  """Sets every variable of ``module`` from ``arrays`` (``{path: array}``), in place.

  Arrays under ``optional_prefixes`` that the module has no variable for are skipped.

  Raises:
    ValueError: naming ``source``, when arrays are missing, unexpected or differently shaped.
  """
  flat = list(nnx.to_flat_state(nnx.state(module)))
  expected = {_key(p): v for p, v in flat}
  arrays = {k: v for k, v in arrays.items()
            if k in expected or not k.startswith(tuple(optional_prefixes))}
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  wrong_shape = [f"{k}: {np.shape(arrays[k])} instead of {tuple(expected[k].shape)}"
                 for k in expected
                 if k in arrays and np.shape(arrays[k]) != tuple(expected[k].shape)]
  if missing or unexpected or wrong_shape:
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape)):
      if items:
        more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
        problems.append(f"{label}: {', '.join(items[:5])}{more}")
    raise ValueError(f"{source} does not match the model's variables; " + "; ".join(problems))
  # get_value() rather than v[...]: the module may be abstract (built under nnx.eval_shape).
  updated = [(p, v.replace(jnp.asarray(arrays[_key(p)], dtype=v.get_value().dtype)))
             for p, v in flat]
  nnx.update(module, nnx.from_flat_state(updated))
