r"""One root key per seed, split into every random stream of a run.

A run with ``config.seed = s`` draws all of its randomness from ``jax.random.key(s)``: each
consumer folds a fixed stream id into that root key, so the streams of one seed are independent
of each other and no two seeds share a stream (seed ``s``'s augmentation is never seed
``s + 1``'s initialisation, as it would be with ``seed + 1`` offsets).

================== ======================================================================
stream             used by
================== ======================================================================
``init``           the network's initialisation (``nnx.Rngs``)
``loss_params``    the loss's own parameters (class proxies), rankjax.loss_params
``data``           the P x K schedule and the tf.data augmentation (rankjax.data)
``device_augment`` the on-device affine augmentation (rankjax.augment.random_affine)
``rotate_classes`` the class rotations (rankjax.augment.rotate_classes)
``loss``           losses that sample (e.g. distance-weighted sampling), one key per step
``nmi``            k-means++ of the NMI metric
================== ======================================================================

Example::

  >>> stream_seed(0, "init") != stream_seed(0, "data") != stream_seed(1, "init")
  True
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

STREAMS = ("init", "loss_params", "data", "device_augment", "rotate_classes", "loss", "nmi",
           "cache_view")


def _stream_id(name: str) -> int:
  if name not in STREAMS:
    raise ValueError(f"Unknown random stream {name!r}; the streams are {', '.join(STREAMS)}.")
  return zlib.crc32(name.encode())


def stream_key(seed: int, name: str) -> jax.Array:
  """The JAX key of stream ``name`` of ``seed``: ``fold_in(key(seed), crc32(name))``."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer; got {seed!r}.")
  return jax.random.fold_in(jax.random.key(int(seed)), _stream_id(name))


def stream_seed(seed: int, name: str) -> int:
  """A 32-bit integer seed (``0 <= value < 2**32``) for stream ``name`` of ``seed``.

  For consumers that take integers (numpy's ``SeedSequence``, tf.data's stateless ops, the NMI's
  k-means++). It is drawn from :func:`stream_key`, so it follows the same root key; 32 bits are
  what ``jax.random.key`` keeps of an integer without ``jax_enable_x64``.
  """
  return int(jax.random.bits(stream_key(seed, name), (), np.uint32))
