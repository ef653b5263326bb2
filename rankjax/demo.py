"""Every rankjax loss on a real batch: scikit-learn's bundled handwritten digits.

    python -m rankjax.demo

The batch is class-balanced, P classes x K images (10 x 8 = 80 by default, drawn with a fixed
seed) from ``sklearn.datasets.load_digits`` (8 x 8 images, shipped with scikit-learn, no
download). The embeddings are the raw images: the 64 pixel intensities divided by 16 and
L2-normalised, no learned model. Each loss is printed for these embeddings beside its value for
random unit vectors with the same labels. Pixels already place same-digit images closer than
chance, so most losses are lower on them. The angular losses are not: pixel vectors are all
non-negative, so every image lies within 90 degrees of every other, and the angular loss
penalises a negative near the middle of an (anchor, positive) pair however close the pair is.
A loss that learns parameters (class proxies, the margin loss's beta) is given them at their start,
untrained, so its two columns differ only by how the batches lie around random proxies.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rankjax import losses
from rankjax import similarity

LOSS_NAMES = losses.loss_names()
_DIGIT_CLASSES = 10


def digits_batch(classes: int = 10, per_class: int = 8, seed: int = 0):
  """A P x K batch of digits: ``(f32[P*K, 64] unit-norm pixel vectors, int32[P*K] labels)``."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  if not 2 <= classes <= 10:
    raise ValueError(f"classes must be between 2 and 10 (the digits); got {classes}.")
  if per_class < 2:
    raise ValueError(f"per_class must be at least 2 to form positive pairs; got {per_class}.")
  rng = np.random.default_rng(seed)
  chosen = rng.choice(10, size=classes, replace=False)
  index = np.concatenate(
      [rng.choice(np.flatnonzero(digits.target == c), size=per_class, replace=False)
       for c in chosen])
  pixels = digits.data[index].astype(np.float32) / 16.0
  embeddings = similarity.l2_normalize(jnp.asarray(pixels))
  return embeddings, jnp.asarray(digits.target[index], jnp.int32)


def loss_table(embeddings, labels, seed: int = 0):
  """Rows of ``(name, loss on the embeddings, loss on random unit vectors, seconds)``."""
  random = similarity.l2_normalize(
      jax.random.normal(jax.random.key(seed), embeddings.shape, jnp.float32))
  rows = []
  key = jax.random.key(seed)
  for name in LOSS_NAMES:
    start = time.perf_counter()
    spec = losses.get_spec(name)
    # A loss's learned parameters (class proxies, ...) at their start, one row per digit; the
    # same for both batches.
    options = spec.loss_options(spec.defaults)
    extra = spec.init_params(jax.random.fold_in(key, 1), _DIGIT_CLASSES, embeddings.shape[1],
                             **options)
    if spec.takes_key:
      extra["key"] = jax.random.fold_in(key, 2)
    fn = jax.jit(spec.bind(**options))
    ours = float(fn(embeddings, labels, **extra))
    chance = float(fn(random, labels, **extra))
    rows.append((name, ours, chance, time.perf_counter() - start))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description="Every rankjax loss on a batch of digits.")
  parser.add_argument("--classes", type=int, default=10, help="P, digit classes in the batch")
  parser.add_argument("--per-class", type=int, default=8, help="K, images per class")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  embeddings, labels = digits_batch(args.classes, args.per_class, args.seed)
  print(f"rankjax demo: {len(labels)} images of scikit-learn's digits ({args.classes} classes x "
        f"{args.per_class}, seed {args.seed}).")
  print("Embeddings: 64 pixel intensities / 16, L2-normalised (no model); baseline: random unit "
        "vectors, same labels.\n")
  print(f"{'loss':18s} {'digit pixels':>13s} {'random':>10s} {'ratio':>7s}")
  for name, ours, chance, _ in loss_table(embeddings, labels, args.seed):
    ratio = f"{ours / chance:7.3f}" if chance else f"{'-':>7s}"
    print(f"{name:18s} {ours:13.5f} {chance:10.5f} {ratio}", flush=True)
  print("\nratio = digit pixels / random (below 1: lower loss than chance).")


if __name__ == "__main__":
  main()
