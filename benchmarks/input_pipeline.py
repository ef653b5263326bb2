r"""Throughput of the training input pipeline on CUB-sized JPEGs, per CPU core.

Generates a few hundred 500 x 375 JPEGs (random crops of scikit-learn's two bundled photographs,
so they compress like real photos), serves them as TFDS ``caltech_birds2011`` records through
:func:`rankjax.data.testing.mock_data` (the real builder's features), and times
:func:`rankjax.data.train_batches` -- decode, random resized crop to 224, flip, normalise,
batch -- with tf.data limited to 1 and to 2 threads. Side by side, in the same run:

* ``tf.data, full decode``: the same augmentation with a plain ``tf.io.decode_jpeg`` of the
  whole image before cropping (what a straightforward pipeline does);
* ``PIL (torchvision-style)``: ``Image.open`` + random resized crop + resize + flip in one
  Python thread (the PyTorch DataLoader worker's work per image, without its IPC).

"img/s per core" divides images by the CPU time the process spent (user + system), so it does
not depend on how busy the machine's other cores are. The goal is >= 400 img/s per core, so that
a 16-core GPU host feeds a ResNet-50 (about 2,500-3,000 img/s on an A100 in mixed precision).

With ``--folder=PATH`` (a folder of class subfolders, e.g. the Stanford Cars half unpacked from
its tar) the rows are the folder dataset's own pipeline (``folder:PATH``: prepared once as
TFRecords, then read through TFDS) beside the same JPEG bytes served as TFDS records of the
mock builder, and PIL on them; ``--image_size`` sets the crop (the CPU recipes use 96-128 px).

Usage::

  python benchmarks/input_pipeline.py [--num_images=320] [--batches=30]
  python benchmarks/input_pipeline.py --folder=DIR/cars196 --image_size=128
"""

from __future__ import annotations

import io
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from rankjax import data
from rankjax.data import preprocessing
from rankjax.data import testing

_NUM_IMAGES = flags.DEFINE_integer("num_images", 320, "JPEGs to generate (500 x 375).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches of 64 timed per configuration.")
_FOLDER = flags.DEFINE_string("folder", None, "Time this image folder's pipeline instead of "
                              "generated JPEGs (beside the same bytes as TFDS records).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of the training crops.")
_P, _K = 16, 4
GOAL = 400.0


def make_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  """Photo-like 500 x 375 (or 375 x 500) JPEGs at quality 90, CUB's typical size and format."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(p) for p in load_sample_images().images]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    size = (500, 375) if rng.uniform() < 0.75 else (375, 500)
    image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
    if rng.uniform() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def _cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system


def _time(next_batch, num_batches: int) -> tuple[float, float]:
  """(images / wall second, images / CPU second) over ``num_batches`` after 3 warm-up batches."""
  for _ in range(3):
    next_batch()
  wall, cpu = time.perf_counter(), _cpu_seconds()
  images = 0
  for _ in range(num_batches):
    images += next_batch()
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  return images / wall, images / cpu


def rankjax_pipeline(threads: int, name: str = "cub200", **kwargs):
  batches = data.train_batches(name, classes_per_batch=_P, samples_per_class=_K,
                               image_size=_IMAGE_SIZE.value, seed=0, threads=threads, **kwargs)
  return lambda: next(batches)["image"].shape[0]


def full_decode_pipeline(jpegs: list[bytes], threads: int):
  """Same crop / resize / flip / normalise, but decoding the whole JPEG first."""
  encoded = tf.constant(jpegs)

  def prepare(i):
    seed = tf.stack([tf.constant(0, tf.int64), i])
    image = tf.io.decode_jpeg(tf.gather(encoded, i % len(jpegs)), channels=3)
    return preprocessing.train_preprocess_decoded(image, seed, image_size=_IMAGE_SIZE.value,
                                                      num_channels=3)

  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.counter().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(_P * _K).prefetch(2).with_options(options)
  it = iter(ds.as_numpy_iterator())
  return lambda: next(it).shape[0]


def pil_pipeline(jpegs: list[bytes]):
  """torchvision's RandomResizedCrop(224, scale=(0.16, 1)) + flip + ToTensor + Normalize."""
  rng = np.random.default_rng(0)
  mean = np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
  std = np.asarray(preprocessing.IMAGENET_STD, np.float32)
  counter = [0]

  def one():
    image = Image.open(io.BytesIO(jpegs[counter[0] % len(jpegs)])).convert("RGB")
    counter[0] += 1
    w, h = image.size
    for _ in range(10):
      area = w * h * rng.uniform(0.16, 1.0)
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        break
    else:
      cw, ch = w, h
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    size = _IMAGE_SIZE.value
    image = image.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.uniform() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return (np.asarray(image, np.float32) / 255.0 - mean) / std

  def batch():
    return np.stack([one() for _ in range(_P * _K)]).shape[0]

  return batch


