r"""ArcFace (Deng et al. 2019) and sub-center ArcFace (Deng et al. 2020): additive angular margin.

Both are a softmax over :math:`s \cos\theta_j`, the scaled cosines between an L2-normalised
embedding and L2-normalised class proxies, with the true class's angle widened by a margin
:math:`m`. Where :math:`\theta + m` would pass :math:`\pi` (and :math:`\cos(\theta + m)` would
start to rise again), the target logit follows the papers' code (insightface's
``easy_margin=False``):

.. math::
   \psi(\theta) = \begin{cases} \cos(\theta + m) & \cos\theta > \cos(\pi - m) \\
                               \cos\theta - m \sin m & \text{otherwise,} \end{cases}

so the target logit keeps decreasing in :math:`\theta` over :math:`[0, \pi]`.
pytorch-metric-learning's ``ArcFaceLoss`` (2.x) applies the same rule written in angles
(:math:`\theta \le \pi - m`, which puts the single boundary angle in the other branch); it takes
:math:`\arccos` of the clamped cosine, whose gradient is infinite at :math:`\cos\theta = \pm 1`,
where rankjax computes :math:`\cos(\theta + m) = \cos\theta\cos m - \sin\theta \sin m` with a
square root whose gradient stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rankjax import similarity
from rankjax.losses import _common
from rankjax.losses import proxies as proxy_losses
from rankjax.losses import spec


def arcface_loss(embeddings: jax.Array, labels: jax.Array, *, proxies: jax.Array,
                 scale: float = 64.0, margin_degrees: float = 28.6,
                 precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""ArcFace: softmax cross-entropy with an additive angular margin on the true class.

  .. math::
     L = -\frac{1}{B} \sum_{i=1}^{B} \log
         \frac{e^{s\,\psi(\theta_{i y_i})}}
              {e^{s\,\psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

  with :math:`\cos\theta_{ij}` the cosine between embedding :math:`x_i` and proxy :math:`W_j`
  and :math:`\psi` as in the module doc (:math:`\cos(\theta + m)` while :math:`\theta + m \le \pi`).
  Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019 (:math:`s = 64`, :math:`m = 0.5` rad :math:`\approx 28.6°`).

  Args:
    embeddings: ``f32[B, D]`` (normalised inside).
    labels: ``int[B]`` class labels in ``[0, C)``. Outside that range: a ``ValueError``, or
      under ``jit`` a NaN loss (and gradients) and a ``checkify`` error (see
      :mod:`rankjax.losses.proxies`).
    proxies: ``f32[C, D]``, one learned row per training class (normalised inside).
    scale: :math:`s > 0`.
    margin_degrees: :math:`m` in degrees, in ``[0, 180)``.
    precision: matmul precision of the cosines (``jax.lax.Precision.HIGHEST`` by default; see
      :func:`rankjax.similarity.cosine_similarities`).

  Returns:
    ``f32[]``; 0 for an empty batch. Finite for zero vectors and at :math:`\theta = 0` or
    :math:`\pi`.

  Example:
    >>> import jax.numpy as jnp
    >>> # theta = 0 to proxy 0, 90 deg to proxy 1; m = 60 deg, s = 1: -log(e^.5 / (e^.5 + e^0))
    >>> arcface_loss(jnp.array([[1., 0.]]), jnp.array([0]), proxies=jnp.eye(2), scale=1.0,
    ...              margin_degrees=60.0)
    Array(0.474077, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  proxies = proxy_losses.check_proxies(proxies, embeddings, labels)
  m = _check_margin_degrees(margin_degrees)
  cosines = similarity.cosine_similarities(embeddings, proxies,
                                                          precision=precision)
  return _arcface_cross_entropy(cosines, labels, scale, m)


def subcenter_arcface_loss(embeddings: jax.Array, labels: jax.Array, *, proxies: jax.Array,
                           scale: float = 64.0, margin_degrees: float = 28.6,
                           sub_centers: int = 3,
                           precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  r"""Sub-center ArcFace: ArcFace against the nearest of each class's :math:`K` sub-centres.

  .. math::
     \cos\theta_{ij} = \max_{k = 1..K} \cos(x_i, W_{jk})

  and then the ArcFace loss of :func:`arcface_loss` on these cosines. Noisy or multi-modal
  classes spread over several sub-centres instead of pulling one proxy apart. Deng, Guo, Liu,
  Xue, Kotsia & Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy
  Web Faces", ECCV 2020 (:math:`K = 3`, :math:`s = 64`, :math:`m = 0.5` rad).

  Args:
    embeddings: ``f32[B, D]`` (normalised inside).
    labels: ``int[B]`` class labels in ``[0, C)``; out of range as in :func:`arcface_loss`.
    proxies: ``f32[C, K, D]``: ``proxies[j, k]`` is sub-centre ``k`` of class ``j`` (normalised
      inside). pytorch-metric-learning's ``SubCenterArcFaceLoss.W`` of shape ``[D, C * K]`` is
      ``proxies.reshape(C * K, D).T``.
    scale: :math:`s > 0`.
    margin_degrees: :math:`m` in degrees, in ``[0, 180)``.
    sub_centers: :math:`K \ge 1`; must equal ``proxies.shape[1]``.
    precision: matmul precision of the cosines (``jax.lax.Precision.HIGHEST`` by default).

  Returns:
    ``f32[]``; 0 for an empty batch. With ``K = 1`` it equals :func:`arcface_loss`.

  Example:
    >>> import jax.numpy as jnp
    >>> # Class 0's second sub-centre is x itself (theta = 0); class 1's are at 90 deg.
    >>> w = jnp.array([[[0., 1.], [1., 0.]], [[0., 1.], [0., -1.]]])
    >>> subcenter_arcface_loss(jnp.array([[1., 0.]]), jnp.array([0]), proxies=w, scale=1.0,
    ...                        margin_degrees=60.0, sub_centers=2)
    Array(0.474077, dtype=float32)
  """
  embeddings, labels = similarity.check_embeddings_and_labels(embeddings, labels)
  _check_sub_centers(sub_centers)
  proxies = jnp.asarray(proxies)
  if proxies.ndim != 3 or proxies.shape[1:] != (sub_centers, embeddings.shape[1]):
    raise ValueError(f"proxies must have shape [num_classes, sub_centers={sub_centers}, "
                     f"{embeddings.shape[1]}] (the embedding size); got {tuple(proxies.shape)}.")
  proxies = proxy_losses.check_proxy_values(proxies, labels)
  m = _check_margin_degrees(margin_degrees)
  num_classes = proxies.shape[0]
  cosines = similarity.cosine_similarities(
      embeddings, proxies.reshape(num_classes * sub_centers, -1), precision=precision)
  cosines = jnp.max(cosines.reshape(-1, num_classes, sub_centers), axis=2)
  return _arcface_cross_entropy(cosines, labels, scale, m)


def additive_angular_margin(cosines: jax.Array, margin: float) -> jax.Array:
  r""":math:`\psi(\theta)` of the module doc from :math:`\cos\theta`, ``margin`` in radians.

  Finite with a finite gradient for every cosine, clipped to ``[-1, 1]`` first.
  """
  c = jnp.clip(cosines, -1.0, 1.0)
  sine = similarity.safe_sqrt(1.0 - c * c)  # zero gradient (not inf) at theta = 0 or pi
  widened = c * jnp.cos(margin) - sine * jnp.sin(margin)
  return jnp.where(c > jnp.cos(jnp.pi - margin), widened, c - margin * jnp.sin(margin))


def _arcface_cross_entropy(cosines, labels, scale, margin):
  return proxy_losses.margin_softmax_cross_entropy(
      cosines, labels, target_fn=lambda c: additive_angular_margin(c, margin), scale=scale)


def _check_sub_centers(sub_centers) -> None:
  if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
    raise ValueError(f"sub_centers must be a positive integer; got {sub_centers!r}.")


def _check_margin_degrees(margin_degrees) -> jax.Array:
  value = _common.concrete_float(margin_degrees, "margin_degrees")
  if value is not None and not 0.0 <= value < 180.0:
    raise ValueError(f"margin_degrees must be in [0, 180) degrees; got {margin_degrees}.")
  return jnp.deg2rad(jnp.asarray(margin_degrees, jnp.float32))

_SUB_CENTER_PROXIES = spec.LossParam(
    init=lambda key, num_classes, dim, *, sub_centers=3, **_: spec.proxy_init(
        key, (num_classes, sub_centers, dim)),
    learning_rate=spec.proxy_learning_rate)
ARCFACE = spec.LossSpec(
    name="arcface", label="ArcFace", fn=arcface_loss, paper="Deng et al. 2019",
    defaults=dict(scale=64.0, margin_degrees=28.6), normalize=True, group="later",
    params={"proxies": spec.CLASS_PROXIES})
SUBCENTER_ARCFACE = spec.LossSpec(
    name="subcenter_arcface", label="sub-center ArcFace", fn=subcenter_arcface_loss,
    paper="Deng et al. 2020", defaults=dict(scale=64.0, margin_degrees=28.6, sub_centers=3),
    normalize=True, group="later", params={"proxies": _SUB_CENTER_PROXIES})
SPECS = (ARCFACE, SUBCENTER_ARCFACE)
