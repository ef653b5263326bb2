"""Input pipelines: TFDS datasets, class-disjoint splits, class-balanced P x K batches.

* :mod:`rankjax.data.datasets` -- the dataset registry and its zero-shot splits
  (:func:`dataset_names`, :func:`register_dataset`, :class:`Protocol`, :func:`get_dataset_info`).
* :mod:`rankjax.data.image_folder` -- a folder of class subfolders as a dataset (``folder:PATH``).
* :mod:`rankjax.data.sampling` -- the deterministic, resumable P x K index sampler.
* :mod:`rankjax.data.preprocessing` -- random resized crop / flip, resize + centre crop, normalise.
* :mod:`rankjax.data.pipeline` -- :func:`train_batches`, :func:`eval_batches`,
  :func:`preprocess_for_eval`.
* :mod:`rankjax.data.omniglot_from_npz` -- prepares TFDS ``omniglot`` offline.
* :mod:`rankjax.data.testing` -- ``mock_data`` for tests on the real TFDS builders' features.
"""

import tensorflow as tf

# tf.data only needs the CPU; hide any GPU from TensorFlow so that it does not claim the memory of
# the accelerators JAX trains on (a no-op with tensorflow-cpu).
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow was initialised before rankjax.data was imported.
  pass

# pylint: disable=g-import-not-at-top,g-bad-import-order
from rankjax.data.datasets import clear_cache
from rankjax.data.datasets import dataset_names
from rankjax.data.datasets import DatasetInfo
from rankjax.data.datasets import DatasetNotPreparedError
from rankjax.data.datasets import DatasetSpec
from rankjax.data.datasets import get_dataset_info
from rankjax.data.datasets import Protocol
from rankjax.data.datasets import register_dataset
from rankjax.data.datasets import SPLITS
from rankjax.data.pipeline import Augment
from rankjax.data.pipeline import epoch_steps
from rankjax.data.pipeline import eval_batches
from rankjax.data.pipeline import PADDING_LABEL
from rankjax.data.pipeline import preprocess_for_eval
from rankjax.data.pipeline import train_batches
from rankjax.data.sampling import ClassBalancedSampler
# pylint: enable=g-import-not-at-top,g-bad-import-order

__all__ = [
    "Augment",
    "ClassBalancedSampler",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "Protocol",
    "SPLITS",
    "PADDING_LABEL",
    "clear_cache",
    "dataset_names",
    "epoch_steps",
    "eval_batches",
    "get_dataset_info",
    "preprocess_for_eval",
    "register_dataset",
    "train_batches",
]
