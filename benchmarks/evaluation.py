r"""Speed and memory of rankjax.evaluation.retrieval_metrics beside faiss-cpu exact search.

Stanford Online Products scale: N = 60,502 queries that are also the gallery (and N = 13,180, the
Omniglot evaluation split), D = 512 and 128, Recall@K for K = 1, 10, 100, 1000. The data are
synthetic clusters with SOP-like class sizes (2 to 12 images, about 5.3 per class), L2-normalised,
so cosine ranking equals faiss's inner product.

For each size, in the same run and each in a fresh process (so that peak memory is its own), the
two alternating ``--repeats`` times (rankjax, faiss, rankjax, faiss, ...) so that a change of load
on a shared machine falls on both, the best of the repeats reported with the load average before
the first:

* rankjax: ``retrieval.query_results(x, labels, max_k=1000).metrics(ks)``, which is what
  ``retrieval_metrics(x, labels, ks=ks)`` does, keeping the per-query ranks for the check: the
  first call (with its compilation) and a second, warm call;
* faiss: ``IndexFlatIP`` exact search of every vector with k = 1001 (the query itself comes back
  first; it is dropped by index), with ``faiss.omp_set_num_threads(--faiss_threads)``, then
  Recall@K from the returned lists.

faiss-cpu's wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15), which does not know
recent Intel cores: on a CPU with AVX-512 and AMX it falls back to its "Prescott" kernels (SSE3)
and the search runs 2-3x slower than it can. ``--faiss_openblas_coretype=auto`` (the default)
names the newest kernel family the CPU's flags support (``SkylakeX`` with AVX-512, ``Haswell``
with AVX2) in ``OPENBLAS_CORETYPE`` for the faiss process only; ``none`` leaves OpenBLAS to
detect the CPU itself. The kernel faiss's OpenBLAS ran is printed with the table
(``threadpoolctl``).

Peak memory is the largest resident set size during the call minus the resident size just before
it (the embeddings are already loaded), sampled every 5 ms; for faiss, during index building and
search (its [N, k] result lists included; Recall@K is computed from them afterwards, untimed). The
check compares the rank of each query's first same-label neighbour (when within the top 1000)
between the two, query by query.

Run (faiss-cpu is an optional benchmark dependency: ``pip install -e ".[benchmarks]"``)::

  python benchmarks/evaluation.py                        # the full table
  python benchmarks/evaluation.py --sizes=13180 --dims=128   # one row
"""

import json
import multiprocessing as mp
import os
import threading
import time

from absl import app
from absl import flags
import numpy as np

_SIZES = flags.DEFINE_list("sizes", ["60502", "13180"], "Numbers of embeddings.")
_DIMS = flags.DEFINE_list("dims", ["512", "128"], "Embedding widths.")
_KS = flags.DEFINE_list("ks", ["1", "10", "100", "1000"], "The K of Recall@K.")
_FAISS_THREADS = flags.DEFINE_integer("faiss_threads", 2, "OpenMP threads of faiss.")
_CORETYPE = flags.DEFINE_string(
    "faiss_openblas_coretype", "auto",
    "OPENBLAS_CORETYPE of the faiss process: 'auto' (from the CPU's flags), 'none' (OpenBLAS "
    "detects the CPU), or a core name such as SkylakeX.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Fresh processes of each, alternating; best kept.")


