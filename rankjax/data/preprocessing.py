r"""Image preprocessing for metric learning, as the papers do it (TensorFlow ops, used by tf.data).

* **Training** (``augment=True``): random resized crop as torchvision's ``RandomResizedCrop``
  defines it -- a box covering a uniform fraction ``scale`` = [0.16, 1] of the image area with a
  log-uniform aspect ratio (width / height) in [3/4, 4/3] -- resized to ``S x S``, then a random
  horizontal flip. JPEGs decode only the crop
  window (``tf.image.decode_and_crop_jpeg``), which is what makes CUB-sized images cheap.
  All randomness is stateless, keyed by a per-example seed, so batches are reproducible and
  resumable.
* **Evaluation** (and training with ``augment=False``): resize the shorter side to
  ``round(S / crop_fraction)`` and take the centre ``S x S`` crop; ``crop_fraction = 224 / 256``
  for the photo datasets, 1 (a plain resize) for Omniglot and digits, whose training does not
  crop either. The resized image is rounded to uint8, as a PIL/torchvision pipeline stores it.
* **Normalisation**: RGB images use the ImageNet mean and standard deviation (the encoders are
  ImageNet-pretrained); grayscale images stay single-channel and map [0, 255] to [-1, 1].

An image's whole way to the encoder, in training and at test time, is one page of the
documentation: ``docs/images.md``.

Example::

  >>> import numpy as np
  >>> images = np.zeros([2, 375, 500, 3], np.uint8)
  >>> eval_preprocess(images, image_size=224, num_channels=3).shape
  TensorShape([2, 224, 224, 3])
"""

from __future__ import annotations

import math

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAYSCALE_MEAN = (0.5,)
GRAYSCALE_STD = (0.5,)
# ITU-R BT.601 luma weights; they sum to exactly 1, so equal channels keep their value.
_LUMA = (0.299, 0.587, 0.114)