def _folder_rows(folder: str) -> list[tuple[str, float, float]]:
  """The folder dataset's pipeline beside the same JPEGs as mock TFDS records, and PIL."""
  import tempfile  # pylint: disable=g-import-not-at-top
  name = f"folder:{folder}"
  data_dir = tempfile.mkdtemp(prefix="rankjax_folder_bench_")
  start = time.perf_counter()
  info = data.get_dataset_info(name, data_dir=data_dir)
  print(f"{folder}: {info.train_classes} training classes, {info.num_train_examples} images; "
        f"prepared in {time.perf_counter() - start:.1f} s (once; later runs read the TFRecords).",
        flush=True)
  source = data.datasets.get_source(name, data_dir)
  train = source.positions("train")
  jpegs = list(source.encoded(train))
  labels = source.labels[train]
  print(f"mean JPEG size: {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB; "
        f"{os.cpu_count()} CPUs visible; batch {_P} x {_K} at {_IMAGE_SIZE.value} px; "
        f"{_BATCHES.value} batches timed per row.", flush=True)
  rows = []
  for threads in (1, 2):
    rows.append((f"rankjax train_batches on folder:PATH, {threads} thread(s)",
                 *_time(rankjax_pipeline(threads, name, data_dir=data_dir), _BATCHES.value)))
  # cub200's TFDS builder holds labels 0-199: the first 100 folder classes fit its train half.
  keep = labels < 100
  records = {"train": [testing.FakeRecord(j, int(y), "train")
                       for j, y, k in zip(jpegs, labels, keep) if k], "test": []}
  with testing.mock_data("cub200", records=records):
    for threads in (1, 2):
      rows.append((f"rankjax train_batches on TFDS records (same JPEGs), {threads} thread(s)",
                   *_time(rankjax_pipeline(threads, protocol=data.Protocol(val_fraction=0.0)),
                          _BATCHES.value)))
  rows.append(("PIL (torchvision-style) on the same JPEGs, 1 thread",
               *_time(pil_pipeline(jpegs), max(3, _BATCHES.value // 3))))
  return rows


def _generated_rows() -> list[tuple[str, float, float]]:
  print(f"Generating {_NUM_IMAGES.value} JPEGs of 500 x 375 ...", flush=True)
  jpegs = make_jpegs(_NUM_IMAGES.value)
  print(f"mean JPEG size: {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB; "
        f"{os.cpu_count()} CPUs visible; batch {_P} x {_K} at {_IMAGE_SIZE.value} px; "
        f"{_BATCHES.value} batches timed per row.", flush=True)
  labels = np.arange(_NUM_IMAGES.value) % 50  # 50 training classes of CUB (labels 0-99)
  records = {"train": [testing.FakeRecord(j, int(y), "train") for j, y in zip(jpegs, labels)],
             "test": []}
  rows = []
  with testing.mock_data("cub200", records=records):
    for threads in (1, 2):
      rows.append((f"rankjax train_batches, {threads} thread(s)",
                   *_time(rankjax_pipeline(threads, protocol=data.Protocol(val_fraction=0.0)),
                          _BATCHES.value)))
  for threads in (1, 2):
    rows.append((f"tf.data, full decode, {threads} thread(s)",
                 *_time(full_decode_pipeline(jpegs, threads), _BATCHES.value)))
  rows.append(("PIL (torchvision-style), 1 thread", *_time(pil_pipeline(jpegs),
                                                            max(3, _BATCHES.value // 3))))
  return rows


def main(argv):
  del argv
  rows = _folder_rows(_FOLDER.value) if _FOLDER.value else _generated_rows()
  reference = rows[-1][2]
  print()
  print(f"| pipeline | img/s (wall) | img/s per core (CPU time) | vs PIL per core | "
        f"goal {GOAL:.0f} |")
  print("|---|---:|---:|---:|---|")
  for name, wall, per_core in rows:
    print(f"| {name} | {wall:.0f} | {per_core:.0f} | {per_core / reference:.2f}x | "
          f"{'met' if per_core >= GOAL else 'not met'} |")


if __name__ == "__main__":
  app.run(main)
