"""Retrieval evaluation: exact Recall@K, MAP@R and R-Precision (chunked on device), and NMI.

* :func:`retrieval_metrics` -- ``{"recall@K", "map@r", "r_precision"}`` of embeddings ranked
  against themselves or a reference set (:mod:`rankjax.evaluation.retrieval`).
* :func:`nmi` -- k-means on device, then normalised mutual information with the classes
  (:mod:`rankjax.evaluation.clustering`).
* :class:`Evaluator` -- a configured list of metric names, run on a test split every N steps;
  yields ``(name, value)`` pairs (:mod:`rankjax.evaluation.evaluator`).
"""

from rankjax.evaluation.clustering import kmeans
from rankjax.evaluation.clustering import nmi
from rankjax.evaluation.clustering import normalized_mutual_info
from rankjax.evaluation.evaluator import Evaluator
from rankjax.evaluation.evaluator import METRICS
from rankjax.evaluation.retrieval import retrieval_metrics

__all__ = ["Evaluator", "METRICS", "kmeans", "nmi", "normalized_mutual_info", "retrieval_metrics"]
