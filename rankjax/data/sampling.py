r"""Class-balanced P x K index sampling, host partitions and even evaluation shards.

Ranking losses only learn from batches that hold several samples of each of several classes: a
triplet needs a positive, N-pairs needs exactly one pair per class (K = 2). A P x K batch holds
``P`` distinct classes with ``K`` samples each (Hermans et al., "In Defense of the Triplet Loss
for Person Re-Identification", 2017; Sohn, "Improved Deep Metric Learning with Multi-class N-pair
Loss Objective", NeurIPS 2016).

The schedule of :class:`ClassBalancedSampler` is a pure function of ``(seed, step)``, so a run
restarted from a checkpoint at step ``n`` gets exactly the batches an uninterrupted run gets from
step ``n`` on, at O(1) cost (no replay of earlier steps):

* **Classes.** A *class epoch* is ``ceil(C / P)`` steps over a fresh permutation of the ``C``
  classes (seeded by ``(seed, class_epoch)``); every class is drawn exactly once per class epoch.
  When ``P`` does not divide ``C``, the last batch of a class epoch is topped up with randomly
  chosen other classes (*extra* visits), so every batch has ``P`` distinct classes.
* **Samples.** Class ``c`` with ``n_c >= K`` images walks through a permutation of its images (a
  *sample epoch*, seeded by ``(seed, c, sample_epoch)``) ``K`` at a time, one chunk per class
  epoch; the last chunk of a sample epoch wraps around to its start, so the ``K`` samples of a
  chunk are always distinct and a sample epoch covers every image of the class. With
  ``n_c < K`` the class is sampled with replacement: its images, in a fresh order each visit,
  are repeated as evenly as possible to fill ``K`` slots.
* **Epoch.** After ``steps_per_epoch = ceil(C / P) * max_c ceil(n_c / K)`` steps every
  training image has been drawn at least once (exactly once per sample epoch, for classes of
  equal size with ``K`` dividing ``n_c``).

Example::

  >>> import numpy as np
  >>> labels = np.repeat(np.arange(6), 4)            # 6 classes, 4 images each
  >>> sampler = ClassBalancedSampler(labels, classes_per_batch=3, samples_per_class=2, seed=0)
  >>> batch = sampler.batch_indices(0)                # int64[6]: 3 classes x 2 samples
  >>> labels[batch].reshape(3, 2)[:, 0].size, sampler.steps_per_epoch
  (3, 4)
"""

from __future__ import annotations

import math

import numpy as np

# Tags that keep the random streams of the sampler independent of each other.
_CLASS_ORDER, _SAMPLE_ORDER, _FILL, _EXTRA = range(4)


def _seed_words(seed) -> tuple[int, ...]:
  """A seed (int or tuple of ints, possibly negative) as non-negative words for SeedSequence."""
  words = seed if isinstance(seed, (tuple, list)) else (seed,)
  out = []
  for w in words:
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
      raise ValueError(f"seed must be an integer (or a tuple of integers); got {seed!r}.")
    out.append(int(w) % (1 << 64))
  return tuple(out)


