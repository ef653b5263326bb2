r"""Speed (and memory) of rankjax's losses beside the Gram matmul and pytorch-metric-learning.

For each batch size B (P x K batches, K = 4 per class) and D = 512, on random unit-norm float32
embeddings, it times:

* ``jax.jit(jax.value_and_grad(loss))`` for every loss and triplet mining mode;
* the Gram matrix ``x @ x.T`` forward and backward (the matmuls every loss needs; a random
  cotangent, so nothing is simplified away), as the yardstick: ``vs Gram`` is loss / Gram;
* pytorch-metric-learning's equivalent loss (+ miner) forward and backward on the same data, in
  the same run, where it is installed: ``PML / rankjax`` > 1 means rankjax is faster.

Times are medians of repeated runs after a warm-up (compilation excluded). Both frameworks get the
same number of threads (``--threads``, default 1: on a CPU shared with other jobs, torch's OpenMP
pool with more threads than free cores stalls for hundreds of ms per call, which would flatter
rankjax). With ``--memory`` it
also runs each loss at B = 4096, D = 512 in a fresh process and reports its peak resident memory
(``VmHWM``), the issue's bound being 1 GiB.

PML equivalents (same margins; PML reduces some losses differently, the work is the same kind):
contrastive: ``ContrastiveLoss`` on non-normalised L2 distances; triplet all: ``TripletMarginLoss``
over all triplets; hard: ``+ BatchHardMiner``; semi-hard: ``+ TripletMarginMiner("semihard")``;
npairs: ``NPairsLoss`` on dot products; angular: ``AngularLoss(alpha=45)``; npairs_angular: their
sum; lifted: ``LiftedStructureLoss`` (skipped past 60 s a call); multi-similarity:
``MultiSimilarityLoss + MultiSimilarityMiner``.

The later baselines (margin, SupCon, ArcFace, CosFace, sub-center ArcFace) get a table of their
own at ``--later-batch-sizes`` (default B = 512): value and gradient times beside
pytorch-metric-learning's ``MarginLoss + DistanceWeightedMiner``, ``SupConLoss``,
``ArcFaceLoss``, ``CosFaceLoss`` and ``SubCenterArcFaceLoss`` on the same embeddings (and, for the
proxy losses, the same proxies: PML's ``W`` is ``proxies.T``), and the relative difference of the
two values where the definitions agree. The margin loss samples its negatives, and PML's miner
draws with its own random generator, positives with replacement and a batch-wide normalisation, so
the two pipelines' values are not comparable; its value column compares PML's ``MarginLoss`` given
rankjax's sampled triplets (every positive pair with the negative rankjax drew for it) instead.

Cross-batch memory (``--xbm-size``, default M = 8192; skipped with ``--no-xbm``): at B = 512,
D = 128 (128 classes x 4, the memory holding 16 earlier such batches of 1024 classes), the time of
the loss alone and of the XBM loss ``L(batch) + L(batch, memory)`` with its enqueue, i.e. the
step's extra time, beside pytorch-metric-learning's ``loss(e, y) + CrossBatchMemory(loss)(e, y)``
on the same data and memory, and the two memory terms' values (equal where the definitions agree:
batch-all triplets and multi-similarity; PML's contrastive is not squared and averages the non-zero
terms, its semi-hard miner keeps every semi-hard triplet, its batch-hard loss averages the non-zero
anchors). Then each loss's XBM step at M = 65,536 in a fresh process, and its peak resident memory
(the bound being 2 GiB).

Run: ``python benchmarks/losses.py`` (B in 128, 512, 2048, the memory table, the later baselines
and the cross-batch memory tables by default; ``--xbm-only`` runs the cross-batch memory tables
alone).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

# Imported in main(), once the thread count is in XLA_FLAGS.
jax = jnp = losses = cross_batch = None

LOSSES = [
    ("contrastive", "contrastive", {}),
    ("triplet semihard", "triplet_semihard", {}),
    ("triplet hard", "triplet_hard", {}),
    ("triplet all", "triplet_all", {}),
    ("npairs", "npairs", {}),
    ("angular", "angular", {}),
    ("npairs_angular", "npairs_angular", {}),
    ("lifted_structure", "lifted_structure", {}),
    ("multi_similarity", "multi_similarity", {}),
]

# The later baselines' table: (label, config name); each call gets proxies or a key as it needs.
LATER_LOSSES = [
    ("margin + DWS", "margin"),
    ("supcon", "supcon"),
    ("arcface", "arcface"),
    ("cosface", "cosface"),
    ("subcenter_arcface", "subcenter_arcface"),
]
SUB_CENTERS = 3

PML_SKIP_AFTER_S = 60.0


def median_time(fn, *, min_runs=3, max_runs=15, budget_s=3.0):
  """Median wall time in seconds of ``fn()`` after one warm-up call."""
  fn()
  times = []
  start = time.perf_counter()
  while len(times) < min_runs or (len(times) < max_runs
                                  and time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def make_batch(batch, dim, per_class, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = np.repeat(np.arange(batch // per_class), per_class).astype(np.int32)
  return x, labels


def time_gram(x):
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0],) * 2), jnp.float32)

  @jax.jit
  def forward_backward(x, cotangent):
    gram, pullback = jax.vjp(lambda z: z @ z.T, x)
    return gram, pullback(cotangent)[0]

  return median_time(lambda: jax.block_until_ready(forward_backward(x, cotangent)))


def time_rankjax(name, options, x, labels):
  fn = jax.jit(jax.value_and_grad(losses.get_loss(name, **options)))
  return median_time(lambda: jax.block_until_ready(fn(x, labels)))


def pml_losses():
  """Name -> function (embeddings, labels) -> loss tensor, or {} without PML."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from pytorch_metric_learning import distances, miners  # pylint: disable=import-outside-toplevel
    from pytorch_metric_learning import losses as pml  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {}, None
  l2 = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
  dot = distances.DotProductSimilarity(normalize_embeddings=False)
  triplet = pml.TripletMarginLoss(margin=0.2, distance=l2)
  semihard = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=l2)
  hard = miners.BatchHardMiner(distance=l2)
  npairs = pml.NPairsLoss(distance=dot)
  angular = pml.AngularLoss(alpha=45)
  ms_loss = pml.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
  ms_miner = miners.MultiSimilarityMiner(epsilon=0.1)
  contrastive = pml.ContrastiveLoss(pos_margin=0, neg_margin=1, distance=l2)
  lifted = pml.LiftedStructureLoss(neg_margin=1, pos_margin=0, distance=l2)
  table = {
      "contrastive": contrastive,
      "triplet semihard": lambda e, y: triplet(e, y, semihard(e, y)),
      "triplet hard": lambda e, y: triplet(e, y, hard(e, y)),
      "triplet all": triplet,
      "npairs": npairs,
      "angular": angular,
      "npairs_angular": lambda e, y: npairs(e, y) + 2.0 * angular(e, y),
      "lifted_structure": lifted,
      "multi_similarity": lambda e, y: ms_loss(e, y, ms_miner(e, y)),
  }
  return table, torch


