"""Tests of rankjax.evaluation.Evaluator (names, order, errors) and of the split it is given."""

import jax
import numpy as np
import pytest

from rankjax import configs
from rankjax import data
from rankjax import parallel
from rankjax.evaluation import embed as eval_embed
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


def test_embed_split_drops_the_padding_of_the_last_batch():
  config = configs.base_config()
  config.dataset, config.image_size, config.eval.batch_size = "digits", 8, 96
  batches = list(data.eval_batches("digits", batch_size=96, image_size=8, split="test"))
  assert not batches[-1]["mask"].all()  # 896 test images: the last batch is padded.
  embed = jax.jit(lambda variables, images: images.reshape(len(images), -1) * variables["scale"])
  embeddings, labels = eval_embed.embed_split(embed, {"scale": 3.0}, parallel.make_mesh(), config)
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(embeddings, images.reshape(len(images), -1) * 3)
  np.testing.assert_array_equal(labels, np.concatenate([b["label"][b["mask"]] for b in batches]))
  assert len(labels) == data.get_dataset_info("digits").num_test_examples
  assert data.PADDING_LABEL not in labels


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


def test_bad_distance():
  with pytest.raises(ValueError, match="distance='l1'"):
    Evaluator(distance="l1")
