r"""CosFace, the large margin cosine loss (Wang et al. 2018): an additive margin on the cosine."""

from __future__ import annotations

import jax

from rankjax import similarity
from rankjax.losses import proxies as proxy_losses
from rankjax.losses import spec


def cosface_loss(embeddings: jax.Array, labels: jax.Array, *, proxies: jax.Array,
                 scale: float = 64.0, margin: float = 0.35,
                 precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""CosFace: softmax cross-entropy over scaled cosines, the true class's lowered by :math:`m`.

  .. math::
     L = -\frac{1}{B} \sum_{i=1}^{B} \log
         \frac{e^{s (\cos\theta_{i y_i} - m)}}
              {e^{s (\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

  with :math:`\cos\theta_{ij}` the cosine between embedding :math:`x_i` and proxy :math:`W_j`.
  Wang, Wang, Zhou, Ji, Gong, Zhou, Li & Liu, "CosFace: Large Margin Cosine Loss for Deep Face
  Recognition", CVPR 2018 (:math:`s = 64`, :math:`m = 0.35`). It equals pytorch-metric-learning's
  ``CosFaceLoss``.

  Args:
    embeddings: ``f32[B, D]`` (normalised inside).
    labels: ``int[B]`` class labels in ``[0, C)``. Outside that range: a ``ValueError``, or
      under ``jit`` a NaN loss (and gradients) and a ``checkify`` error (see
      :mod:`rankjax.losses.proxies`).
    proxies: ``f32[C, D]``, one learned row per training class (normalised inside).
    scale: :math:`s > 0`.
    margin: :math:`m \ge 0`.
    precision: matmul precision of the cosines (``jax.lax.Precision.HIGHEST`` by default; see
      :func:`rankjax.similarity.cosine_similarities`).

  Returns:
    ``f32[]``; 0 for an empty batch.

  Example:
    >>> import jax.numpy as jnp
    >>> # cos = 1 to proxy 0 and 0 to proxy 1; s = 2, m = 0.5: -log(e^1 / (e^1 + e^0))
    >>> cosface_loss(jnp.array([[1., 0.]]), jnp.array([0]), proxies=jnp.eye(2), scale=2.0,
    ...              margin=0.5)
    Array(0.31326163, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  proxies = proxy_losses.check_proxies(proxies, embeddings, labels)
  similarity.check_nonnegative(margin, "margin")
  cosines = similarity.cosine_similarities(embeddings, proxies,
                                                          precision=precision)
  return proxy_losses.margin_softmax_cross_entropy(cosines, labels, target_fn=lambda c: c - margin,
                                                   scale=scale)

SPECS = (spec.LossSpec(name="cosface", label="CosFace", fn=cosface_loss,
                       paper="Wang et al. 2018 (CosFace)", defaults=dict(scale=64.0, margin=0.35),
                       normalize=True, group="later", params={"proxies": spec.CLASS_PROXIES}),)
