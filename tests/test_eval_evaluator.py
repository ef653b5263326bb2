"""Tests of rankjax.evaluation.Evaluator: names, order, batches with padding, errors."""

import numpy as np
import pytest

from rankjax.evaluation import embed_batches
from rankjax.evaluation import Evaluator
from rankjax.evaluation import nmi
from rankjax.evaluation import retrieval_metrics
from rankjax.similarity import l2_normalize


@pytest.fixture(scope="module")
def split():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(12), 5)
  x = (rng.normal(size=(12, 6))[labels] * 2 + rng.normal(size=(60, 6))).astype(np.float32)
  return x, labels


def test_run_yields_the_configured_metrics_in_order(split):
  x, labels = split
  names = ["nmi", "recall@4", "map@r", "recall@1", "r_precision"]
  pairs = list(Evaluator(names, distance="cosine").run(x, labels))
  assert [n for n, _ in pairs] == names
  retrieval = retrieval_metrics(x, labels, ks=(1, 4), distance="cosine")
  expected = {**retrieval, "nmi": nmi(np.asarray(l2_normalize(x)), labels)}
  assert dict(pairs) == expected
  assert all(isinstance(v, float) for _, v in pairs)


def test_euclidean_nmi_clusters_the_raw_embeddings(split):
  x, labels = split
  assert dict(Evaluator("nmi, recall@2", distance="euclidean").run(x, labels)) == {
      "nmi": nmi(x, labels), "recall@2": retrieval_metrics(
          x, labels, ks=(2,), distance="euclidean")["recall@2"]}


def test_run_on_batches_drops_padding_rows(split):
  x, labels = split
  batches = []
  for start in range(0, 60, 16):  # 4 batches of 16; the last has 4 padding rows (NaN images).
    image = np.full((16, 6), np.nan, np.float32)
    label = np.zeros(16, np.int64)
    n = min(16, 60 - start)
    image[:n], label[:n] = x[start:start + n], labels[start:start + n]
    batches.append({"image": image, "label": label, "mask": np.arange(16) < n})
  embed = lambda images: images * 3.0  # A stand-in model.
  evaluator = Evaluator(["recall@1", "map@r"])
  assert dict(evaluator.run_on_batches(embed, iter(batches))) == dict(evaluator.run(x * 3, labels))
  embeddings, got_labels = embed_batches(embed, batches)
  np.testing.assert_array_equal(embeddings, x * 3)
  np.testing.assert_array_equal(got_labels, labels)


def test_reference_set(split):
  x, labels = split
  got = dict(Evaluator(["recall@1"]).run(x[::2], labels[::2], reference_embeddings=x[1::2],
                                          reference_labels=labels[1::2]))
  assert got == {"recall@1": retrieval_metrics(x[::2], labels[::2], ks=(1,),
                                               reference_embeddings=x[1::2],
                                               reference_labels=labels[1::2])["recall@1"]}


@pytest.mark.parametrize("metrics,match", [
    (["recall@1", "precision@1"], "Unknown metric 'precision@1'"),
    (["recall@0"], "Unknown metric 'recall@0'"),
    ([], "at least one metric"),
    (["map@r", "map@r"], "'map@r' more than once"),
])
def test_bad_metric_names(metrics, match):
  with pytest.raises(ValueError, match=match):
    Evaluator(metrics)


def test_bad_distance_and_batches():
  with pytest.raises(ValueError, match="distance='l1'"):
    Evaluator(distance="l1")
  with pytest.raises(ValueError, match="batches is empty"):
    embed_batches(lambda i: i, [])
  with pytest.raises(ValueError, match="no 'label' entry"):
    embed_batches(lambda i: i, [{"image": np.zeros((2, 3))}])
  with pytest.raises(ValueError, match=r"embed_fn returned shape \(3,\) for 3 labels"):
    embed_batches(lambda i: i[:, 0], [{"image": np.zeros((3, 3)), "label": np.zeros(3)}])
