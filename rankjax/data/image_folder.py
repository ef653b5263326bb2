r"""A folder of class subfolders of images as a TFDS dataset, prepared once and then streamed.

The layout is torchvision's and TFDS's ``ImageFolder``: one subfolder per class, named for it,
holding that class's images (at any depth below it)::

  ROOT/
    001_AM_General_Hummer_SUV_2000/00001.jpg
    001_AM_General_Hummer_SUV_2000/00002.jpg
    002_Acura_RL_Sedan_2012/...

:func:`scan` lists the folder (classes sorted by name; images are files with an image extension:
JPEG, PNG, BMP, GIF; hidden files and other files are skipped and counted).
:func:`prepare` checks that every image decodes and writes the images, with their class and
file name, as TFRecords of the TFDS builder :class:`ImageFolderBuilder` in ``data_dir`` (the
encoded bytes as they are, not re-encoded). A later run finds the prepared copy by a
fingerprint of the listing (paths, sizes and modification times), so a changed folder is prepared
again and an unchanged one never is. Readers then use the ordinary TFDS path of
:mod:`rankjax.data.datasets`.

Bad input fails where it enters, naming the path: a missing root, a root without class folders,
a class folder without images, a class folder that links to the root or to another class, a file
that is not a readable image.

Example::

  >>> import os, tempfile
  >>> import numpy as np
  >>> from PIL import Image
  >>> root = tempfile.mkdtemp()
  >>> for c in ("cat", "dog"):
  ...   os.makedirs(os.path.join(root, c))
  ...   for i in range(2):
  ...     Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(root, c, f"{i}.png"))
  >>> listing = scan(root)
  >>> listing.classes, listing.counts().tolist()
  (('cat', 'dog'), [2, 2])
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
BUILDER_NAME = "rankjax_image_folder"
LABEL_KEY = "label"
SPLIT = "images"  # The one TFDS split ("all" is reserved by TFDS).


@dataclasses.dataclass(frozen=True)
class Listing:
  """What :func:`scan` found in a folder.

  Attributes:
    root: the absolute path of the folder.
    classes: the class folder names, sorted; class ``i`` is ``classes[i]``.
    files: the images' paths relative to ``root``, sorted by class, then by path.
    labels: int64[N], the class index of each file.
    skipped: ``(relative path, reason)`` of every file that is not taken as an image.
    fingerprint: a hash of the listing (paths, sizes, modification times).
  """
  root: str
  classes: tuple[str, ...]
  files: tuple[str, ...]
  labels: np.ndarray
  skipped: tuple[tuple[str, str], ...]
  fingerprint: str

  def counts(self) -> np.ndarray:
    """int64[C]: the number of images of each class."""
    return np.bincount(self.labels, minlength=len(self.classes))


def scan(root: str) -> Listing:
  """Lists the classes and images of the folder ``root`` (see the module docstring).

  Raises:
    FileNotFoundError: ``root`` does not exist.
    NotADirectoryError: ``root`` is a file.
    ValueError: ``root`` has no class subfolders, or a class folder holds no image.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.exists(root):
    raise FileNotFoundError(f"Image folder {root} does not exist.")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"Image folder {root} is a file; expected a directory of class "
                             "subfolders of images.")
  classes, skipped = [], []
  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    if entry.name.startswith("."):
      continue
    if entry.is_dir():
      classes.append(entry.name)
    else:
      skipped.append((entry.name, "a file directly in the root, not in a class folder"))
  _check_distinct_class_folders(root, classes)
  if not classes:
    raise ValueError(f"Image folder {root} has no class subfolders: a folder dataset is ROOT/"
                     "<class name>/<image files>.")
  files, labels, digest = [], [], hashlib.sha256(root.encode())
  for index, name in enumerate(classes):
    found = 0
    for path in _walk_files(os.path.join(root, name)):
      rel = os.path.relpath(path, root)
      base = os.path.basename(path)
      if base.startswith("."):
        skipped.append((rel, "a hidden file"))
        continue
      if not base.lower().endswith(IMAGE_EXTENSIONS):
        skipped.append((rel, f"not an image file name (expected {', '.join(IMAGE_EXTENSIONS)})"))
        continue
      stat = os.stat(path)
      digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
      files.append(rel)
      labels.append(index)
      found += 1
    if not found:
      raise ValueError(f"Class folder {os.path.join(root, name)} holds no image (files ending "
                       f"in {', '.join(IMAGE_EXTENSIONS)}).")
  return Listing(root=root, classes=tuple(classes), files=tuple(files),
                 labels=np.asarray(labels, np.int64), skipped=tuple(skipped),
                 fingerprint=digest.hexdigest()[:16])