def time_pml(fn, torch, x, labels):
  embeddings = torch.from_numpy(x).requires_grad_(True)
  targets = torch.from_numpy(labels.astype(np.int64))

  def step():
    embeddings.grad = None
    fn(embeddings, targets).backward()

  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  return first if first > 5.0 else median_time(step)  # a very slow call is timed once


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from rankjax import losses
    name, per_class = sys.argv[1], int(sys.argv[2])
    batch, dim = 4096, 512
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, dim)) / np.sqrt(dim), jnp.float32)
    labels = jnp.arange(batch) // per_class
    classes, fn = batch // per_class, losses.get_loss(name)
    spec = losses.get_spec(name)
    if spec.learns_proxies:  # the proxies' gradient too
      shape = (classes, 3, dim) if name == "subcenter_arcface" else (classes, dim)
      params = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
      loss = lambda x, p: fn(x, labels, proxies=p)
    elif spec.takes_key:  # with a learned beta per class
      params = jnp.full((classes,), 1.2)
      loss = lambda x, p: fn(x, labels, key=jax.random.key(0), beta=p)
    else:
      params = jnp.zeros(())
      loss = lambda x, p: fn(x, labels) + 0.0 * p
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, params)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    # VmHWM: this process image's peak resident set. (ru_maxrss would not do: Linux carries it
    # over from the parent through fork and exec.)
    print([int(line.split()[1]) // 1024 for line in open("/proc/self/status")
           if line.startswith("VmHWM")][0])
