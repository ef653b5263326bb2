r"""N-pair loss (Sohn 2016), angular loss (Wang et al. 2017) and their sum.

All three use the same (anchor, positive) pairs: for each class with at least two samples in the
batch, its first sample in batch order is the anchor :math:`a_i` and its second the positive
:math:`p_i` (:func:`rankjax.mining.first_two_per_class`). Other samples are ignored, except by
``npairs_loss(..., negatives="all")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from rankjax import mining
from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import spec

NEGATIVES = ("positives", "all")


def npairs_loss(embeddings: jax.Array, labels: jax.Array, *, l2_reg: float = 0.002,
                negatives: str = "positives", precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""Multi-class N-pair loss with the tf.contrib semantics (logits on raw embeddings).

  With :math:`N` pairs :math:`(a_i, p_i)` and logits :math:`s_{ij} = a_i \cdot p_j`,

  .. math::
     L = \frac{1}{N} \sum_i \Big(-s_{ii} + \log \sum_{j} e^{s_{ij}}\Big)
         + \frac{\lambda}{4} \Big(\frac{1}{N}\sum_i \|a_i\|^2 + \frac{1}{N}\sum_i \|p_i\|^2\Big),

  the mean softmax cross-entropy of row :math:`i` against target :math:`i`, plus the L2 penalty of
  ``tf.contrib.losses.metric_learning.npairs_loss``. Sohn, "Improved deep metric learning with
  multi-class N-pair loss objective", NeurIPS 2016.

  Args:
    embeddings: ``f32[B, D]`` (not normalised: the penalty keeps the norms in check).
    labels: ``int[B]`` class labels.
    l2_reg: :math:`\lambda \ge 0`.
    negatives: ``"positives"`` (the paper: the other classes' positives :math:`p_j`) or ``"all"``:
      every other-class sample of the batch is a negative of :math:`a_i`, i.e. the log-sum-exp
      runs over :math:`\{a_i \cdot p_i\} \cup \{a_i \cdot x_n : y_n \ne y_i\}` (B - 2 negatives
      per anchor when every class has two samples).
    precision: of the logits' matmul (:data:`rankjax.similarity.DEFAULT_PRECISION`).

  Returns:
    ``f32[]``; 0 when no class has two samples.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
    >>> npairs_loss(x, jnp.array([0, 1, 0, 1]), l2_reg=0.0)  # log(1 + e^-1)
    Array(0.31326163, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  similarity.check_nonnegative(l2_reg, "l2_reg")
  _common.check_choice(negatives, "negatives", NEGATIVES)
  fn = _npairs_function(negatives, similarity.check_precision(precision))
  return _with_fewest_slots(fn, embeddings, labels, jnp.asarray(l2_reg, jnp.float32))


@functools.lru_cache(maxsize=None)
def _npairs_function(negatives, precision):
  # One function object per option (a static argument of the custom VJP below, so it is hashed).
  return functools.partial(_npairs, negatives=negatives, precision=precision)


def _npairs(embeddings, labels, pairs, l2_reg, *, negatives, precision):
  anchors, positives = embeddings[pairs.anchors], embeddings[pairs.positives]
  target = jnp.sum(anchors * positives, axis=-1)
  if negatives == "positives":
    logits = jnp.matmul(anchors, positives.T, precision=precision)
    log_normaliser, _ = _common.masked_logsumexp(logits, pairs.valid[None, :], axis=1)
  else:
    logits = jnp.concatenate(
        [target[:, None], jnp.matmul(anchors, embeddings.T, precision=precision)], axis=1)
    other_class = labels[pairs.anchors][:, None] != labels[None, :]
    mask = jnp.concatenate([jnp.ones_like(other_class[:, :1]), other_class], axis=1)
    log_normaliser, _ = _common.masked_logsumexp(logits, mask, axis=1)
  count = jnp.sum(pairs.valid)
  cross_entropy = jnp.sum(jnp.where(pairs.valid, log_normaliser - target, 0.0))
  squared_norms = jnp.sum(anchors**2, axis=-1) + jnp.sum(positives**2, axis=-1)
  penalty = 0.25 * l2_reg * jnp.sum(jnp.where(pairs.valid, squared_norms, 0.0))
  return _common.safe_mean(cross_entropy + penalty, count)


def angular_loss(embeddings: jax.Array, labels: jax.Array, *, alpha_degrees: float = 45.0,
                 precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""Angular loss, batch (N-pair) form, on L2-normalised embeddings.

  With :math:`t = \tan^2 \alpha` and the pairs :math:`(a_i, p_i)` normalised to unit length,

  .. math::
     f_{ij} = 4t\,(a_i + p_i) \cdot p_j - 2(1 + t)\,a_i \cdot p_i, \qquad
     L = \frac{1}{N} \sum_i \log\Big(1 + \sum_{j \ne i} e^{f_{ij}}\Big).

  Wang, Zhou, Wen, Liu & Lin, "Deep metric learning with angular loss", ICCV 2017 (eq. 8).
  Invariant to the scale of the embeddings.

  Args:
    embeddings: ``f32[B, D]`` (normalised inside, as the paper defines it).
    labels: ``int[B]`` class labels.
    alpha_degrees: :math:`\alpha`, in degrees, in (0, 90); the paper uses 36 to 55.
    precision: of the logits' matmul (:data:`rankjax.similarity.DEFAULT_PRECISION`).

  Returns:
    ``f32[]``; 0 when fewer than two classes have two samples.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
    >>> angular_loss(x, jnp.array([0, 1, 0, 1]))  # log(1 + e^-4): f = 4 * 0 - 2 * 2 * 1
    Array(0.01814996, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  _check_angle(alpha_degrees)
  tan_sq = jnp.square(jnp.tan(jnp.deg2rad(jnp.asarray(alpha_degrees, jnp.float32))))
  return _with_fewest_slots(_angular_function(similarity.check_precision(precision)), embeddings,
                            labels, tan_sq)


@functools.lru_cache(maxsize=None)
def _angular_function(precision):
  return functools.partial(_angular, precision=precision)


def _angular(embeddings, labels, pairs, tan_sq, *, precision):
  del labels
  unit = similarity.l2_normalize(embeddings)
  anchors, positives = unit[pairs.anchors], unit[pairs.positives]
  logits = (jnp.matmul(4.0 * tan_sq * (anchors + positives), positives.T, precision=precision)
            - 2.0 * (1.0 + tan_sq) * jnp.sum(anchors * positives, axis=-1)[:, None])
  others = pairs.valid[:, None] & pairs.valid[None, :] & ~jnp.eye(pairs.valid.shape[0], dtype=bool)
  losses = _common.log1p_sum_exp(logits, others, axis=1)
  return _common.safe_mean(jnp.sum(jnp.where(pairs.valid, losses, 0.0)), jnp.sum(pairs.valid))


def npairs_angular_loss(embeddings: jax.Array, labels: jax.Array, *, alpha_degrees: float = 45.0,
                        angular_weight: float = 2.0, l2_reg: float = 0.002,
                        precision=similarity.DEFAULT_PRECISION) -> jax.Array:
  r"""N-pair & angular loss of Wang et al. 2017:
  :math:`L = L_{npair}(x) + \lambda_{ang} L_{ang}(x / \|x\|)`.

  ``npairs_loss(embeddings, labels, l2_reg=l2_reg)`` on the raw embeddings plus
  ``angular_weight * angular_loss(embeddings, labels, alpha_degrees=alpha_degrees)``; the paper
  uses :math:`\lambda_{ang} = 2`. ``precision`` is both terms' (as in :func:`npairs_loss`).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
    >>> npairs_angular_loss(x, jnp.array([0, 1, 0, 1]), l2_reg=0.0)  # 0.31326 + 2 * 0.01815
    Array(0.34956154, dtype=float32)
  """
  similarity.check_nonnegative(angular_weight, "angular_weight")
  return (npairs_loss(embeddings, labels, l2_reg=l2_reg, precision=precision)
          + angular_weight * angular_loss(embeddings, labels, alpha_degrees=alpha_degrees,
                                          precision=precision))


def _with_fewest_slots(fn, embeddings, labels, param):
  """``fn(embeddings, labels, pairs, param)`` with the fewest static slots that hold every pair.

  The work is O(S^2 D) for S slots, and a P x K batch has only P = B / K pairs, so the smallest of
  B/2, B/4, B/8 and B/16 that fits is picked at run time (under ``vmap`` every size runs).
  """
  batch = labels.shape[0]
  sizes = tuple(sorted({max(batch // 2**k, 1) for k in (1, 2, 3, 4)}))
  branch = jnp.searchsorted(jnp.asarray(sizes), mining.pair_count(labels))
  return _switch_on_slots(fn, sizes, jnp.minimum(branch, len(sizes) - 1), embeddings, labels,
                          param)


def _sized(fn, slots):
  return lambda x, y, param: fn(x, y, mining.first_two_per_class(y, slots=slots), param)


# Differentiating lax.switch directly made the backward pass cost as much as the largest branch
# (measured: 4x slower at B = 2048); here each branch differentiates itself.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _switch_on_slots(fn, sizes, branch, embeddings, labels, param):
  return lax.switch(branch, [_sized(fn, size) for size in sizes], embeddings, labels, param)


def _switch_on_slots_fwd(fn, sizes, branch, embeddings, labels, param):
  value = _switch_on_slots(fn, sizes, branch, embeddings, labels, param)
  return value, (branch, embeddings, labels, param)


def _switch_on_slots_bwd(fn, sizes, residuals, g):
  branch, embeddings, labels, param = residuals

  def pullback(size):
    def run(x, y, p):
      _, vjp = jax.vjp(lambda x, p: _sized(fn, size)(x, y, p), x, p)
      return vjp(g)
    return run

  grad_x, grad_param = lax.switch(branch, [pullback(size) for size in sizes], embeddings, labels,
                                  param)
  return None, grad_x, None, grad_param


_switch_on_slots.defvjp(_switch_on_slots_fwd, _switch_on_slots_bwd)


def _check_angle(alpha_degrees):
  alpha = _common.concrete_float(alpha_degrees, "alpha_degrees")
  if alpha is not None and not 0.0 < alpha < 90.0:
    raise ValueError(f"alpha_degrees must be in (0, 90) degrees; got {alpha_degrees}.")

SPECS = (
    spec.LossSpec(name="npairs", label="N-pairs", fn=npairs_loss, paper="Sohn 2016",
                  defaults=dict(l2_reg=0.002), normalize=False, samples_per_class=2),
    spec.LossSpec(name="angular", label="angular", fn=angular_loss, paper="Wang et al. 2017",
                  defaults=dict(alpha_degrees=45.0), normalize=True, samples_per_class=2),
    spec.LossSpec(name="npairs_angular", label="N-pairs + angular", fn=npairs_angular_loss,
                  paper="Wang et al. 2017",
                  defaults=dict(alpha_degrees=45.0, angular_weight=2.0, l2_reg=0.002),
                  normalize=False, samples_per_class=2),
)