class ClassBalancedSampler:
  """Deterministic, resumable P x K batches of indices into ``labels``.

  Args:
    labels: int[N], the label of each example this sampler draws from.
    classes_per_batch: ``P``, distinct classes per batch (at most the number of classes).
    samples_per_class: ``K`` >= 1 samples per class; larger than a class's size samples that
      class with replacement (see :attr:`num_classes_smaller_than_k`).
    seed: an int, or a tuple of ints (e.g. ``(seed, process_count, process_index)``).

  :meth:`batch_indices` ``(step)`` returns int64[P * K] indices into ``labels``; entry
  ``i * K + j`` is the ``j``-th sample of the ``i``-th class of the batch.
  """

  def __init__(self, labels, *, classes_per_batch: int, samples_per_class: int, seed):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f"labels must be a rank-1 integer array; got dtype {labels.dtype}, shape {labels.shape}.")
    self.classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    num_classes = self.classes.size
    if isinstance(classes_per_batch, bool) or not isinstance(classes_per_batch, (int, np.integer)):
      raise ValueError(f"classes_per_batch must be an integer; got {classes_per_batch!r}.")
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, (int, np.integer)):
      raise ValueError(f"samples_per_class must be an integer; got {samples_per_class!r}.")
    if classes_per_batch < 1:
      raise ValueError(f"classes_per_batch must be >= 1; got {classes_per_batch}.")
    if samples_per_class < 1:
      raise ValueError(f"samples_per_class must be >= 1; got {samples_per_class}.")
    if classes_per_batch > num_classes:
      raise ValueError(
          f"classes_per_batch={classes_per_batch} exceeds the {num_classes} classes available: a "
          "P x K batch needs P distinct classes.")
    self._p = int(classes_per_batch)
    self._k = int(samples_per_class)
    self._seed = _seed_words(seed)
    order = np.argsort(inverse, kind="stable")
    self._members = np.split(order.astype(np.int64), np.cumsum(counts)[:-1])
    self._counts = counts
    # Chunks of K per sample epoch; a class smaller than K takes a fresh order every visit.
    self._chunks = np.where(counts >= self._k, -(-counts // self._k), 1)
    self.steps_per_class_epoch = math.ceil(num_classes / self._p)
    self.steps_per_epoch = self.steps_per_class_epoch * int(self._chunks.max())
    self.num_classes_smaller_than_k = int(np.sum(counts < self._k))
    self._class_order_cache: dict[int, np.ndarray] = {}
    self._sample_order_cache: dict[int, tuple[int, np.ndarray]] = {}

  @property
  def batch_size(self) -> int:
    return self._p * self._k

  def _rng(self, *keys: int) -> np.random.Generator:
    return np.random.default_rng([*self._seed, *keys])

  def _class_order(self, class_epoch: int) -> np.ndarray:
    order = self._class_order_cache.get(class_epoch)
    if order is None:
      if len(self._class_order_cache) > 4:
        self._class_order_cache.clear()
      order = self._rng(_CLASS_ORDER, class_epoch).permutation(self.classes.size)
      self._class_order_cache[class_epoch] = order
    return order

  def _sample_order(self, c: int, sample_epoch: int) -> np.ndarray:
    cached = self._sample_order_cache.get(c)
    if cached is None or cached[0] != sample_epoch:
      order = self._rng(_SAMPLE_ORDER, c, sample_epoch).permutation(self._counts[c])
      cached = (sample_epoch, order)
      self._sample_order_cache[c] = cached
    return cached[1]

  def _regular_chunk(self, c: int, class_epoch: int) -> np.ndarray:
    """The K samples class ``c`` contributes on its one regular visit of ``class_epoch``."""
    n = self._counts[c]
    if n < self._k:
      return self._members[c][np.resize(self._sample_order(c, class_epoch), self._k)]
    sample_epoch, chunk = divmod(class_epoch, int(self._chunks[c]))
    positions = (chunk * self._k + np.arange(self._k)) % n
    return self._members[c][self._sample_order(c, sample_epoch)[positions]]

  def _extra_chunk(self, c: int, class_epoch: int) -> np.ndarray:
    """K samples for an extra visit (the top-up of a class epoch's last batch)."""
    order = self._rng(_EXTRA, class_epoch, c).permutation(self._counts[c])
    return self._members[c][np.resize(order, self._k)]

  def batch_classes(self, step: int) -> np.ndarray:
    """int64[P] indices into :attr:`classes` of the classes of batch ``step`` (all distinct)."""
    return self._batch_plan(step)[0]

  def _batch_plan(self, step: int):
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    class_epoch, b = divmod(int(step), self.steps_per_class_epoch)
    order = self._class_order(class_epoch)
    regular = order[b * self._p:(b + 1) * self._p]
    missing = self._p - regular.size
    if missing:
      others = order[:b * self._p]
      extra = others[self._rng(_FILL, class_epoch).choice(others.size, missing, replace=False)]
    else:
      extra = order[:0]
    return np.concatenate([regular, extra]), regular.size, class_epoch

  def batch_indices(self, step: int) -> np.ndarray:
    """int64[P * K] indices into ``labels`` of batch ``step`` (grouped by class)."""
    classes, num_regular, class_epoch = self._batch_plan(step)
    chunks = [
        self._regular_chunk(c, class_epoch) if i < num_regular else
        self._extra_chunk(c, class_epoch) for i, c in enumerate(classes.tolist())
    ]
    return np.concatenate(chunks)


def partition_classes(classes, process_index: int, process_count: int) -> np.ndarray:
  """The classes host ``process_index`` owns: every ``process_count``-th of the sorted classes.

  Hosts own disjoint class sets, so concatenating their ``P / process_count`` classes gives a
  global batch of ``P`` distinct classes, and each host reads and decodes only its own images.
  """
  classes = np.sort(np.asarray(classes))
  return classes[process_index::process_count]


def even_shard(num_items: int, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, stop)`` of shard ``process_index`` of ``num_items`` split into near-equal parts.

  As ``tfds.even_splits``: the first ``num_items % process_count`` shards hold one item more.
  """
  base, extra = divmod(num_items, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def check_process(process_index, process_count) -> tuple[int, int]:
  """Resolves ``None`` to this JAX process and validates the pair."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only needed for the defaults)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not isinstance(process_count, (int, np.integer)) or process_count < 1:
    raise ValueError(f"process_count must be an integer >= 1; got {process_count!r}.")
  if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must be an integer in [0, process_count={process_count}); got "
        f"{process_index!r}.")
  return int(process_index), int(process_count)