DEFAULT_SCALE = (0.16, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_CROP_FRACTION = 224 / 256


def normalize(image: tf.Tensor, num_channels: int) -> tf.Tensor:
  """[0, 255] -> float32 normalised (ImageNet statistics for RGB, [-1, 1] for grayscale)."""
  if num_channels == 3:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  else:
    mean, std = GRAYSCALE_MEAN, GRAYSCALE_STD
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def to_channels(image: tf.Tensor, num_channels: int) -> tf.Tensor:
  """Float image [..., H, W, C] with C in {1, 3} -> ``num_channels`` (luma for RGB -> gray)."""
  have = image.shape[-1]
  if have == num_channels:
    return image
  if have == 3 and num_channels == 1:
    return tf.reduce_sum(image * tf.constant(_LUMA, image.dtype), axis=-1, keepdims=True)
  if have == 1 and num_channels == 3:
    return tf.repeat(image, 3, axis=-1)
  raise ValueError(f"images must have 1 or 3 channels; got {have}.")


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_and_center_crop(image: tf.Tensor, *, image_size: int, num_channels: int,
                           crop_fraction: float = DEFAULT_CROP_FRACTION,
                           method: str = "bilinear") -> tf.Tensor:
  """Evaluation geometry for one image [H, W, C] or a batch [B, H, W, C] of equal-sized images.

  The shorter side becomes ``round(image_size / crop_fraction)`` (aspect ratio kept,
  anti-aliased), then the centre ``image_size`` square is cut out. Returns uint8, with
  ``num_channels`` channels.
  """
  shape = tf.shape(image)
  height, width = shape[-3], shape[-2]
  target = round(image_size / crop_fraction)
  short = tf.minimum(height, width)
  new_h = tf.maximum(image_size, tf.cast(tf.round(target * height / short), tf.int32))
  new_w = tf.maximum(image_size, tf.cast(tf.round(target * width / short), tf.int32))
  image = to_channels(tf.cast(image, tf.float32), num_channels)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  image = image[..., top:top + image_size, left:left + image_size, :]
  return _to_uint8(image)


def eval_preprocess(images, *, image_size: int, num_channels: int,
                    crop_fraction: float = DEFAULT_CROP_FRACTION, method: str = "bilinear"):
  """Decoded uint8 images [B, H, W, C] (or [H, W, C]) -> normalised float32 eval inputs."""
  images = resize_and_center_crop(tf.convert_to_tensor(images), image_size=image_size,
                                  num_channels=num_channels, crop_fraction=crop_fraction,
                                  method=method)
  return normalize(images, num_channels)


def decode_image(encoded: tf.Tensor, num_channels: int) -> tf.Tensor:
  """JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, num_channels] (first frame of a GIF)."""
  image = tf.io.decode_image(encoded, channels=num_channels, expand_animations=False)
  image.set_shape([None, None, num_channels])
  return image


def _crop_window(height, width, seed, scale, ratio, attempts: int = 10) -> tf.Tensor:
  """Random resized crop window [y, x, h, w] (int32), torchvision's ``RandomResizedCrop`` rule.

  Up to ``attempts`` candidates draw an area fraction uniformly from ``scale`` and a ratio
  ``w / h`` log-uniformly from ``ratio``; the first that fits is placed uniformly at random.
  If none fits, the centre crop of the largest box whose ratio is clamped into ``ratio``.
  All candidates are drawn at once from a stateless seed.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  draws = tf.random.stateless_uniform([4, attempts], seed=seed, dtype=tf.float32)
  area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * draws[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[1])
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h_pick, w_pick = h[first], w[first]
  y = tf.cast(tf.floor(draws[2, first] * tf.cast(height - h_pick + 1, tf.float32)), tf.int32)
  x = tf.cast(tf.floor(draws[3, first] * tf.cast(width - w_pick + 1, tf.float32)), tf.int32)
  found = tf.stack([tf.minimum(y, height - h_pick), tf.minimum(x, width - w_pick), h_pick, w_pick])

  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  fallback = tf.stack([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w])
  return tf.where(tf.reduce_any(fits), found, fallback)


def train_preprocess_encoded(encoded: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                             num_channels: int, scale=DEFAULT_SCALE,
                             ratio=DEFAULT_RATIO, flip: bool = True,
                             antialias: bool = False) -> tf.Tensor:
  """Encoded image bytes -> augmented, normalised float32 [S, S, C].

  ``seed`` is an int32/int64 [2] stateless seed, unique per example; ``antialias`` filters the
  resize of a crop larger than ``S`` (as the evaluation resize does).
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = _crop_window(shape[0], shape[1], crop_seed, scale, ratio)
    # Decodes only the window; INTEGER_FAST is libjpeg-turbo's fastest exact-enough IDCT.
    return tf.cast(tf.image.decode_and_crop_jpeg(
        encoded, window, channels=num_channels, dct_method="INTEGER_FAST"), tf.float32)

  def other():
    image = decode_image(encoded, num_channels)
    shape = tf.shape(image)
    window = _crop_window(shape[0], shape[1], crop_seed, scale, ratio)
    return tf.cast(tf.image.crop_to_bounding_box(image, window[0], window[1], window[2],
                                                 window[3]), tf.float32)

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  crop.set_shape([None, None, num_channels])
  return _resize_flip_normalize(crop, flip_seed, image_size, num_channels, flip, antialias)


def train_preprocess_decoded(image: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                             num_channels: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO,
                             flip: bool = True, antialias: bool = False) -> tf.Tensor:
  """Decoded uint8 [H, W, C] -> augmented, normalised float32 [S, S, num_channels]."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  window = _crop_window(shape[0], shape[1], crop_seed, scale, ratio)
  crop = tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])
  crop = to_channels(tf.cast(crop, tf.float32), num_channels)
  return _resize_flip_normalize(crop, flip_seed, image_size, num_channels, flip, antialias)


def _resize_flip_normalize(crop, flip_seed, image_size, num_channels, flip, antialias):
  image = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=antialias)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return normalize(tf.clip_by_value(image, 0.0, 255.0), num_channels)