""")


def memory_table(names):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  rows = [(label, name, 4) for label, name, _ in LOSSES]
  rows += [(label, name, 4) for label, name in LATER_LOSSES]
  rows += [("triplet semihard (16 classes)", "triplet_semihard", 256),
           ("triplet all (16 classes)", "triplet_all", 256)]
  rows = [row for row in rows if row[1] in names]
  print("\nPeak resident memory of jit(value_and_grad(loss)) at B = 4096, D = 512 (fresh process "
        "each, VmHWM; P x K = 1024 x 4 unless noted)")
  print(f"{'loss':32s} {'peak RSS MiB':>12s}")
  for label, name, per_class in rows:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, name, str(per_class)], env=env,
                         capture_output=True, text=True, check=True)
    print(f"{label:32s} {int(out.stdout.split()[-1]):12d}", flush=True)


# (label = the key in pml_xbm_losses, config name, whether the two memory terms are defined alike).
XBM_LOSSES = [
    ("contrastive", "contrastive", False),
    ("triplet semihard", "triplet_semihard", False),
    ("triplet hard", "triplet_hard", False),
    ("triplet all", "triplet_all", True),
    ("multi_similarity", "multi_similarity", True),
]
XBM_BATCH, XBM_DIM, XBM_PER_CLASS, XBM_CLASSES = 512, 128, 4, 1024


def xbm_data(size, seed=0):
  """A batch and a memory of ``size`` from earlier P x K batches, unit-norm float32."""
  rng = np.random.default_rng(seed)

  def unit(n):
    v = rng.normal(size=(n, XBM_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  def labels(n):
    rows = [rng.choice(XBM_CLASSES, XBM_BATCH // XBM_PER_CLASS, replace=False).repeat(
        XBM_PER_CLASS) for _ in range(-(-n // XBM_BATCH))]
    return np.concatenate(rows)[:n].astype(np.int32)
  return unit(XBM_BATCH), labels(XBM_BATCH), unit(size), labels(size)


def pml_xbm_losses(torch, size):
  """Name -> (loss, CrossBatchMemory of it) in pytorch-metric-learning, or {}."""
  from pytorch_metric_learning import distances, miners  # pylint: disable=import-outside-toplevel
  from pytorch_metric_learning import losses as pml  # pylint: disable=import-outside-toplevel
  del torch
  l2 = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
  def pair(loss, miner=None):
    return loss, pml.CrossBatchMemory(loss, XBM_DIM, memory_size=size, miner=miner)
  triplet = pml.TripletMarginLoss(margin=0.2, distance=l2)
  return {
      "contrastive": pair(pml.ContrastiveLoss(pos_margin=0, neg_margin=1, distance=l2)),
      "triplet semihard": pair(triplet, miners.TripletMarginMiner(
          margin=0.2, type_of_triplets="semihard", distance=l2)),
      "triplet hard": pair(triplet, miners.BatchHardMiner(distance=l2)),
      "triplet all": pair(triplet),
      "multi_similarity": pair(pml.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                               miners.MultiSimilarityMiner(epsilon=0.1)),
  }


def _pml_xbm_step(torch, loss, xbm, miner_for_batch, x, y, memory, memory_labels):
  """PML's loss(batch) + CrossBatchMemory(batch) from the given memory: (fn, memory term)."""
  embeddings = torch.from_numpy(x).requires_grad_(True)
  targets = torch.from_numpy(y.astype(np.int64))

  def reset():
    xbm.embedding_memory = torch.from_numpy(memory.copy())
    xbm.label_memory = torch.from_numpy(memory_labels.astype(np.int64))
    xbm.queue_idx, xbm.has_been_filled = 0, True

  def batch_loss():
    if miner_for_batch is None:
      return loss(embeddings, targets)
    return loss(embeddings, targets, miner_for_batch(embeddings, targets))

  def step():
    reset()
    embeddings.grad = None
    (batch_loss() + xbm(embeddings, targets)).backward()

  def batch_only():
    embeddings.grad = None
    batch_loss().backward()

  reset()
  term = float(xbm(embeddings, targets).detach())
  return step, batch_only, term


