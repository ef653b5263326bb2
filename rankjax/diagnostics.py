r"""Training diagnostics that show a collapsing or saturated embedding early.

A ranking loss can sit at a plausible value while the embedding has collapsed (all points together:
every triplet active, positive and negative distances equal) or while it has stopped learning (no
triplet active). :func:`batch_diagnostics` summarises one batch (the trainer computes it on the
embeddings of each step it logs), so the trends show in TensorBoard next to the loss:

* ``active_triplets``: the fraction of valid triplets :math:`(a, p, n)` (:math:`y_a = y_p \ne y_n`,
  :math:`a \ne p`) with a non-zero hinge, :math:`d_{ap} - d_{an} + m > 0`. With ``margin=0`` it is
  the fraction of triplets ranked the wrong way round.
* ``active_pairs`` (when ``neg_margin`` is given, as for the contrastive loss): the fraction of
  ordered pairs :math:`i \ne j` with a non-zero contrastive term, positives with
  :math:`d > m_+` and negatives with :math:`d < m_-`.
* ``mean_positive_distance`` / ``mean_negative_distance`` over positive / negative pairs.
* ``mean_norm``: the mean L2 norm of the embeddings.

Active triplets are counted by :func:`rankjax.mining.negative_hinge_sums`, the batch-all
triplet loss's own selection, without building the :math:`B^3` tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import mining
from rankjax import similarity


def batch_diagnostics(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.0,
                      distance: str = "euclidean", pos_margin: float = 0.0,
                      neg_margin: float | None = None) -> dict[str, jax.Array]:
  """Diagnostics of one batch ``embeddings: f32[B, D]``, ``labels: int[B]`` -> dict of ``f32[]``.

  No gradient flows through them. Fractions over an empty set (a batch with no valid triplet)
  are 0, never NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.], [1.], [3.]]); y = jnp.array([0, 0, 1])
    >>> float(batch_diagnostics(x, y, margin=0.0)["active_triplets"])  # d_ap=1 < d_an in both
    0.0
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  x = jax.lax.stop_gradient(embeddings)
  d = similarity.pairwise_distances(x, distance=distance)
  pos = similarity.positive_mask(labels)
  neg = similarity.negative_mask(labels)

  _, active_counts = mining.negative_hinge_sums(d, labels, margin=margin)

  out = {
      "active_triplets": _safe_ratio(jnp.sum(active_counts), mining.valid_triplet_count(labels)),
      "mean_positive_distance": _masked_mean(d, pos),
      "mean_negative_distance": _masked_mean(d, neg),
      "mean_norm": jnp.mean(jnp.linalg.norm(x, axis=-1)),
  }
  if neg_margin is not None:
    active_pairs = jnp.sum(pos & (d > pos_margin)) + jnp.sum(neg & (d < neg_margin))
    out["active_pairs"] = _safe_ratio(active_pairs.astype(jnp.float32),
                                      jnp.sum(pos | neg).astype(jnp.float32))
  return out


def _safe_ratio(numerator, denominator):
  return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1.0), 0.0)


def _masked_mean(values, mask):
  return _safe_ratio(jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask).astype(jnp.float32))
