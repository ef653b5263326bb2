r"""The embedding head's start: a random projection, or the pretrained features' principal axes.

A metric-learning head on a pretrained encoder is a linear map :math:`e = W p + b` of the pooled
features :math:`p \in \mathbb{R}^F` to :math:`D < F` dimensions. Drawn at random, it starts the
network *below* the features it projects (a random 1280 -> 128 map of ImageNet features retrieves
worse than the features themselves), so a short training run spends its first steps recovering
what the encoder already knew. ``"pca"`` starts it at the features' own best linear summary:

.. math::

   \mu = \frac{1}{N} \sum_n p_n, \qquad
   P - \mu = U \Sigma V^\top \;\; (\text{SVD of the } N \times F \text{ centred features}), \qquad
   W = s \, V_{:D}^\top, \qquad b = -W \mu,

so :math:`e_n = s V_{:D}^\top (p_n - \mu)`, the projection on the :math:`D` leading principal
directions of the training images' pooled features (each in its evaluation view, or its first
cached view with :mod:`rankjax.frozen_cache`), scaled by :math:`s = 1 / \overline{\lVert
V_{:D}^\top (p_n - \mu) \rVert}` so that the embeddings have mean norm 1 (what losses on
unnormalised embeddings, the N-pair family and lifted structure, expect at their start; an
L2-normalised head is unaffected by it). Each direction's sign is fixed (its largest entry is
positive), so the start is a function of the data alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def pca_projection(features: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """``(kernel f32[F, D], bias f32[D])`` of the PCA head for ``features: [N, F]`` (see module).

  Raises:
    ValueError: fewer than ``dim + 1`` images, or fewer than ``dim`` features.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, F]; got shape {features.shape}.")
  n, f = features.shape
  if dim > f or n <= dim:
    raise ValueError(f"A {dim}-d PCA head needs at least {dim} features and {dim + 1} training "
                     f"images; got {f} features of {n} images.")
  if not np.all(np.isfinite(features)):
    raise ValueError("The pooled features of the training images are not all finite.")
  mean = features.mean(axis=0)
  _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
  components = vt[:dim]
  signs = np.sign(components[np.arange(dim), np.argmax(np.abs(components), axis=1)])
  kernel = (components * signs[:, None]).T
  norms = np.linalg.norm((features - mean) @ kernel, axis=1)
  kernel = kernel / max(float(norms.mean()), 1e-12)
  return kernel.astype(np.float32), (-mean @ kernel).astype(np.float32)


def make_pooled_fn(eval_graphdef: nnx.GraphDef, *, from_frozen: bool):
  """``fn(model_variables, inputs) -> f32[B, F]``: the head's pooled input, in eval mode."""

  def pooled(variables, inputs):
    model = nnx.merge(eval_graphdef, variables["params"], variables["model_state"])
    if from_frozen:
      return model.pooled_from_frozen(inputs)
    return model.pooled_features(inputs)

  return jax.jit(pooled)


def pca_head_params(config, eval_graphdef, variables, mesh, cache=None) -> dict:
  """The head's ``projection`` parameters ``{"kernel", "bias"}`` of ``config.model.head_init =
  "pca"``, from the pooled features of every training image under ``variables``."""
  from rankjax.evaluation import embed as embed_lib  # pylint: disable=g-import-not-at-top
  params = variables["params"]["head"].get("projection")
  if params is None:
    raise ValueError("config.model.head_init='pca' initialises the head's projection, but "
                     "config.model.embedding_dim is None (no projection).")
  fn = make_pooled_fn(eval_graphdef, from_frozen=cache is not None)
  features, _ = embed_lib.embed_split(fn, variables, mesh, config, split="train", cache=cache)
  kernel, bias = pca_projection(features, params["kernel"].shape[1])
  return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