def _check_distinct_class_folders(root: str, classes: list[str]) -> None:
  """Raises ``ValueError`` for a class folder (a symbolic link) that resolves to the root, to a
  folder above it, or to the same folder as another class: its images would be counted twice."""
  real_root = os.path.realpath(root)
  seen = {}
  for name in classes:
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if real == real_root or real_root.startswith(real + os.sep):
      raise ValueError(f"Class folder {path} resolves to the image folder itself ({real}): a "
                       "link to the root (or above it) would make every image a second class. "
                       "Remove the link.")
    if real in seen:
      raise ValueError(f"Class folder {path} is the same folder as the class folder "
                       f"{seen[real]} ({real}): one folder cannot be two classes. Remove the "
                       "link.")
    seen[real] = name


def _walk_files(directory: str):
  """Every file below ``directory``, sorted, hidden folders skipped."""
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      yield os.path.join(dirpath, name)


def _check_image(path: str, encoded: bytes) -> int:
  """The channel count of the encoded image at ``path``; ``ValueError`` if it does not decode."""
  try:
    image = tf.io.decode_image(encoded, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise ValueError(f"{path} is not a readable image: {e.message.splitlines()[0]}") from None
  if min(image.shape[:2]) < 1:
    raise ValueError(f"{path} is an empty image ({image.shape[0]} x {image.shape[1]}).")
  return int(image.shape[-1])


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of one image folder; one split, ``"images"``, in the order of :func:`scan`.

  Features: ``image`` (the file's bytes), ``label`` (the class index, names in the feature),
  ``file_name`` (the path relative to the root). The builder config's name is the folder's name
  and the listing's fingerprint; ``info.metadata["num_channels"]`` is 1 if every image is
  grayscale, else 3.
  """

  name = BUILDER_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded images of a class-folder tree, checked to decode."}

  def __init__(self, *, listing: Listing, **kwargs):
    self._listing = listing
    slug = "".join(c if c.isalnum() else "_" for c in os.path.basename(listing.root)).lower()
    config = tfds.core.BuilderConfig(name=f"{slug or 'root'}_{listing.fingerprint}",
                                     version=self.VERSION,
                                     description=f"Images of {listing.root}.")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"The class folders of {self._listing.root}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            LABEL_KEY: tfds.features.ClassLabel(names=list(self._listing.classes)),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        supervised_keys=("image", LABEL_KEY),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    listing = self._listing
    channels = set()
    start = last_log = time.perf_counter()
    for i, (rel, label) in enumerate(zip(listing.files, listing.labels)):
      path = os.path.join(listing.root, rel)
      with open(path, "rb") as f:
        encoded = f.read()
      channels.add(_check_image(path, encoded))
      if time.perf_counter() - last_log > 10:
        last_log = time.perf_counter()
        logging.info("Preparing %s: %d / %d images checked (%.0f s).", listing.root, i + 1,
                     len(listing.files), last_log - start)
      yield i, {"image": encoded, LABEL_KEY: int(label), "file_name": rel}
    # Read by prepare() once the records are written (TFDS saves the metadata with the info).
    self.info.metadata["num_channels"] = 1 if channels <= {1} else 3


def prepare(root: str, data_dir=None) -> ImageFolderBuilder:
  """The TFDS builder of the image folder ``root``, prepared in ``data_dir`` if not already.

  Args:
    root: the folder of class subfolders.
    data_dir: the TFDS data directory that holds the prepared copy (``None``: TFDS's default,
      ``~/tensorflow_datasets``). Several processes preparing the same folder at once take turns
      (a file lock); the second finds the first's copy.

  Returns:
    The builder, ready for ``as_dataset(split="images")``.

  Raises:
    The errors of :func:`scan`; ``ValueError`` naming the first file that does not decode.
  """
  listing = scan(root)
  builder = ImageFolderBuilder(listing=listing, data_dir=data_dir)
  lock_dir = os.path.dirname(os.fspath(builder.data_dir))
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = ImageFolderBuilder(listing=listing, data_dir=data_dir)  # Sees a finished copy.
    if not builder.is_prepared():
      logging.info("Preparing the image folder %s (%d classes, %d images) as TFRecords in %s; "
                   "later runs read that copy.", listing.root, len(listing.classes),
                   len(listing.files), builder.data_dir)
      start = time.perf_counter()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      logging.info("Prepared %s in %.1f s.", listing.root, time.perf_counter() - start)
  _log_listing(listing)
  return builder


_LOGGED: set = set()


def _log_listing(listing: Listing) -> None:
  if listing.fingerprint in _LOGGED:
    return
  _LOGGED.add(listing.fingerprint)
  logging.info("Image folder %s: %d classes, %d images; %d other files skipped.", listing.root,
               len(listing.classes), len(listing.files), len(listing.skipped))
  reasons: dict[str, list[str]] = {}
  for rel, reason in listing.skipped:
    reasons.setdefault(reason, []).append(rel)
  for reason, paths in reasons.items():
    logging.info("  skipped %d files, %s: %s%s", len(paths), reason, ", ".join(paths[:5]),
                 ", ..." if len(paths) > 5 else "")
