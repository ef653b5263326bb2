"""The evaluator a training loop calls every N steps: metric names in, ``(name, value)`` pairs out.

A config lists the metrics by name; the evaluator computes the retrieval metrics in one pass
(:func:`rankjax.evaluation.retrieval_metrics`) and NMI only if asked
(:func:`rankjax.evaluation.nmi`), and yields them in the order listed::

  from rankjax import evaluation

  evaluator = evaluation.Evaluator(
      ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"],
      distance="cosine")

  # Embeddings on the host (f32[N, D], int[N]), e.g. from rankjax.evaluation.embed.embed_split:
  for name, value in evaluator.run(embeddings, labels):
    writer.write_scalars(step, {f"eval/{name}": value})

Metric names: ``"recall@K"`` for any positive K, ``"map@r"``, ``"r_precision"`` and ``"nmi"``
(also accepted as one comma-separated string, handy on a command line). With ``distance="cosine"``
NMI clusters the L2-normalised embeddings, the geometry the retrieval ranks in.
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.evaluation import clustering
from rankjax.evaluation import retrieval

METRICS = ("recall@K", "map@r", "r_precision", "nmi")
DEFAULT_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi")
_RECALL = re.compile(r"recall@([1-9][0-9]*)")


class Evaluator:
  """Computes a configured list of retrieval and clustering metrics on a test split.

  Args:
    metrics: names, e.g. ``["recall@1", "map@r", "r_precision", "nmi"]`` (see the module
      docstring), or one comma-separated string.
    distance: ``"cosine"``, ``"euclidean"`` or ``"dot"``.
    chunk_size: queries per step of :func:`rankjax.evaluation.retrieval_metrics`.
    nmi_seed: k-means++ seed of NMI.
    devices: devices for the retrieval (default: all local devices).

  Example:
    >>> import numpy as np
    >>> x = np.array([[1., 0.], [.9, .1], [0., 1.], [.1, .9]], np.float32)
    >>> dict(Evaluator(["recall@1", "nmi"]).run(x, np.array([0, 0, 1, 1])))
    {'recall@1': 1.0, 'nmi': 1.0}
  """

  def __init__(self, metrics: Sequence[str] | str = DEFAULT_METRICS, *, distance: str = "cosine",
               chunk_size: int | None = None, nmi_seed: int = 0,
               devices: Sequence[jax.Device] | None = None):
    if isinstance(metrics, str):
      metrics = metrics.split(",")
    names = [str(m).strip().lower() for m in metrics]
    if not names or not all(names):
      raise ValueError(f"metrics must list at least one metric name; got {metrics!r}.")
    for name in names:
      if name not in METRICS[1:] and not _RECALL.fullmatch(name):
        raise ValueError(f"Unknown metric {name!r}; use 'recall@K' (K a positive integer), "
                         "'map@r', 'r_precision' or 'nmi'.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"metrics lists {', '.join(map(repr, repeated))} more than once.")
    similarity.check_distance(distance, allowed=retrieval.DISTANCES)
    self.metrics = tuple(names)
    self.distance = distance
    self.chunk_size = chunk_size
    self.nmi_seed = nmi_seed
    self.devices = devices
    self.ks = tuple(int(_RECALL.fullmatch(n).group(1)) for n in names if _RECALL.fullmatch(n))

  def __repr__(self) -> str:
    return f"Evaluator({list(self.metrics)!r}, distance={self.distance!r})"

  def run(self, embeddings, labels, *, reference_embeddings=None,
          reference_labels=None) -> Iterator[tuple[str, float]]:
    """Yields ``(name, value)`` for each configured metric, in order.

    Args:
      embeddings: ``f[N, D]`` embeddings of the test split (the queries).
      labels: ``int[N]``.
      reference_embeddings: optional gallery ``f[M, D]`` (default: the queries, each without
        itself); NMI always clusters ``embeddings``.
      reference_labels: ``int[M]``.
    """
    retrieval_names = [n for n in self.metrics if n != "nmi"]
    values = {}
    if retrieval_names:
      values = retrieval.retrieval_metrics(
          embeddings, labels, ks=self.ks or (1,), distance=self.distance,
          reference_embeddings=reference_embeddings, reference_labels=reference_labels,
          chunk_size=self.chunk_size, devices=self.devices)
    for name in self.metrics:
      if name == "nmi":
        x = jnp.asarray(embeddings, jnp.float32)
        if self.distance == "cosine":
          x = similarity.l2_normalize(x)
        yield name, clustering.nmi(x, labels, seed=self.nmi_seed)
      else:
        yield name, values[name]
