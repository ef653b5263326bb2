r"""Prepares TFDS ``omniglot`` offline from ``omniglot_1623.npz``, through TFDS's own builder.

Usage::

  python -m rankjax.data.omniglot_from_npz --npz=../shared/data/omniglot_1623.npz --data_dir=DIR

after which ``tfds.load("omniglot", data_dir=DIR, download=False)`` reads the dataset exactly
like the downloaded one (Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning
through probabilistic program induction", Science 2015): ``train`` (background, 19,280 images
of 964 characters) and ``test`` (evaluation, 13,180 images of 659 characters), with ``label``
0-1622, ``alphabet``, ``alphabet_char_id`` and ``image`` 105 x 105 x 3 uint8, white paper 255
and black ink 0, as the original PNGs decode.

How: the npz's 105 x 105 ink masks (``bits105``) are written back as the original archive layout
(``images_background/<alphabet>/characterNN/LLLL_DD.png``, 1-bit PNGs as in the originals) in a
temporary folder, and TFDS's ``Omniglot`` builder runs its own ``_split_generators`` /
``_generate_examples`` over it, with a download manager that hands it those folders instead of
downloading the zips. TFDS's record writer, shuffling, label names and ``dataset_info.json`` are
therefore the real ones. Not reproduced: the builder's ``small1`` / ``small2`` splits (subsets
of the background set, the npz does not say which), and dataset statistics unless
``--compute_stats`` is given.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

_REQUIRED = ("bits105", "label", "alphabet", "alphabet_names", "character", "sample", "split")
_SPLIT_DIRS = ("images_background", "images_evaluation")  # split 0 = background, 1 = evaluation


def _load_npz(npz_path) -> dict[str, np.ndarray]:
  with np.load(os.fspath(npz_path)) as npz:
    missing = [k for k in _REQUIRED if k not in npz.files]
    if missing:
      raise ValueError(f"--npz={npz_path} lacks the arrays {missing}; is it omniglot_1623.npz?")
    arrays = {k: npz[k] for k in _REQUIRED}
  n = arrays["label"].shape[0]
  if arrays["bits105"].shape != (n, (105 * 105 + 7) // 8):
    raise ValueError(f"bits105 has shape {arrays['bits105'].shape}; expected ({n}, 1379).")
  return arrays


def write_original_layout(arrays: dict[str, np.ndarray], root: str) -> dict[str, str]:
  """Writes the PNGs as the original zips extract; returns ``{"train": dir, "eval": dir}``.

  Each ``images_<set>.zip`` extracts to a folder holding one folder ``images_<set>``, which is
  what the TFDS builder walks.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  names = [str(a) for a in arrays["alphabet_names"]]
  ink = np.unpackbits(arrays["bits105"], axis=1)[:, :105 * 105].reshape(-1, 105, 105)
  start, total = time.time(), ink.shape[0]
  made = set()
  for i in range(total):
    set_dir = _SPLIT_DIRS[int(arrays["split"][i])]
    folder = os.path.join(root, set_dir, set_dir, names[int(arrays["alphabet"][i])],
                          f"character{int(arrays['character'][i]):02d}")
    if folder not in made:
      os.makedirs(folder, exist_ok=True)
      made.add(folder)
    # Original file names: <1-based character class>_<1-based drawing>.png; ink is black (False).
    name = f"{int(arrays['label'][i]) + 1:04d}_{int(arrays['sample'][i]) + 1:02d}.png"
    path = os.path.join(folder, name)
    Image.fromarray(ink[i] == 0).save(path, format="PNG")
    if (i + 1) % 8000 == 0 or i + 1 == total:
      logging.info("Wrote %d / %d PNGs (%.0f s).", i + 1, total, time.time() - start)
  return {"train": os.path.join(root, _SPLIT_DIRS[0]), "eval": os.path.join(root, _SPLIT_DIRS[1])}


class _LocalDownloadManager:
  """Stands in for ``tfds.download.DownloadManager``: the 'downloads' are already extracted."""

  downloaded_size = 0

  def __init__(self, extracted: dict[str, str]):
    self._extracted = extracted

  def download_and_extract(self, urls):
    # small1 / small2 are subsets of the background set; pointing them at it keeps the builder's
    # name collection consistent, and their splits are dropped below.
    return {key: self._extracted.get(key, self._extracted["train"]) for key in urls}


def prepare(npz_path, data_dir, *, compute_stats: bool = False, work_dir=None):
  """Prepares TFDS ``omniglot`` in ``data_dir`` from ``npz_path``; returns the builder.

  Does nothing (but say so) when ``data_dir`` already holds it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  builder = tfds.builder("omniglot", data_dir=data_dir)
  if builder.is_prepared():
    logging.info("omniglot %s is already prepared in %s.", builder.version, builder.data_dir)
    return builder
  arrays = _load_npz(npz_path)
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="omniglot_extracted_", dir=work_dir) as root:
    extracted = write_original_layout(arrays, root)
    # pylint: disable=protected-access
    builder._make_download_manager = lambda *a, **k: _LocalDownloadManager(extracted)
    split_generators = builder._split_generators
    builder._split_generators = lambda dl_manager: [
        g for g in split_generators(dl_manager) if g.name in ("train", "test")]
    # pylint: enable=protected-access
    stats = (tfds.download.ComputeStatsMode.AUTO if compute_stats else
             tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=stats))
  logging.info("Prepared omniglot %s in %s: %s.", builder.version, builder.data_dir,
               {str(k): v.num_examples for k, v in builder.info.splits.items()})
  return builder


def _define_flags():
  # Defined only when run as a program: at import time they would clash with (or, being required,
  # break the parsing of) the flags of any other absl program that imports this module.
  flags.DEFINE_string("npz", None, "Path of omniglot_1623.npz.", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data directory to prepare omniglot in.",
                      required=True)
  flags.DEFINE_bool("compute_stats", False, "Also compute TFDS feature statistics (slower).")


def main(argv):
  del argv
  npz, data_dir = flags.FLAGS.npz, flags.FLAGS.data_dir
  builder = prepare(npz, data_dir, compute_stats=flags.FLAGS.compute_stats)
  print(f"omniglot {builder.version} is in {builder.data_dir}: "
        f"{ {str(k): v.num_examples for k, v in builder.info.splits.items()} }. "
        f"Read it with tfds.load('omniglot', data_dir={data_dir!r}).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