def sop_like(n: int, dim: int, seed: int):
  """Normalised clustered embeddings with class sizes drawn like Stanford Online Products'."""
  rng = np.random.default_rng(seed)
  sizes = []
  while sum(sizes) < n:
    sizes.append(int(np.clip(2 + rng.poisson(3.35), 2, 12)))
  sizes[-1] -= sum(sizes) - n
  if sizes[-1] < 2:  # Fold a leftover singleton into the previous class.
    sizes[-2] += sizes.pop()
  labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
  # Within-class spread chosen so that Recall@1 is about 0.6-0.8, as trained SOP models reach.
  noise = {512: 2.1, 128: 1.45}.get(dim, 1.7)
  centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
  x = centres[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels


class PeakMemory:
  """Samples this process's resident set size every 5 ms between __enter__ and __exit__."""

  def __enter__(self):
    self.start = self.peak = _rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def _poll(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())

  @property
  def extra_gib(self) -> float:
    return (self.peak - self.start) / 2**30


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def first_hits_from_neighbours(neighbours: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Rank of each query's first same-label item among its k nearest (k where there is none)."""
  n = len(labels)
  is_self = neighbours == np.arange(n)[:, None]
  # Drop the query itself (or, where it is not in the list, the last item).
  keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
  neighbours = np.take_along_axis(neighbours, keep, axis=1)
  relevant = labels[neighbours] == labels[:, None]
  return np.where(relevant.any(axis=1), relevant.argmax(axis=1), k)


def run_rankjax(path: str, ks, out):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from rankjax.evaluation import retrieval  # pylint: disable=g-import-not-at-top
  data = np.load(path)
  x, labels = data["x"], data["labels"]
  timings = []
  for _ in range(2):
    with PeakMemory() as memory:
      start = time.perf_counter()
      results = retrieval.query_results(x, labels, distance="cosine", max_k=max(ks))
      metrics = results.metrics(ks)
      timings.append((time.perf_counter() - start, memory))
  out.put(json.dumps({
      "cold_s": timings[0][0], "warm_s": timings[1][0],
      "cold_gib": timings[0][1].extra_gib, "warm_gib": timings[1][1].extra_gib,
      "metrics": metrics, "first_hit": np.minimum(results.first_hit, max(ks)).tolist()}))


def openblas_coretype(setting: str) -> str | None:
  """The ``OPENBLAS_CORETYPE`` for ``--faiss_openblas_coretype`` (None: leave it unset)."""
  if setting == "none":
    return None
  if setting != "auto":
    return setting
  try:
    with open("/proc/cpuinfo") as f:
      flags_line = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return None
  cpu_flags = set(flags_line.split())
  if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags:
    return "SkylakeX"
  if "avx2" in cpu_flags:
    return "Haswell"
  return None


def run_faiss(path: str, ks, threads: int, coretype: str | None, out):
  if coretype:
    os.environ["OPENBLAS_CORETYPE"] = coretype  # Read when faiss loads its OpenBLAS.
  import faiss  # pylint: disable=g-import-not-at-top
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(threads)
  kernels = sorted({lib.get("architecture", "?") for lib in threadpoolctl.threadpool_info()
                    if lib.get("internal_api") == "openblas" and "faiss" in lib["filepath"]})
  data = np.load(path)
  x, labels = data["x"], data["labels"]
  k = max(ks)
  with PeakMemory() as memory:  # The search itself; Recall@K from its lists is counted after.
    start = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, neighbours = index.search(x, k + 1)
    seconds = time.perf_counter() - start
  first_hit = first_hits_from_neighbours(neighbours, labels, k)
  metrics = {f"recall@{kk}": int(np.sum(first_hit < kk)) / len(labels) for kk in ks}
  out.put(json.dumps({"s": seconds, "gib": memory.extra_gib, "metrics": metrics,
                      "first_hit": first_hit.tolist(), "kernels": kernels}))


def _in_child(target, *args):
  context = mp.get_context("spawn")
  out = context.Queue()
  process = context.Process(target=target, args=(*args, out))
  process.start()
  result = json.loads(out.get())
  process.join()
  return result


def main(argv):
  del argv
  ks = tuple(int(k) for k in _KS.value)
  coretype = openblas_coretype(_CORETYPE.value)
  import jax  # pylint: disable=g-import-not-at-top
  print(f"# rankjax retrieval_metrics vs faiss IndexFlatIP (k = {max(ks) + 1}), "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"faiss threads = {_FAISS_THREADS.value}, best of {_REPEATS.value} fresh processes each, "
        f"OPENBLAS_CORETYPE for faiss = {coretype or '(unset)'}")
  header = ("|      N |   D | rankjax s (cold / warm) | faiss s | faiss / rankjax (warm) | "
            "rankjax GiB | faiss GiB | R@1 R@10 R@100 R@1000 (rankjax) | same Recall@K | "
            "queries whose first hit differs | load before |")
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  kernels = set()
  for n in map(int, _SIZES.value):
    for dim in map(int, _DIMS.value):
      x, labels = sop_like(n, dim, _SEED.value)
      path = f"/tmp/rankjax_bench_{n}_{dim}_{os.getpid()}.npz"
      np.savez(path, x=x, labels=labels)
      load = os.getloadavg()[0]
      runs = [(_in_child(run_rankjax, path, ks),
               _in_child(run_faiss, path, ks, _FAISS_THREADS.value, coretype))
              for _ in range(_REPEATS.value)]
      ours = min((r[0] for r in runs), key=lambda r: r["warm_s"])
      theirs = min((r[1] for r in runs), key=lambda r: r["s"])
      ours["cold_s"] = min(r[0]["cold_s"] for r in runs)
      os.remove(path)
      same = all(ours["metrics"][f"recall@{k}"] == theirs["metrics"][f"recall@{k}"] for k in ks)
      differ = int(np.sum(np.array(ours["first_hit"]) != np.array(theirs["first_hit"])))
      recalls = " ".join(f"{ours['metrics'][f'recall@{k}']:.4f}" for k in ks)
      print(f"| {n:6d} | {dim:3d} | {ours['cold_s']:8.1f} / {ours['warm_s']:6.1f}      "
            f"| {theirs['s']:7.1f} | {theirs['s'] / ours['warm_s']:22.2f} "
            f"| {max(ours['cold_gib'], ours['warm_gib']):11.2f} | {theirs['gib']:9.2f} "
            f"| {recalls:32s} | {'yes' if same else 'NO':13s} | {differ:31d} | {load:11.1f} |",
            flush=True)
      kernels.update(k for r in runs for k in r[1]["kernels"])
  print(f"faiss's OpenBLAS ran its {', '.join(sorted(kernels)) or 'unknown'} kernels.")


if __name__ == "__main__":
  app.run(main)
