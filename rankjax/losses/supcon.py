r"""Supervised contrastive loss (Khosla et al. 2020), the :math:`\mathcal{L}^{sup}_{out}` form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec


def supcon_loss(embeddings: jax.Array, labels: jax.Array, *, temperature: float = 0.1,
                ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                ref_self_index: jax.Array | None = None,
                precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""Supervised contrastive loss: every other sample of the anchor's class is a positive.

  With :math:`z` the L2-normalised embeddings, :math:`A(i)` every reference but anchor
  :math:`i` itself and :math:`P(i) \subset A(i)` those of its class,

  .. math::
     L = \frac{1}{|I^+|} \sum_{i \in I^+} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
         \log \frac{e^{z_i \cdot z_p / \tau}}{\sum_{a \in A(i)} e^{z_i \cdot z_a / \tau}}

  over the anchors :math:`I^+` that have a positive (the others do not count). Khosla et al.,
  "Supervised Contrastive Learning", NeurIPS 2020, eq. 2 (:math:`\mathcal{L}^{sup}_{out}`;
  :math:`\tau = 0.1`). The paper writes a sum over anchors; its code and pytorch-metric-learning
  average, as here. The authors' code also multiplies by :math:`\tau / \tau_{base}` (0.07), which
  this loss leaves out. With one positive per anchor it is NT-Xent (SimCLR), as in
  ``optax.losses.ntxent``.

  References: anchors come from the batch; positives and negatives from ``ref_embeddings``
  (e.g. a memory of past batches), or from the batch itself when they are None. A batch sample is
  never paired with itself; given references are a separate set, so every (anchor, reference)
  pair counts, except each anchor's own copy at ``ref_self_index`` (a memory that already holds
  the current batch, :mod:`rankjax.cross_batch`).

  Args:
    embeddings: ``f32[B, D]`` (normalised inside).
    labels: ``int[B]`` class labels.
    temperature: :math:`\tau > 0`.
    ref_embeddings: ``f32[M, D]`` or None (the batch).
    ref_labels: ``int[M]``, given with ``ref_embeddings``.
    ref_self_index: ``int[B]``, the reference column holding each anchor itself (never paired
      with it), or None.
    precision: matmul precision of the similarities (``jax.lax.Precision.HIGHEST`` by default;
      see :func:`rankjax.similarity.cosine_similarities`).

  Returns:
    ``f32[]``; 0 when no anchor has a positive.

  Example:
    >>> import jax.numpy as jnp
    >>> # Anchors 0 and 1 are each other's positive (cos 0.6) and see 2 (cos 0 and 0.8); tau = 1:
    >>> # (log(e^.6 + 1) - .6 + log(e^.6 + e^.8) - .6) / 2
    >>> x = jnp.array([[1., 0.], [0.6, 0.8], [0., 1.]])
    >>> supcon_loss(x, jnp.array([0, 0, 1]), temperature=1.0)
    Array(0.61781347, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  refs, ref_labels, self_pairs = similarity.reference_set(embeddings, labels, ref_embeddings,
                                                          ref_labels, ref_self_index)
  _common.check_positive(temperature, "temperature")
  logits = similarity.cosine_similarities(
      embeddings, refs, precision=precision) / temperature
  others = ~self_pairs
  positive = similarity.same_label_mask(labels, ref_labels) & others
  log_normaliser, _ = _common.masked_logsumexp(logits, others, axis=1)
  num_positives = jnp.sum(positive, axis=1)
  log_probs = jnp.sum(jnp.where(positive, logits - log_normaliser[:, None], 0.0), axis=1)
  per_anchor = -log_probs / jnp.maximum(num_positives, 1)
  return _common.safe_mean(jnp.sum(per_anchor), jnp.sum(num_positives > 0))

SPECS = (spec.LossSpec(name="supcon", label="SupCon", fn=supcon_loss, paper="Khosla et al. 2020",
                       defaults=dict(temperature=0.1), normalize=True, group="later"),)
