"""The encoder of a training config: what the trainer, the embedder and the sweeps build.

``build_model(config, info)`` reads ``config.model`` (and the loss's normalisation when
``model.normalize`` is ``None``) and nothing of the trainer, so that inference
(:mod:`rankjax.embedder`) does not import training.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax.numpy as jnp
import ml_collections

from rankjax import configs
from rankjax import models
from rankjax import seeding


def build_model(config: ml_collections.ConfigDict, info: Any) -> nnx.Module:
  """The encoder + head of ``config.model`` for a dataset with ``info.num_channels`` channels.

  ``info`` is a :class:`rankjax.data.DatasetInfo` or anything with ``num_channels`` (the dataset's
  spec: the model needs nothing else of the data, nor of the loss). Its initialisation draws from
  the ``"init"`` stream of ``config.seed`` (:mod:`rankjax.seeding`).
  """
  return models.get_model(
      config.model.name, embedding_dim=config.model.embedding_dim,
      num_channels=info.num_channels, pooling=config.model.pooling,
      normalize=configs.normalize_embeddings(config),
      freeze_batchnorm=config.model.freeze_batchnorm, dtype=jnp.dtype(config.model.dtype),
      pretrained=config.model.pretrained,
      backbone_options=config.model.backbone_options.to_dict() or None,
      rngs=nnx.Rngs(seeding.stream_key(config.seed, "init")))
