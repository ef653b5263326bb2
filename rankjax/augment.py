r"""Training augmentations applied on the device, inside the jitted step, to a whole global batch.

* :func:`rotate_classes`: Omniglot's class augmentation (a character turned by 90 degrees is a new
  character).
* :func:`random_affine`: a small random rotation, scaling and shift of each image (bilinear
  resampling, edges extended), the usual regulariser for handwritten characters (e.g. Simard et al.
  2003, "Best Practices for Convolutional Neural Networks Applied to Visual Document Analysis").

Both are pure functions of ``(batch, step)`` and a base key, so a resumed run sees the same
batches, and both work on the global batch whatever its sharding (no host round trip: at 28 px a
CPU input pipeline would cost as much as the training step).

An image's whole way to the encoder, in training and at test time, is one page of the
documentation: ``docs/images.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rankjax.checks import check_affine


def rotate_classes(batch: dict[str, jax.Array], step: jax.Array, *, key: jax.Array
                   ) -> dict[str, jax.Array]:
  r"""Turns each class of a batch by its own random multiple of 90 degrees, as a new class.

  The class augmentation of Omniglot training (Santoro et al. 2016, "One-shot Learning with
  Memory-Augmented Neural Networks"; Vinyals et al. 2016, "Matching Networks"): a character
  rotated by :math:`90 r` degrees is a new character. With :math:`r \in \{0, 1, 2, 3\}` drawn
  per (label, step) from ``key``, every image of a class in the batch turns the same way and
  gets the label :math:`4 y + r`. Deterministic in ``step`` (a resumed run sees the same batches).

  Args:
    batch: ``{"image": f32[B, S, S, C] (square), "label": int[B], ...}``.
    step: the training step (a traced scalar is fine).
    key: the base PRNG key.

  Returns:
    The batch with rotated images and the new labels.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> b = {"image": jnp.arange(8.).reshape(2, 2, 2, 1), "label": jnp.array([3, 3])}
    >>> out = rotate_classes(b, 0, key=jax.random.key(0))
    >>> bool(out["label"][0] == out["label"][1]) and 12 <= int(out["label"][0]) <= 15
    True
  """
  images, labels = batch["image"], batch["label"]
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"rotate_classes needs square images; got shape {images.shape}.")
  step_key = jax.random.fold_in(key, step)
  turns = jax.vmap(lambda y: jax.random.randint(jax.random.fold_in(step_key, y), (), 0, 4))(
      labels)
  rotated = images
  for k in (1, 2, 3):  # Elementwise selects keep the batch sharding intact.
    rotated = jnp.where((turns == k)[:, None, None, None], jnp.rot90(images, k, axes=(1, 2)),
                        rotated)
  return {**batch, "image": rotated, "label": labels * 4 + turns.astype(labels.dtype)}


def affine_warp(images: jax.Array, angle: jax.Array, scale: jax.Array, shift: jax.Array
                ) -> jax.Array:
  r"""Rotates, scales and shifts each image about its centre (bilinear, edges extended).

  Output pixel :math:`p` (row, column) takes the input at
  :math:`c + R(-\theta)\,(p - c - t) / s`, with :math:`c = ((H - 1)/2, (W - 1)/2)`: the content
  turns counter-clockwise by :math:`\theta` (``angle = pi/2`` is ``jnp.rot90(images, 1,
  axes=(1, 2))`` for square images), grows by :math:`s` and moves by :math:`t` pixels.

  Args:
    images: ``f32[B, H, W, C]``.
    angle: ``f32[B]``, radians.
    scale: ``f32[B]``, positive.
    shift: ``f32[B, 2]``, pixels (rows, columns).

  Returns:
    ``f32[B, H, W, C]``.
  """
  _, height, width, _ = images.shape
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  center_r, center_c = (height - 1) / 2, (width - 1) / 2

  def warp_one(image, angle, scale, shift):
    dr = rows - center_r - shift[0]
    dc = cols - center_c - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_r = center_r + (cos * dr + sin * dc) / scale
    src_c = center_c + (cos * dc - sin * dr) / scale
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_r, src_c], order=1, mode="nearest")
    return jax.vmap(sample, in_axes=2, out_axes=2)(image)

  return jax.vmap(warp_one)(images, angle.astype(jnp.float32), scale.astype(jnp.float32),
                            shift.astype(jnp.float32)).astype(images.dtype)


def random_affine(batch: dict[str, jax.Array], step: jax.Array, *, key: jax.Array,
                  rotation_degrees: float = 0.0, scale: float = 0.0, shift: float = 0.0
                  ) -> dict[str, jax.Array]:
  """Each image of the batch rotated, scaled and shifted at random (labels unchanged).

  Per image, independently: an angle uniform in ``[-rotation_degrees, rotation_degrees]``, a
  scale uniform in ``[1 - scale, 1 + scale]``, and a shift uniform in ``[-shift, shift]`` times
  the image's height (rows) and width (columns). Deterministic in ``(key, step)``.

  Args:
    batch: ``{"image": f32[B, H, W, C], "label": int[B], ...}``.
    step: the training step (a traced scalar is fine).
    key: the base PRNG key.
    rotation_degrees: in ``[0, 180]``.
    scale: in ``[0, 1)``.
    shift: fraction of the image size, in ``[0, 1)``.

  Returns:
    The batch with warped images.
  """
  check_affine(rotation_degrees, scale, shift)
  images = batch["image"]
  size = images.shape[0]
  k_angle, k_scale, k_shift = jax.random.split(jax.random.fold_in(key, step), 3)
  max_angle = math.radians(rotation_degrees)
  angle = jax.random.uniform(k_angle, (size,), minval=-max_angle, maxval=max_angle)
  scales = jax.random.uniform(k_scale, (size,), minval=1 - scale, maxval=1 + scale)
  pixels = jnp.array(images.shape[1:3], jnp.float32) * shift
  shifts = jax.random.uniform(k_shift, (size, 2), minval=-1.0, maxval=1.0) * pixels
  return {**batch, "image": affine_warp(images, angle, scales, shifts)}


def is_identity(rotation_degrees: float, scale: float, shift: float) -> bool:
  return rotation_degrees == 0 and scale == 0 and shift == 0
