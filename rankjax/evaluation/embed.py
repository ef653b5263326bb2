r"""Embedding functions for evaluation: a jitted, sharded forward pass in eval mode, and a split.

:func:`make_embed_fn` is the model in eval mode (BatchNorm running averages) under ``jax.jit``,
sharded over the data mesh, with optional test-time shifts
(:mod:`rankjax.evaluation.shift_average`); :func:`embed_split` runs it over a whole split of a
dataset, on every process, and returns the embeddings in the split's own order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rankjax import parallel
from rankjax.evaluation import shift_average


def make_embed_fn(eval_graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None, *,
                  test_time_shift: int = 0, normalize_views: bool = False,
                  from_frozen: bool = False) -> Callable[[dict, jax.Array], jax.Array]:
  """``embed(model_variables, images) -> f32[B, E]`` in eval mode, jitted (sharded on ``mesh``).

  ``test_time_shift=s > 0`` returns the mean embedding of the ``(2s + 1)^2`` copies of each image
  shifted by up to ``s`` pixels, each view L2-normalised first if ``normalize_views``
  (:mod:`rankjax.evaluation.shift_average`). ``from_frozen=True`` takes the frozen prefix's
  activations in place of images (:mod:`rankjax.frozen_cache`; no shifts then).
  """
  if from_frozen and test_time_shift:
    raise ValueError("Test-time shifts move the image, which cached activations no longer hold: "
                     "set config.eval.test_time_shift=0 with config.frozen_cache.enabled.")

  def embed(variables, images):
    model = nnx.merge(eval_graphdef, variables["params"], variables["model_state"])
    if from_frozen:
      return model.embed_from_frozen(images).astype(jnp.float32)
    return shift_average.mean_over_shifts(lambda x: model(x).astype(jnp.float32), images,
                                      test_time_shift, normalize=normalize_views)

  if mesh is None:
    return jax.jit(embed)
  return jax.jit(embed, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def make_eval_embed_fn(eval_graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh | None = None
                       ) -> Callable[[dict, jax.Array], jax.Array]:
  """:func:`make_embed_fn` with the evaluation's test-time shifts (``config.eval.test_time_shift``;
  views averaged on the unit sphere when ``config.eval.distance`` is cosine)."""
  return make_embed_fn(eval_graphdef, mesh, test_time_shift=config.eval.test_time_shift,
                       normalize_views=config.eval.distance == "cosine",
                       from_frozen=bool(config.frozen_cache.enabled))


def embed_split(embed: Callable, variables: dict, mesh: jax.sharding.Mesh,
                config: ml_collections.ConfigDict, *, split: str | None = None,
                cache=None) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every image of ``split`` (default ``config.eval.split``) once, on the host.

  Returns ``(f32[N, E], int32[N])``. With several processes each embeds its shard; every process
  gets all ``N`` embeddings, in the split's own order (so the metrics equal a single process's).
  With a :class:`rankjax.frozen_cache.Cache`, ``embed`` takes the cached activations (a
  ``from_frozen`` embed function) instead of images.
  """
  from rankjax import data, frozen_cache  # pylint: disable=g-import-not-at-top
  split = split or config.eval.split
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if cache is None:
    batches, key = data.eval_batches(
        config.dataset, batch_size=config.eval.batch_size, image_size=config.image_size,
        split=split, data_dir=config.data_dir, protocol=config.protocol, **hosts), "image"
  else:
    batches, key = frozen_cache.eval_batches(
        cache, config, split=split, batch_size=config.eval.batch_size, **hosts), "activation"
  outs = []
  for host_batch in batches:
    batch = parallel.global_batch(host_batch, mesh)
    outs.append(parallel.to_host({"embedding": embed(variables, batch[key]),
                                  "label": batch["label"], "mask": batch["mask"]}))
  out = {k: parallel.process_order(np.concatenate([o[k] for o in outs]), config.eval.batch_size)
         for k in outs[0]}
  keep = out["mask"].astype(bool)
  return out["embedding"][keep], out["label"][keep]
