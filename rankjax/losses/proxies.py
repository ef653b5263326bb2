r"""Losses with one learned proxy per training class: Proxy-Anchor and normalised softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common


def proxy_anchor_loss(embeddings: jax.Array, labels: jax.Array, *, proxies: jax.Array,
                      alpha: float = 32.0, delta: float = 0.1) -> jax.Array:
  r"""Proxy-Anchor loss over the cosine similarities :math:`s(x, p)` of samples and proxies.

  Each training class :math:`c` has a learned proxy :math:`p_c` (row ``c`` of ``proxies``),
  trained with the network. Every proxy is an anchor: it pulls the batch's samples of its class
  and pushes every other sample away, each weighted by its hardness through the log-sum-exp:

  .. math::
     L = \frac{1}{|P^+|} \sum_{p \in P^+}
           \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha (s(x, p) - \delta)}\Big)
       + \frac{1}{|P|} \sum_{p \in P}
           \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha (s(x, p) + \delta)}\Big)

  with :math:`P` all proxies, :math:`P^+` those whose class is in the batch, :math:`X_p^+` the
  batch's samples of :math:`p`'s class and :math:`X_p^-` the others. Kim et al., "Proxy Anchor
  Loss for Deep Metric Learning", CVPR 2020, eq. 4 (their defaults :math:`\alpha = 32`,
  :math:`\delta = 0.1`; they train the proxies with a 100x larger learning rate). Invariant to
  the scale of embeddings and proxies (both are normalised here).

  Args:
    embeddings: ``f32[B, D]``.
    labels: ``int[B]`` class labels in ``[0, C)``. Under ``jit`` a label outside that range
      cannot raise: its sample is then a negative of every proxy and positive of none.
    proxies: ``f32[C, D]``, one row per training class.
    alpha: scale :math:`\alpha > 0`.
    delta: margin :math:`\delta \ge 0`.

  Returns:
    ``f32[]``; finite for any input (a zero row counts as similarity 0).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0., 1.]])
    >>> # Both samples are class 0: proxy 0 pulls them (s = 1 and 0) and has no negative; proxy 1
    >>> # is absent from the batch and pushes both (s = 0 and 1). With alpha = 1:
    >>> # log(1 + e^-0.9 + e^0.1) + [0 + log(1 + e^0.1 + e^1.1)] / 2
    >>> proxy_anchor_loss(x, jnp.array([0, 0]), proxies=jnp.eye(2), alpha=1.0)
    Array(1.7365108, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  proxies = _check_proxies(proxies, embeddings, labels)
  _common.check_positive(alpha, "alpha")
  similarity.check_nonnegative(delta, "delta")
  s = similarity.cosine_similarities(embeddings, proxies)  # [B, C]
  positive = labels[:, None] == jnp.arange(proxies.shape[0])[None, :]
  pull = _common.log1p_sum_exp(-alpha * (s - delta), positive, axis=0)  # [C], 0 if absent
  push = _common.log1p_sum_exp(alpha * (s + delta), ~positive, axis=0)  # [C]
  present = jnp.any(positive, axis=0)
  return _common.safe_mean(jnp.sum(pull), jnp.sum(present)) + jnp.mean(push)


def normalized_softmax_loss(embeddings: jax.Array, labels: jax.Array, *, proxies: jax.Array,
                            temperature: float = 0.05) -> jax.Array:
  r"""Normalised softmax (NormFace) cross-entropy over cosine similarities to class proxies.

  .. math::
     L = -\frac{1}{B} \sum_{i=1}^{B}
         \log \frac{e^{s(x_i, p_{y_i}) / T}}{\sum_{c=1}^{C} e^{s(x_i, p_c) / T}}

  with :math:`s` the cosine similarity and temperature :math:`T`: classification on the unit
  sphere, every proxy a negative of every sample. Zhai & Wu, "Classification is a Strong Baseline
  for Deep Metric Learning", BMVC 2019 (:math:`T = 0.05`); Wang et al., "NormFace", ACM MM 2017.

  Args:
    embeddings: ``f32[B, D]``.
    labels: ``int[B]`` class labels in ``[0, C)`` (checked when concrete).
    proxies: ``f32[C, D]``, one row per training class.
    temperature: :math:`T > 0`.

  Returns:
    ``f32[]``; 0 for an empty batch.

  Example:
    >>> import jax.numpy as jnp
    >>> # s = (1, 0) to proxies (0, 1) with T = 1: -log(e / (e + 1)) = log(1 + e^-1)
    >>> normalized_softmax_loss(jnp.array([[1., 0.]]), jnp.array([0]), proxies=jnp.eye(2),
    ...                         temperature=1.0)
    Array(0.31326166, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  proxies = _check_proxies(proxies, embeddings, labels)
  _common.check_positive(temperature, "temperature")
  logits = similarity.cosine_similarities(embeddings, proxies) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)
  return _common.safe_mean(-jnp.sum(picked), labels.shape[0])


def _check_proxies(proxies, embeddings, labels) -> jax.Array:
  proxies = jnp.asarray(proxies)
  if proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
    raise ValueError(f"proxies must have shape [num_classes, {embeddings.shape[1]}] (the "
                     f"embedding size); got {tuple(proxies.shape)}.")
  if not jnp.issubdtype(proxies.dtype, jnp.floating):
    raise ValueError(f"proxies must be floating point; got dtype {proxies.dtype}.")
  _check_label_range(labels, proxies.shape[0])
  return proxies.astype(jnp.float32)


def _check_label_range(labels: jax.Array, num_classes: int) -> None:
  if isinstance(labels, jax.core.Tracer):
    return
  low, high = int(jnp.min(labels)), int(jnp.max(labels))
  if low < 0 or high >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}) (one proxy per class); got labels "
                     f"from {low} to {high}.")