# PML's batch-all lists every (anchor, positive, negative) as three int64 indices; past this many
# it runs out of memory on the development machine.
PML_MAX_TRIPLETS = 20_000_000


def _triplet_count(labels, memory_labels):
  """Batch-all triplets of the batch against a memory that also holds the batch (self excluded)."""
  all_labels = np.concatenate([labels, memory_labels[len(labels):]])  # the batch overwrites
  same = (labels[:, None] == all_labels[None, :]).sum(1) - 1
  return int((same * (len(all_labels) - 1 - same)).sum())


def xbm_table(size, pml_available, torch, names):
  x, y, memory, memory_labels = xbm_data(size)
  print(f"\nCross-batch memory: value_and_grad times in ms at B = {XBM_BATCH}, D = {XBM_DIM}, "
        f"M = {size} ({XBM_PER_CLASS} per class); extra = (loss + memory term) - loss")
  header = (f"{'loss':18s} {'rankjax':>8s} {'+XBM':>8s} {'extra':>8s} {'xbm term':>10s}")
  if pml_available:
    header += (f" {'PML':>8s} {'PML+XBM':>9s} {'PML extra':>10s} {'PML term':>10s} "
               f"{'equal':>6s} {'extra PML/rankjax':>18s}")
  print(header)
  pml = pml_xbm_losses(torch, size) if pml_available else {}
  settings = cross_batch.MemorySettings(size, 0, 1.0)
  ours_memory = {"embeddings": jnp.asarray(memory), "labels": jnp.asarray(memory_labels),
                 "pointer": jnp.int32(0)}
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  for label, name, agree in XBM_LOSSES:
    if name not in names:
      continue
    loss_fn = losses.get_loss(name)
    alone = jax.jit(jax.value_and_grad(loss_fn))
    with_memory = jax.jit(jax.value_and_grad(
        lambda z, m, fn=loss_fn: cross_batch.loss_with_memory(fn, z, yj, m, 0, settings)[0]))
    term_fn = jax.jit(lambda z, m, fn=loss_fn: cross_batch.loss_with_memory(
        fn, z, yj, m, 0, settings)[2])
    base = median_time(lambda: jax.block_until_ready(alone(xj, yj)))
    total = median_time(lambda: jax.block_until_ready(with_memory(xj, ours_memory)))
    term = float(term_fn(xj, ours_memory))
    line = (f"{label:18s} {1e3 * base:8.2f} {1e3 * total:8.2f} {1e3 * (total - base):8.2f} "
            f"{term:10.5f}")
    triplets = _triplet_count(y, memory_labels)
    if pml and name == "triplet_all" and triplets > PML_MAX_TRIPLETS:
      line += f" {'skipped':>8s}  (PML would list {triplets / 1e6:.0f}M triplets)"
    elif pml:
      loss, xbm = pml[label]
      step, batch_only, theirs = _pml_xbm_step(torch, loss, xbm, xbm.miner, x, y, memory,
                                               memory_labels)
      pml_base, pml_total = median_time(batch_only), median_time(step)
      equal = abs(theirs - term) <= 1e-5 * max(abs(theirs), 1e-6)
      line += (f" {1e3 * pml_base:8.2f} {1e3 * pml_total:9.2f} {1e3 * (pml_total - pml_base):10.2f}"
               f" {theirs:10.5f} {('yes' if equal else 'no'):>6s}"
               f" {(pml_total - pml_base) / max(total - base, 1e-9):18.1f}")
      if agree and not equal:
        line += "  (expected equal)"
    print(line, flush=True)


