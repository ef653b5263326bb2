r"""The embedding head: global pooling, a linear projection, optional L2 normalisation.

.. math::

   p = \frac{1}{hw} \sum_{i,j} F_{ij} \;\; (\text{"avg"}), \qquad
   p = \frac{1}{hw} \sum_{i,j} F_{ij} + \max_{i,j} F_{ij} \;\; (\text{"avg\_max"}), \qquad
   e = W p + b, \qquad e \leftarrow e / \max(\|e\|, \epsilon) \text{ if normalize}

for a feature map ``F: [B, h, w, C]``. ``"avg_max"`` is the sum of global average and global max
pooling used by Proxy-Anchor (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020).
The head computes in float32 whatever the backbone's dtype, so embeddings (and the losses built on
their pairwise distances) never see bfloat16 rounding.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> head = EmbeddingHead(512, 128, normalize=True, rngs=nnx.Rngs(0))
  >>> e = head(jnp.ones((4, 7, 7, 512)))
  >>> e.shape, float(jnp.linalg.norm(e[0])).__round__(4)
  ((4, 128), 1.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rankjax.models import layers
from rankjax.similarity import l2_normalize

POOLINGS = ("avg", "avg_max")


def global_pool(features: jax.Array, pooling: str = "avg") -> jax.Array:
  """``[B, h, w, C] -> f32[B, C]``: global average (``"avg"``) or average + max (``"avg_max"``)."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} is not one of {', '.join(map(repr, POOLINGS))}.")
  features = features.astype(jnp.float32)
  pooled = jnp.mean(features, axis=(1, 2))
  if pooling == "avg_max":
    pooled = pooled + jnp.max(features, axis=(1, 2))
  return pooled


class EmbeddingHead(nnx.Module):
  """Global pooling, ``Linear(in_features -> embedding_dim)``, optional L2 normalisation.

  Args:
    in_features: channels of the backbone's last feature map.
    embedding_dim: size of the embedding; ``None`` for no projection, the pooled features
      themselves (``in_features`` of them: e.g. the ImageNet features of a pretrained backbone, the
      baseline a metric-learning head has to beat).
    pooling: ``"avg"`` or ``"avg_max"``.
    normalize: L2-normalise the embeddings (a zero embedding stays zero, gradients stay finite).
    rngs: parameter initialisation keys.
  """

  def __init__(self, in_features: int, embedding_dim: int = 128, *, pooling: str = "avg",
               normalize: bool = False, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r} is not one of {', '.join(map(repr, POOLINGS))}.")
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or isinstance(
        embedding_dim, bool) or embedding_dim < 1):
      raise ValueError(f"embedding_dim must be a positive integer or None (the pooled features); "
                       f"got {embedding_dim!r}.")
    self.pooling = pooling
    self.normalize = normalize
    self.embedding_dim = in_features if embedding_dim is None else embedding_dim
    self.projection = None if embedding_dim is None else nnx.Linear(
        in_features, embedding_dim, dtype=jnp.float32, kernel_init=layers.linear_kernel_init,
        rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    embeddings = global_pool(features, self.pooling)
    if self.projection is not None:
      embeddings = self.projection(embeddings)
    return l2_normalize(embeddings) if self.normalize else embeddings
