r"""The frozen-trunk activation cache: a train step from cached activations beside one from images.

Two tables, measured in one run:

1. **Train step**, ImageNet EfficientNet-Lite0 with frozen BatchNorm and the stem and first N
   blocks frozen (``--frozen``), contrastive loss on the L2-normalised 128-d embeddings, Adam,
   batch 64 (16 classes x 4), at each ``--sizes``: the uncached step (forward of the whole
   network from images, backward through the part that trains) beside the cached one (the same
   step from the frozen prefix's float16 output, :meth:`EmbeddingModel.embed_from_frozen`). Images/s
   of wall time, best of ``--repeats`` x ``--steps`` steps on one fixed batch: the step's compute
   alone (the cached input is a memory-mapped gather; the uncached one also decodes and crops
   JPEGs, not counted here).
2. **Build** (with ``--data_dir`` and ``--datasets``): for each set, the cache of
   ``--views`` views of every training image and the evaluation view of every validation and test
   image at ``--build_size`` px, built into a fresh ``--cache_dir``: build time, views/s, disk size;
   and the validation metrics of the ImageNet features (no head: the pooled 1280-d features after
   the trained blocks at their ImageNet weights) read from that float32 cache, beside the same
   activations rounded to float16 and bfloat16 (the storage dtypes).

::

  python benchmarks/frozen_cache.py
  python benchmarks/frozen_cache.py --sizes 224 --frozen 15 --data_dir=DATA_DIR \
      --datasets=cars196_half,cub200_first50,lfw --cache_dir=/tmp/bench_cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import train_step  # benchmarks/train_step.py: the shared train-step harness.
from rankjax import configs
from rankjax import evaluation
from rankjax import frozen_cache
from rankjax import losses
from rankjax import optim
from rankjax import parallel
from rankjax import recipes
from rankjax import seeding
from rankjax import train
from rankjax import train_state
from rankjax.evaluation import embed as embed_lib

BATCH = 64


def step_runners(image_size: int, frozen: int):
  """``(uncached run(n), cached run(n))``: seconds for ``n`` steps of each, on one batch."""
  config = configs.base_config()
  config.model.name = "efficientnet_lite0"
  config.model.pretrained = "imagenet"
  config.model.freeze_batchnorm = True
  config.model.backbone_options.frozen_blocks = frozen
  configs.with_loss(config, "contrastive")
  model = train.build_model(config, types.SimpleNamespace(num_channels=3))
  graphdef, _, params, model_state = train_state.split_model(model)
  loss_fn = losses.get_loss("contrastive", **configs.loss_kwargs(config))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(BATCH, image_size, image_size, 3)), jnp.float32)
  labels = jnp.repeat(jnp.arange(BATCH // 4, dtype=jnp.int32), 4)
  model.eval()
  prefix = nnx.jit(lambda m, x: m.frozen_prefix(x))
  activations = prefix(model, images).astype(jnp.float16)
  runs = []
  for batch in ({"image": images, "label": labels},
                {"activation": activations, "label": labels}):
    tx, schedules = optim.make_optimizer(config.optimizer, params, total_steps=1000)
    step = jax.jit(train_state.make_train_step(graphdef, loss_fn, tx, schedules, None),
                   donate_argnums=0)
    # Each step donates its own copy of the state.
    state = train_state.init_state(jax.tree.map(jnp.copy, params),
                                   jax.tree.map(jnp.copy, model_state), tx)
    runs.append(train_step.step_timer(step, state, batch))
  return runs


def images_per_second(run, *, steps, repeats):
  return max(BATCH * steps / run(steps) for _ in range(repeats))


def build_row(dataset: str, frozen: int, args) -> dict:
  """Builds ``dataset``'s float32 cache; its time, size, and the storage dtypes' val metrics."""
  config = recipes.cpu_photo_recipe(dataset, "contrastive", {"imagenet_features"},
                                    image_size=args.build_size)
  config.data_dir = args.data_dir
  config.model.backbone_options.frozen_blocks = frozen
  config.frozen_cache.enabled = True
  config.frozen_cache.views = args.views
  config.frozen_cache.dtype = "float32"
  config.frozen_cache.dir = os.path.join(args.cache_dir, dataset)
  shutil.rmtree(config.frozen_cache.dir, ignore_errors=True)
  from rankjax import data  # pylint: disable=g-import-not-at-top
  info = data.get_dataset_info(config.dataset, data_dir=config.data_dir, protocol=config.protocol)
  model = train.build_model(config, info)
  start = time.perf_counter()
  cache = frozen_cache.open_or_build(config, model)
  seconds = time.perf_counter() - start
  views = sum(int(np.prod(a.shape[:-3])) for a in cache.arrays.values())
  row = {"dataset": dataset, "views": views, "seconds": seconds,
         "float16_bytes": 2 * sum(a.size for a in cache.arrays.values())}

  _, eval_graphdef, params, model_state = train_state.split_model(model)
  variables = {"params": params, "model_state": model_state}
  mesh = parallel.make_mesh()
  embed = embed_lib.make_eval_embed_fn(eval_graphdef, config, mesh)
  evaluator = evaluation.Evaluator(("recall@1", "map@r"), distance="cosine",
                                   nmi_seed=seeding.stream_seed(0, "nmi"))
  exact = cache.arrays["val"]
  for dtype in frozen_cache.DTYPES:
    cache.arrays["val"] = np.asarray(exact).astype(jnp.dtype(dtype))
    embeddings, labels = embed_lib.embed_split(embed, variables, mesh, config, split="val",
                                               cache=cache)
    row[dtype] = dict(evaluator.run(embeddings, labels))
  cache.arrays["val"] = exact
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="*", default=[112, 160, 224],
                      help="Step sizes to time; none: only the build table.")
  parser.add_argument("--frozen", type=int, nargs="+", default=[11, 15])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--datasets", default="")
  parser.add_argument("--cache_dir", default="/tmp/rankjax_frozen_cache_benchmark")
  parser.add_argument("--views", type=int, default=8)
  parser.add_argument("--build_size", type=int, default=224)
  args = parser.parse_args()

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores); batch {BATCH}, {args.steps} steps x best of "
        f"{args.repeats}")
  print(f"{'size':>4} {'frozen':>6} {'images img/s':>12} {'cached img/s':>12} {'speed-up':>8}")
  for size in args.sizes:
    for frozen in args.frozen:
      uncached, cached = step_runners(size, frozen)
      a = images_per_second(uncached, steps=args.steps, repeats=args.repeats)
      b = images_per_second(cached, steps=args.steps, repeats=args.repeats)
      print(f"{size:>4} {frozen:>6} {a:>12.1f} {b:>12.1f} {b / a:>7.2f}x", flush=True)

  datasets = [d for d in args.datasets.split(",") if d]
  if datasets:
    if not args.data_dir:
      raise SystemExit("--datasets needs --data_dir (where the sets' folders are unpacked).")
    frozen = args.frozen[-1]
    print(f"\nBuild at {args.build_size} px, {frozen} frozen blocks, {args.views} views of each "
          "training image; validation metrics of the ImageNet features from the cache")
    print(f"{'dataset':<16} {'views':>7} {'build s':>8} {'views/s':>8} {'f16 MiB':>8} "
          + " ".join(f"{d + ' R@1':>13} {d + ' MAP@R':>15}" for d in frozen_cache.DTYPES))
    for dataset in datasets:
      row = build_row(dataset, frozen, args)
      print(f"{dataset:<16} {row['views']:>7} {row['seconds']:>8.0f} "
            f"{row['views'] / row['seconds']:>8.1f} {row['float16_bytes'] / 2**20:>8.1f} "
            + " ".join(f"{row[d]['recall@1']:>13.4f} {row[d]['map@r']:>15.4f}"
                       for d in frozen_cache.DTYPES), flush=True)


if __name__ == "__main__":
  main()
