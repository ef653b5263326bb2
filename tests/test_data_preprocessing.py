"""Tests of the image preprocessing against hand-computed and numpy reference values."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from rankjax import data
from rankjax.data import preprocessing


def test_normalize_imagenet_and_grayscale_by_hand():
  pixel = np.array([[[0, 128, 255]]], np.uint8)
  expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
  np.testing.assert_allclose(preprocessing.normalize(pixel, 3).numpy()[0, 0], expected, rtol=1e-6)
  gray = np.array([[[0], [255], [51]]], np.uint8)
  np.testing.assert_allclose(preprocessing.normalize(gray, 1).numpy().ravel(),
                             [-1.0, 1.0, 51 / 127.5 - 1], rtol=1e-6)


def test_eval_geometry_is_an_exact_centre_crop_when_no_resize_is_needed():
  # Shorter side 256 = round(224 / (224 / 256)): the resize is the identity, the crop exact.
  image = np.random.default_rng(0).integers(0, 256, size=(256, 400, 3), dtype=np.uint8)
  out = preprocessing.resize_and_center_crop(image, image_size=224, num_channels=3).numpy()
  np.testing.assert_array_equal(out, image[16:240, 88:312])
  # Portrait: the same on the other axis.
  out = preprocessing.resize_and_center_crop(image.transpose(1, 0, 2), image_size=224,
                                             num_channels=3).numpy()
  np.testing.assert_array_equal(out, image.transpose(1, 0, 2)[88:312, 16:240])


def test_eval_resize_area_matches_block_means():
  # Area resizing by an integer factor is the mean of each block: 64 -> 16 is 4 x 4 means.
  image = np.random.default_rng(1).integers(0, 256, size=(64, 64, 1), dtype=np.uint8)
  out = preprocessing.resize_and_center_crop(image, image_size=16, num_channels=1,
                                             crop_fraction=1.0, method="area").numpy()
  reference = image.reshape(16, 4, 16, 4).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_array_equal(out[..., 0], np.round(reference).astype(np.uint8))


def test_eval_resize_scales_shorter_side_and_keeps_aspect():
  image = np.zeros([375, 500, 3], np.uint8)
  image[:, 250:] = 200  # The right half is bright: the centre crop straddles the edge.
  out = preprocessing.resize_and_center_crop(image, image_size=224, num_channels=3).numpy()
  # Shorter side 375 -> 256, width 500 -> round(500 * 256 / 375) = 341; crop columns 58..281,
  # so the edge (column 170.67 of 341) lands at column ~112.7 of the crop.
  assert out.shape == (224, 224, 3)
  assert np.all(out[:, :110] == 0) and np.all(out[:, 116:] == 200)


def test_channel_conversion_luma_weights():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.float32)
  gray = preprocessing.to_channels(tf.constant(rgb), 1).numpy()[0, :, 0]
  np.testing.assert_allclose(gray, [0.299 * 255, 0.587 * 255, 0.114 * 255, 90], rtol=1e-6)
  np.testing.assert_array_equal(preprocessing.to_channels(tf.constant(rgb[..., :1]), 3).numpy(),
                                np.repeat(rgb[..., :1], 3, axis=-1))


def _jpeg(height, width, seed=0):
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, size=(height // 8, width // 8, 3),
                                       dtype=np.uint8)).resize((width, height), Image.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def test_decode_and_crop_jpeg_equals_decode_then_crop():
  encoded = _jpeg(375, 500)
  decoded = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_FAST")
  for i in range(5):
    seed = tf.constant([17, i], tf.int64)
    fast = preprocessing.train_preprocess_encoded(tf.constant(encoded), seed, image_size=64,
                                                  num_channels=3)
    slow = preprocessing.train_preprocess_decoded(decoded, seed, image_size=64, num_channels=3)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5)


def test_png_takes_the_generic_decoder_with_the_same_crop():
  image = np.random.default_rng(2).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(image)
  seed = tf.constant([3, 4], tf.int64)
  from_png = preprocessing.train_preprocess_encoded(encoded, seed, image_size=16, num_channels=3)
  from_array = preprocessing.train_preprocess_decoded(image, seed, image_size=16, num_channels=3)
  np.testing.assert_allclose(from_png.numpy(), from_array.numpy(), atol=1e-6)


def _torchvision_window(rng, height, width, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)):
  """numpy transcription of torchvision's RandomResizedCrop.get_params (the reference)."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    return int(round(width / ratio[0])), width
  if in_ratio > ratio[1]:
    return height, int(round(height * ratio[1]))
  return height, width