XBM_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from rankjax import cross_batch, losses
    name, classes, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch, dim = 512, 128
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(size=(batch, dim), dtype=np.float32) / np.sqrt(dim))
    y = jnp.asarray(rng.permutation(classes)[:128].repeat(4), jnp.int32)
    memory = {"embeddings": jnp.asarray(rng.standard_normal(size=(size, dim), dtype=np.float32)),
              "labels": jnp.asarray(rng.integers(0, classes, size=size), jnp.int32),
              "pointer": jnp.int32(0)}
    settings = cross_batch.MemorySettings(size, 0, 1.0)
    loss_fn = losses.get_loss(name)

    def step(x, y, memory):
      def loss(x):
        value, memory_after, _ = cross_batch.loss_with_memory(loss_fn, x, y, memory, 0, settings)
        return value, memory_after
      return jax.value_and_grad(loss, has_aux=True)(x)

    compiled = jax.jit(step, donate_argnums=2).lower(x, y, memory).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes >> 20
    (value, memory), grad = compiled(x, y, memory)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    assert int(memory["pointer"]) == batch
    # VmHWM: this process image's peak resident set (after XLA's temporaries).
    print(temp, [int(line.split()[1]) // 1024 for line in open("/proc/self/status")
                 if line.startswith("VmHWM")][0])
""")


def xbm_memory_table(names, size=65536):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  print(f"\nPeak memory of the XBM step (loss + memory term, value and gradient, enqueue) at "
        f"M = {size}, B = 512, D = 128 (fresh process each; VmHWM, and XLA's temporaries)")
  print(f"{'loss':18s} {'memory classes':>15s} {'peak RSS MiB':>13s} {'XLA temp MiB':>13s}")
  for label, name, _ in XBM_LOSSES:
    if name not in names:
      continue
    for classes in (11318, 128):  # about 6 per class in the memory (SOP-like), or 512
      out = subprocess.run([sys.executable, "-c", XBM_MEMORY_SCRIPT, name, str(classes),
                            str(size)], env=env, capture_output=True, text=True, check=True)
      temp, peak = out.stdout.split()[-2:]
      print(f"{label:18s} {classes:15d} {int(peak):13d} {int(temp):13d}", flush=True)


def later_losses_table(batch_sizes, dim, per_class, use_pml, names):
  """Times (and values) of the later baselines beside pytorch-metric-learning's."""
  try:
    if not use_pml:
      raise ImportError
    import torch  # pylint: disable=import-outside-toplevel
    from pytorch_metric_learning import miners  # pylint: disable=import-outside-toplevel
    from pytorch_metric_learning import losses as pml  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
  print(f"\nLater baselines: value_and_grad times in ms (embeddings and proxies), D = {dim}, "
        f"{per_class} per class; |diff| = |rankjax - PML| / |PML| of the values")
  print(f"{'B':>5s} {'loss':18s} {'rankjax':>9s} {'value':>10s}" + (
      f" {'PML':>10s} {'PML/rankjax':>12s} {'|diff|':>9s}" if torch else ""))
  for batch in batch_sizes:
    x_np, labels_np = make_batch(batch, dim, per_class)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
    classes = batch // per_class
    rng = np.random.default_rng(2)
    proxies_np = rng.normal(size=(classes, dim)).astype(np.float32)
    sub_np = rng.normal(size=(classes, SUB_CENTERS, dim)).astype(np.float32)
    key = jax.random.key(0)
    for label, name in LATER_LOSSES:
      if name not in names:
        continue
      fn = losses.get_loss(name)
      if name == "margin":
        ours = jax.jit(jax.value_and_grad(lambda x, k: fn(x, labels, key=k)))
        args = (x, key)
      elif name == "supcon":
        ours = jax.jit(jax.value_and_grad(lambda x, _: fn(x, labels)))
        args = (x, None)
      else:
        p = jnp.asarray(sub_np if name == "subcenter_arcface" else proxies_np)
        ours = jax.jit(jax.value_and_grad(lambda x, p: fn(x, labels, proxies=p), argnums=(0, 1)))
        args = (x, p)
      value = float(ours(*args)[0])
      run = functools.partial(ours, *args)
      seconds = median_time(lambda: jax.block_until_ready(run()))  # pylint: disable=cell-var-from-loop
      line = f"{batch:5d} {label:18s} {1e3 * seconds:9.2f} {value:10.5f}"
      if torch:
        theirs, theirs_value = _pml_later(name, torch, pml, miners, x_np, labels_np, proxies_np,
                                          sub_np, key)
        line += (f" {1e3 * theirs:10.2f} {theirs / seconds:12.1f} "
                 f"{abs(value - theirs_value) / abs(theirs_value):9.1e}")
      print(line, flush=True)


