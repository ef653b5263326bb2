r"""Losses with one learned proxy per training class: Proxy-Anchor and normalised softmax.

A label outside the proxies' range ``[0, C)`` is a ``ValueError`` when the labels are concrete.
Under ``jax.jit`` (where values cannot be checked) every proxy loss of rankjax follows one rule:
the loss and its gradients are NaN, so the step cannot pass unnoticed, and a caller that wraps the
loss with ``jax.experimental.checkify.checkify`` gets an error naming the range instead::

  err, value = checkify.checkify(jax.jit(loss_fn))(embeddings, labels, proxies=proxies)
  err.throw()  # "labels must lie in [0, C) ...; got labels from 0 to 5."
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec


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
    labels: ``int[B]`` class labels in ``[0, C)``. Outside that range: a ``ValueError``, or
      under ``jit`` a NaN loss (and gradients) and a ``checkify`` error (see the module doc).
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
  proxies = check_proxies(proxies, embeddings, labels)
  _common.check_positive(alpha, "alpha")
  similarity.check_nonnegative(delta, "delta")
  in_range = labels_in_range(labels, proxies.shape[0])
  s = nan_unless(in_range, similarity.cosine_similarities(embeddings, proxies))  # [B, C]
  positive = labels[:, None] == jnp.arange(proxies.shape[0])[None, :]
  pull = _common.log1p_sum_exp(-alpha * (s - delta), positive, axis=0)  # [C], 0 if absent
  push = _common.log1p_sum_exp(alpha * (s + delta), ~positive, axis=0)  # [C]
  present = jnp.any(positive, axis=0)
  loss = _common.safe_mean(jnp.sum(pull), jnp.sum(present)) + jnp.mean(push)
  return nan_unless(in_range, loss)


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
    labels: ``int[B]`` class labels in ``[0, C)``. Outside that range: a ``ValueError``, or
      under ``jit`` a NaN loss (and gradients) and a ``checkify`` error (see the module doc).
    proxies: ``f32[C, D]``, one row per training class.
    temperature: :math:`T > 0`.

  Returns:
    ``f32[]``; 0 for an empty batch.

  Example:
    >>> import jax.numpy as jnp
    >>> # s = (1, 0) to proxies (0, 1) with T = 1: -log(e / (e + 1)) = log(1 + e^-1)
    >>> normalized_softmax_loss(jnp.array([[1., 0.]]), jnp.array([0]), proxies=jnp.eye(2),
    ...                         temperature=1.0)
    Array(0.31326163, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  proxies = check_proxies(proxies, embeddings, labels)
  _common.check_positive(temperature, "temperature")
  in_range = labels_in_range(labels, proxies.shape[0])
  logits = nan_unless(in_range, similarity.cosine_similarities(embeddings, proxies)) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)
  loss = _common.safe_mean(-jnp.sum(picked), labels.shape[0])
  return nan_unless(in_range, loss)


def check_proxies(proxies, embeddings, labels) -> jax.Array:
  """``proxies`` as ``f32[C, D]`` for the batch, or a ``ValueError`` naming what is wrong."""
  proxies = jnp.asarray(proxies)
  if proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
    raise ValueError(f"proxies must have shape [num_classes, {embeddings.shape[1]}] (the "
                     f"embedding size); got {tuple(proxies.shape)}.")
  return check_proxy_values(proxies, labels)


def margin_softmax_cross_entropy(cosines: jax.Array, labels: jax.Array, *,
                                 target_fn: Callable[[jax.Array], jax.Array],
                                 scale) -> jax.Array:
  r"""Mean cross-entropy of softmax(``scale * cosines``), the true class's cosine ``c`` replaced by
  ``target_fn(c)``: the common form of the margin softmax losses (CosFace, ArcFace).

  ``cosines: f32[B, C]``; labels outside ``[0, C)`` follow :func:`labels_in_range`.
  """
  _common.check_positive(scale, "scale")
  in_range = labels_in_range(labels, cosines.shape[1])
  cosines = nan_unless(in_range, cosines)
  true_class = labels[:, None] == jnp.arange(cosines.shape[1])[None, :]
  target = target_fn(jnp.take_along_axis(cosines, labels[:, None], axis=1, mode="clip"))
  logits = scale * jnp.where(true_class, target, cosines)
  picked = jnp.sum(jnp.where(true_class, jax.nn.log_softmax(logits, axis=1), 0.0))
  loss = _common.safe_mean(-picked, labels.shape[0])
  return nan_unless(in_range, loss)


def check_proxy_values(proxies: jax.Array, labels: jax.Array) -> jax.Array:
  """Floating-point ``proxies`` (one class per leading row) as float32; concrete labels in range."""
  if not jnp.issubdtype(proxies.dtype, jnp.floating):
    raise ValueError(f"proxies must be floating point; got dtype {proxies.dtype}.")
  check_label_range(labels, proxies.shape[0])
  return proxies.astype(jnp.float32)


def check_label_range(labels: jax.Array, num_classes: int,
                      what: str = "one proxy per class") -> None:
  """Raises ``ValueError`` when concrete ``labels`` leave ``[0, num_classes)``; no-op on tracers."""
  if isinstance(labels, jax.core.Tracer) or not labels.size:
    return
  values = np.asarray(labels)  # numpy: concrete labels closed over by a jitted caller stay concrete
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}) ({what}); got labels from {low} to "
                     f"{high}.")


def labels_in_range(labels: jax.Array, num_classes: int,
                    what: str = "one proxy per class") -> jax.Array:
  """``bool[]``: every label in ``[0, num_classes)``; the rule for labels :func:`check_label_range`
  cannot read (under ``jit``).

  It registers a ``checkify.debug_check``: a no-op normally, an error naming the range for a
  caller that wraps the loss with ``jax.experimental.checkify.checkify``. The loss then passes its
  similarities and its value through :func:`nan_unless`, so that value and gradients are NaN.
  """
  in_range = jnp.all((labels >= 0) & (labels < num_classes))
  info = jnp.iinfo(jnp.int32)
  checkify.debug_check(
      in_range, f"labels must lie in [0, {num_classes}) ({what}); got labels from {{low}} to "
      "{high}.", low=jnp.min(labels, initial=info.max), high=jnp.max(labels, initial=info.min))
  return in_range


def nan_unless(in_range: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` where ``in_range``, else NaN; every gradient through it is then NaN too."""
  return x * jnp.where(in_range, 1.0, jnp.nan).astype(x.dtype)

SPECS = (
    spec.LossSpec(name="proxy_anchor", label="Proxy-Anchor", fn=proxy_anchor_loss,
                  paper="Kim et al. 2020", defaults=dict(alpha=32.0, delta=0.1), normalize=True,
                  group="proxy", params={"proxies": spec.CLASS_PROXIES}),
    spec.LossSpec(name="normalized_softmax", label="normalised softmax",
                  fn=normalized_softmax_loss, paper="Zhai & Wu 2019",
                  defaults=dict(temperature=0.05), normalize=True, group="proxy",
                  params={"proxies": spec.CLASS_PROXIES}),
)