def test_random_resized_crop_follows_torchvision_distribution():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  height, width, n = 300, 400, 400
  ours = []
  for i in range(n):
    y, x, h, w = preprocessing._crop_window(height, width, tf.constant([5, i], tf.int64),
                                            preprocessing.DEFAULT_SCALE,
                                            preprocessing.DEFAULT_RATIO).numpy()
    assert 0 <= y and y + h <= height and 0 <= x and x + w <= width
    ours.append((h, w))
  rng = np.random.default_rng(0)
  reference = np.array([_torchvision_window(rng, height, width) for _ in range(n)], float)
  ours = np.array(ours, float)
  area = lambda hw: hw[:, 0] * hw[:, 1] / (height * width)
  aspect = lambda hw: hw[:, 1] / hw[:, 0]
  # Rounding the box to pixels moves the bounds by well under a percent.
  assert area(ours).min() >= 0.16 * 0.99 and area(ours).max() <= 1.0
  assert aspect(ours).min() >= 0.75 * 0.99 and aspect(ours).max() <= 4 / 3 * 1.01
  # Same distributions as torchvision's rule (two-sample Kolmogorov-Smirnov, fixed seeds).
  assert stats.ks_2samp(area(ours), area(reference)).pvalue > 0.01
  assert stats.ks_2samp(aspect(ours), aspect(reference)).pvalue > 0.01


def test_random_resized_crop_fallback_is_the_clamped_centre_crop():
  # A 10 x 200 strip: no candidate with ratio <= 4/3 and area >= 16 % fits, so the fallback is
  # the centre 10 x round(10 * 4/3) = 10 x 13 box, as torchvision returns.
  window = preprocessing._crop_window(10, 200, tf.constant([1, 2], tf.int64),
                                      preprocessing.DEFAULT_SCALE,
                                      preprocessing.DEFAULT_RATIO).numpy()
  np.testing.assert_array_equal(window, [0, (200 - 13) // 2, 10, 13])
  assert _torchvision_window(np.random.default_rng(0), 10, 200) == (10, 13)


def test_flip_mirrors_the_same_crop_and_is_deterministic():
  image = np.random.default_rng(3).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
  flips = 0
  for i in range(20):
    seed = tf.constant([9, i], tf.int64)
    kwargs = dict(image_size=24, num_channels=3)
    plain = preprocessing.train_preprocess_decoded(image, seed, flip=False, **kwargs).numpy()
    maybe = preprocessing.train_preprocess_decoded(image, seed, **kwargs).numpy()
    again = preprocessing.train_preprocess_decoded(image, seed, **kwargs).numpy()
    np.testing.assert_array_equal(maybe, again)
    if np.array_equal(maybe, plain[:, ::-1]) and not np.array_equal(maybe, plain):
      flips += 1
    else:
      np.testing.assert_array_equal(maybe, plain)
  assert 4 <= flips <= 16  # About half of 20.


def test_preprocess_for_eval_shapes_and_errors():
  images = np.random.default_rng(4).integers(0, 256, size=(3, 105, 105, 3), dtype=np.uint8)
  out = data.preprocess_for_eval(images, name="omniglot", image_size=28)
  assert out.shape == (3, 28, 28, 1) and out.dtype == np.float32
  assert data.preprocess_for_eval(images[0], name="cub200", image_size=32).shape == (32, 32, 3)
  with pytest.raises(ValueError, match="must be uint8"):
    data.preprocess_for_eval(images.astype(np.float32), name="omniglot", image_size=28)
  with pytest.raises(ValueError, match=r"shape \[B, H, W, C\]"):
    data.preprocess_for_eval(images[..., :2], name="omniglot", image_size=28)
  with pytest.raises(ValueError, match="Unknown dataset name='mnist'"):
    data.preprocess_for_eval(images, name="mnist", image_size=28)


def test_augment_option_validation():
  assert data.Augment(scale=(0.5, 1.0)).ratio == preprocessing.DEFAULT_RATIO
  with pytest.raises(ValueError, match="scale"):
    data.Augment(scale=(0.0, 1.0))
  with pytest.raises(ValueError, match="ratio"):
    data.Augment(ratio=(2.0, 1.0))