def _pml_later(name, torch, pml, miners, x_np, labels_np, proxies_np, sub_np, key):
  """(PML's forward + backward time, PML's value comparable with rankjax's) for one loss."""
  embeddings = torch.from_numpy(x_np).requires_grad_(True)
  targets = torch.from_numpy(labels_np.astype(np.int64))
  classes, dim = proxies_np.shape
  comparable, miner = None, None
  if name == "margin":
    loss_fn = pml.MarginLoss(margin=0.2, beta=1.2, nu=0.0)
    miner = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    # The value: PML's MarginLoss on the triplets rankjax sampled (one per positive pair).
    probabilities = losses.negative_sampling_probabilities(jnp.asarray(x_np), labels_np)
    drawn = np.asarray(losses.sample_negatives(key, probabilities, len(labels_np)))
    has_negative = np.asarray(probabilities).sum(axis=1) > 0
    anchors, positives = np.nonzero((labels_np[:, None] == labels_np[None, :])
                                    & ~np.eye(len(labels_np), dtype=bool)
                                    & has_negative[:, None])
    triplets = tuple(torch.from_numpy(t.astype(np.int64))
                     for t in (anchors, positives, drawn[anchors, positives]))
    comparable = loss_fn(embeddings, targets, triplets).item()
  elif name == "supcon":
    loss_fn = pml.SupConLoss(temperature=0.1)
  else:
    if name == "arcface":
      loss_fn = pml.ArcFaceLoss(num_classes=classes, embedding_size=dim, margin=28.6, scale=64)
      weights = proxies_np.T
    elif name == "cosface":
      loss_fn = pml.CosFaceLoss(num_classes=classes, embedding_size=dim, margin=0.35, scale=64)
      weights = proxies_np.T
    else:
      loss_fn = pml.SubCenterArcFaceLoss(num_classes=classes, embedding_size=dim, margin=28.6,
                                         scale=64, sub_centers=SUB_CENTERS)
      weights = sub_np.reshape(classes * SUB_CENTERS, dim).T  # column c * K + k
    loss_fn.W.data = torch.from_numpy(np.ascontiguousarray(weights))

  def step():
    embeddings.grad = None
    loss_fn.zero_grad()
    mined = () if miner is None else (miner(embeddings, targets),)
    out = loss_fn(embeddings, targets, *mined)
    out.backward()
    return out.item()

  value = step()
  return median_time(step), (value if comparable is None else comparable)


