"""Tests of rankjax.evaluation.clustering: NMI against scikit-learn and by hand, k-means, errors."""

import math

import numpy as np
import pytest
from sklearn import cluster as sk_cluster
from sklearn import datasets as sk_datasets
from sklearn import metrics as sk_metrics

from rankjax.evaluation import kmeans
from rankjax.evaluation import nmi
from rankjax.evaluation import normalized_mutual_info

# labels 0 0 0 1 1 1 against clusters 0 0 1 1 1 1, by hand (natural logarithms):
#   I = 2/6 log((2/6) / (3/6 * 2/6)) + 1/6 log((1/6) / (3/6 * 4/6)) + 3/6 log((3/6) / (3/6 * 4/6))
#   H(labels) = log 2, H(clusters) = -(1/3 log 1/3 + 2/3 log 2/3), NMI = I / mean of the two.
_MI = 2 / 6 * math.log(2) + 1 / 6 * math.log(1 / 2) + 3 / 6 * math.log(3 / 2)
HAND_NMI = _MI / ((math.log(2) - (math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)) / 2)


def test_normalized_mutual_info_by_hand():
  assert normalized_mutual_info([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(
      HAND_NMI, rel=1e-12)
  assert HAND_NMI == pytest.approx(0.4787, abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_normalized_mutual_info_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 1 + 3 * seed, 200) * 5 - 7  # Arbitrary label values.
  b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 9, 200))
  assert normalized_mutual_info(a, b) == pytest.approx(
      sk_metrics.normalized_mutual_info_score(a, b), rel=1e-12, abs=1e-15)


def test_normalized_mutual_info_edge_cases_as_sklearn():
  assert normalized_mutual_info([3, 3, 3], [1, 1, 1]) == 1.0  # Neither splits the items.
  assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0  # Independent.
  assert normalized_mutual_info([0, 1, 2, 3], [9, 8, 7, 6]) == 1.0
  with pytest.raises(ValueError, match="4 items but labels_pred has 3"):
    normalized_mutual_info([0, 0, 1, 1], [0, 0, 1])


def test_nmi_six_points_by_hand():
  # Two obvious groups {0, 1, 2} and {3, 4, 5}; the classes split them 0 0 1 | 1 1 1.
  x = np.array([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], np.float32)
  assert nmi(x, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(HAND_NMI, rel=1e-12)


def test_nmi_is_exactly_one_for_perfectly_separated_clusters():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(30), rng.integers(1, 9, 30))
  centres = rng.normal(size=(30, 8)) * 100
  x = (centres[labels] + rng.normal(size=(len(labels), 8)) * 0.01).astype(np.float32)
  assert nmi(x, labels) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_nmi_within_0_01_of_sklearn_kmeans_on_well_separated_data(seed):
  # Separated blobs, but 15% of the labels redrawn at random, so NMI is far from 1.
  x, blobs = sk_datasets.make_blobs(n_samples=800, centers=16, n_features=12, cluster_std=1.0,
                                    center_box=(-20, 20), random_state=seed)
  x = x.astype(np.float32)
  rng = np.random.default_rng(seed)
  labels = np.where(rng.random(len(x)) < 0.15, rng.integers(0, 16, len(x)), blobs)
  sklearn_nmi = sk_metrics.normalized_mutual_info_score(
      labels, sk_cluster.KMeans(16, n_init=1, random_state=seed).fit_predict(x))
  ours = nmi(x, labels, seed=seed)
  assert 0.6 < sklearn_nmi < 0.9
  assert abs(ours - sklearn_nmi) < 0.01, (ours, sklearn_nmi)


def test_kmeans_recovers_separated_clusters_and_handles_duplicates():
  x = np.array([[0, 0]] * 5 + [[5, 5]] * 4 + [[0, 9]] * 3, np.float32)
  centres, assignments = kmeans(x, 3, seed=1)
  assert normalized_mutual_info(assignments, [0] * 5 + [1] * 4 + [2] * 3) == 1.0
  np.testing.assert_array_equal(np.sort(np.asarray(centres), axis=0),
                                np.sort(np.array([[0, 0], [5, 5], [0, 9]], np.float32), axis=0))
  # More clusters than distinct points: still finite, every point on a centre.
  centres, assignments = kmeans(x, 5, seed=0)
  assert np.isfinite(np.asarray(centres)).all()
  np.testing.assert_array_equal(np.asarray(centres)[assignments], x)


def test_kmeans_chunked_assignment_matches_one_chunk():
  x, _ = sk_datasets.make_blobs(n_samples=300, centers=5, n_features=4, random_state=1)
  _, whole = kmeans(x.astype(np.float32), 5, seed=3)
  _, chunked = kmeans(x.astype(np.float32), 5, seed=3, chunk_size=64)
  np.testing.assert_array_equal(whole, chunked)


def test_bad_input():
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match="4 rows but labels has 3"):
    nmi(x, np.zeros(3, int))
  with pytest.raises(ValueError, match=r"num_clusters must be an integer in \[1, 4\]"):
    nmi(x, np.zeros(4, int), num_clusters=5)
  with pytest.raises(ValueError, match=r"num_clusters must be an integer in \[1, 4\]"):
    kmeans(x, 0)
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"NaN or infinite values in 1 of 4 rows \(first: \[2\]\)"):
    nmi(x, np.arange(4))