def _import_jax(threads):
  global jax, jnp, losses, cross_batch  # pylint: disable=global-statement
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false"
  os.environ["XLA_FLAGS"] = f"{flags} intra_op_parallelism_threads={threads}".strip()
  import jax  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel,redefined-outer-name
  from rankjax import losses  # pylint: disable=import-outside-toplevel,redefined-outer-name
  from rankjax import cross_batch  # pylint: disable=import-outside-toplevel,redefined-outer-name


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-sizes", type=int, nargs="*", default=[128, 512, 2048])
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--per-class", type=int, default=4)
  parser.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning")
  parser.add_argument("--no-memory", action="store_true", help="skip the B = 4096 memory table")
  parser.add_argument("--threads", type=int, default=1, help="threads for XLA and torch alike")
  parser.add_argument("--losses", nargs="+",
                      default=[name for _, name, _ in LOSSES] + [name for _, name in LATER_LOSSES],
                      help="config names of the losses to run (default: all)")
  parser.add_argument("--no-xbm", action="store_true", help="skip the cross-batch memory tables")
  parser.add_argument("--xbm-only", action="store_true",
                      help="only the cross-batch memory tables (timing, and memory at M = 65,536)")
  parser.add_argument("--xbm-size", type=int, default=8192, help="memory size of the XBM timing")
  parser.add_argument("--later-batch-sizes", type=int, nargs="*", default=[512],
                      help="batch sizes of the later baselines' table (none: skip it)")
  args = parser.parse_args()
  _import_jax(args.threads)

  pml, torch = ({}, None) if args.no_pml else pml_losses()
  if torch:
    torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} with {args.threads} thread(s) "
        f"({os.cpu_count()} CPUs)" + (f"; torch {torch.__version__} with "
                                      f"{torch.get_num_threads()} thread(s)" if torch else
                                      "; pytorch-metric-learning: " + (
                                          "skipped" if args.no_pml else "not installed")))
  if not args.xbm_only:
    loss_tables(args, pml, torch)
  if not args.no_xbm:
    xbm_table(args.xbm_size, bool(pml), torch, args.losses)
    if not args.no_memory:
      xbm_memory_table(args.losses)


def loss_tables(args, pml, torch):
  """The times at each batch size beside PML, and the memory at B = 4096."""
  print(f"value_and_grad times in ms, D = {args.dim}, {args.per_class} samples per class; "
        "vs Gram = loss / (x @ x.T forward + backward); PML / rankjax > 1: rankjax faster")
  header = f"{'B':>5s} {'loss':18s} {'rankjax':>9s} {'Gram':>8s} {'vs Gram':>8s}"
  header += f" {'PML':>10s} {'PML/rankjax':>12s}" if pml else ""
  print(header)
  pml_too_slow = set()
  for batch in args.batch_sizes:
    x_np, labels_np = make_batch(batch, args.dim, args.per_class)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
    gram = time_gram(x)
    for label, name, options in LOSSES:
      if name not in args.losses:
        continue
      ours = time_rankjax(name, options, x, labels)
      line = f"{batch:5d} {label:18s} {1e3 * ours:9.2f} {1e3 * gram:8.2f} {ours / gram:8.2f}"
      if pml:
        if label in pml_too_slow:
          line += f" {'skipped':>10s} {'(>60 s)':>12s}"
        else:
          theirs = time_pml(pml[label], torch, x_np, labels_np)
          line += f" {1e3 * theirs:10.2f} {theirs / ours:12.1f}"
          if theirs > PML_SKIP_AFTER_S / 4:  # the next size is at least 4x the work
            pml_too_slow.add(label)
      print(line, flush=True)
  if args.later_batch_sizes:
    later_losses_table(args.later_batch_sizes, args.dim, args.per_class, use_pml=not args.no_pml,
                       names=args.losses)
  if not args.no_memory:
    memory_table(args.losses)


if __name__ == "__main__":
  main()
