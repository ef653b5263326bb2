"""Tests of the experiment scripts: compare_losses.py and stability.py, end to end on digits.

The end-to-end tests run the real scripts as a user does (a subprocess, one CPU device, tiny
``runlocal`` configs), then check their files against numbers recomputed here from each run's own
metrics.json, and that a second invocation reuses the finished runs instead of training again.
"""

import csv
import glob
import json
import os
import shlex
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import compare_losses  # noqa: E402
from experiments import omniglot_probes  # noqa: E402
from experiments import stability  # noqa: E402
from experiments import sweep  # noqa: E402


# --- Unit tests of the shared machinery -------------------------------------------------------


def test_mean_and_std_is_sample_std():
  mean, std = sweep.mean_and_std([0.5, 0.7, 0.9])
  assert mean == pytest.approx(0.7)
  assert std == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
  assert sweep.mean_and_std([0.3]) == (0.3, 0.0)


def test_command_line_pastes_back_as_the_same_arguments(monkeypatch):
  argv = [os.path.join(sweep.REPO_ROOT, "experiments", "embedding_norms.py"), "--loss=npairs",
          "--sweeps=L2 0.002=out/with_l2,no L2=out/without_l2", "--baselines="]
  monkeypatch.setattr(sys, "argv", argv)
  command = sweep.command_line()
  assert command.startswith("python experiments/embedding_norms.py ")
  assert shlex.split(command) == ["python", "experiments/embedding_norms.py", *argv[1:]]


def test_cpu_description_names_the_model_and_the_widest_vector_extension(monkeypatch):
  monkeypatch.setattr(sweep.platform, "processor", lambda: "x86_64")
  info = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f\n\n"
          "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f\n")
  assert sweep.cpu_description(info) == "x86_64, AMD EPYC, AVX-512"
  assert sweep.cpu_description("model name : Xeon\nflags : sse2 avx avx2\n") == "x86_64, Xeon, AVX2"
  assert sweep.cpu_description("") == "x86_64"


def test_describe_run_machines_counts_each_runs_own_machine(tmp_path):
  def run(name, info):
    workdir = tmp_path / name
    workdir.mkdir()
    if info is not None:
      (workdir / sweep.RUN_INFO_FILE).write_text(json.dumps({"wall_s": 1.0, **info}))
    return str(workdir)

  amd = {"cpu_count": 2, "processor": "x86_64, AMD EPYC, AVX-512", "device": "cpu: cpu x 1"}
  runs = [run("a", amd), run("b", {"cpu_count": 2, "processor": "x86_64"}), run("c", amd),
          run("d", None)]
  assert sweep.describe_run_machines(runs) == (
      "2 CPU cores (x86_64, AMD EPYC, AVX-512), cpu: cpu x 1: 2 runs; "
      "2 CPU cores (x86_64): 1 run; machine not recorded: 1 run")


def test_chance_recall_at_1_by_hand():
  # Class 0 (2 items): 1 other of 4 -> 1/4; class 1 (3 items): 2 of 4 -> 1/2. Mean over 5 queries.
  assert sweep.chance_recall_at_1(np.array([0, 0, 1, 1, 1])) == pytest.approx(
      (2 * 0.25 + 3 * 0.5) / 5)


def test_mean_cosine_distance_against_brute_force():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 7))
  x[3] = 0.0  # A zero vector: cosine 0 with everything.
  norms = np.linalg.norm(x, axis=1)
  expected = []
  for i in range(50):
    for j in range(50):
      if i != j:
        cos = 0.0 if norms[i] == 0 or norms[j] == 0 else x[i] @ x[j] / (norms[i] * norms[j])
        expected.append(1.0 - cos)
  assert stability.mean_cosine_distance(x) == pytest.approx(np.mean(expected), abs=1e-12)
  # All pointing one way, at any scale: collapsed.
  same = np.outer(rng.uniform(0.1, 100, size=20), rng.normal(size=7))
  assert stability.mean_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)


def test_classify_reasons():
  rng = np.random.default_rng(1)
  spread = rng.normal(size=(40, 8))
  untrained = rng.normal(size=(40, 8)) + 5.0  # A common direction: a small spread (~0.02).
  thresholds = dict(collapse_ratio=0.1, chance_factor=2.0)

  def measured(embeddings, recall_at_1=0.9, final_loss=0.1):
    return stability.measurements_of(
        final_loss=final_loss, embeddings=embeddings, recall_at_1=recall_at_1, chance=0.2,
        initial_embeddings=untrained, initial_recall_at_1=0.7)

  initial_spread = stability.mean_cosine_distance(untrained)
  assert 0.01 < initial_spread < 0.05
  ok = stability.classify(measured(spread), **thresholds)
  assert ok == {"degenerate": False, "reason": ""}
  # Far tighter than the untrained network: collapsed, whatever Recall@1 says (ties inflate it).
  tight = np.ones((40, 8)) + 0.03 * rng.normal(size=(40, 8))
  assert stability.mean_cosine_distance(tight) < 0.1 * initial_spread
  assert stability.classify(measured(tight), **thresholds) == {"degenerate": True,
                                                              "reason": "collapsed"}
  assert not stability.classify(measured(tight), collapse_ratio=0.01,
                                chance_factor=2.0)["degenerate"]
  assert stability.classify(measured(spread, recall_at_1=0.39), **thresholds)["reason"] == (
      "at chance")
  assert stability.classify(measured(tight, recall_at_1=0.1), **thresholds)["reason"] == (
      "collapsed+at chance")
  bad = spread.copy()
  bad[0, 0] = np.nan
  assert stability.classify(measured(bad), **thresholds)["reason"] == "non-finite"
  assert stability.classify(measured(spread, final_loss=np.inf), **thresholds)["reason"] == (
      "non-finite")


def test_batch_layout():
  layout = lambda b, loss, k=4, c=964: stability.batch_layout(
      b, loss=loss, samples_per_class=k, train_classes=c)
  assert layout(128, "triplet_hard") == (32, 4)
  assert layout(128, "npairs") == (64, 2)
  assert layout(40, "triplet_semihard", k=8, c=5) == (5, 8)
  assert layout(80, "triplet_semihard", k=8, c=5) == (5, 16)  # P capped at the class count.
  assert layout(20, "npairs", c=5) is None  # N-pairs: batch bounded by 2 x classes.
  assert layout(30, "triplet_all") is None  # 30 is not P x 4.


def test_config_overrides_and_errors():
  config = compare_losses.build_config("digits", "npairs", 3, steps=12, eval_every=0,
                                       overrides=["optimizer.learning_rate=3e-4"])
  assert (config.seed, config.train.steps, config.eval.every) == (3, 12, 0)
  assert config.optimizer.learning_rate == pytest.approx(3e-4)
  assert config.samples_per_class == 2
  with pytest.raises(ValueError, match="optimizer.learnig_rate"):
    sweep.apply_overrides(config, ["optimizer.learnig_rate=1"])
  with pytest.raises(ValueError, match="no config file"):
    sweep.load_config("mnist", "npairs")
  with pytest.raises(ValueError, match="unknown loss"):
    compare_losses.build_config("digits", "triplet", 0)


def test_a_finished_run_is_only_reused_for_the_same_config(tmp_path):
  config = compare_losses.build_config("digits", "contrastive", 0, steps=7)
  workdir = str(tmp_path)
  with open(os.path.join(workdir, sweep.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(workdir, sweep.METRICS_FILE), "w") as f:
    json.dump({"recall@1": 0.5}, f)
  calls = []
  result = sweep.run_or_reuse(config, workdir, train_fn=lambda *a: calls.append(a))
  assert result.reused and result.metrics == {"recall@1": 0.5} and not calls
  other = compare_losses.build_config("digits", "contrastive", 0, steps=8)
  with pytest.raises(ValueError, match="train.steps: 7 in the run, 8 requested"):
    sweep.run_or_reuse(other, workdir, train_fn=lambda *a: calls.append(a))


def test_finished_only_tabulates_the_finished_runs_and_trains_nothing(tmp_path):
  out = str(tmp_path)
  recall = {("contrastive", 0): 0.5, ("contrastive", 1): 0.7, ("npairs", 0): 0.65}

  def fake_train(config, workdir):  # What train_and_evaluate leaves in a finished run.
    metrics = {"recall@1": recall[(config.loss.name, config.seed)], "map@r": 0.1}
    with open(os.path.join(workdir, sweep.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, sweep.METRICS_FILE), "w") as f:
      json.dump(metrics, f)
    return metrics

  for loss, seed in recall:
    config = compare_losses.build_config("digits", loss, seed, steps=7)
    workdir = os.path.join(out, "runs", loss, f"seed{seed}")
    os.makedirs(workdir)
    sweep.run_or_reuse(config, workdir, train_fn=fake_train)
  calls, lines = [], []
  results = compare_losses.run_sweep(
      "digits", ["contrastive", "npairs", "angular"], [0, 1], out, steps=7,
      train_fn=lambda *a: calls.append(a), finished_only=True,
      log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert not calls  # Nothing trained,
  assert {loss: len(runs) for loss, runs in results.items()} == {"contrastive": 2, "npairs": 1}
  assert sum("not finished: left out" in line for line in lines) == 3  # npairs 1, angular 0, 1.
  summary = compare_losses.summarise(results)
  assert summary["contrastive"]["recall@1"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
  config = compare_losses.build_config("digits", "contrastive", 0, steps=7)
  table = compare_losses.write_tables(
      results, summary, out, dataset="digits", config=config, command="cmd", chance=None,
      batches={"contrastive": "8 x 4", "npairs": "16 x 2"}, finished_only=True)
  assert table.splitlines()[0].startswith("| loss | batch P x K | seeds | R@1 |")
  with open(os.path.join(out, "results.md")) as f:
    page = f.read()
  assert "`--finished_only` trained nothing" in page
  here = sweep.machine_info()
  assert (f"Runs trained on {here['cpu_count']} CPU cores ({here['processor']}), "
          f"{here['device']}: 3 runs. This page was written on") in page
  assert "over the seeds of each row (seeds column); a seed sets" in page
  assert "| contrastive | 8 x 4 | 2 | 0.600 ± 0.141 |" in table
  assert "| N-pairs | 16 x 2 | 1 | **0.650** |" in table
  # A run made with another protocol is still refused, not silently left out.
  with pytest.raises(ValueError, match="train.steps: 7 in the run, 8 requested"):
    compare_losses.run_sweep("digits", ["contrastive"], [0], out, steps=8, finished_only=True,
                             log=lambda *a, **k: 0)


# --- End to end --------------------------------------------------------------------------------


def _run(script, *args, cache):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # One CPU device, as a user's laptop: the N-pair batch of 10 is legal.
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", script), *args,
       f"--compilation_cache={cache}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_compare_losses_end_to_end_and_resume(tmp_path, cache):
  out = str(tmp_path / "digits")
  args = ["--losses=triplet_semihard,npairs", "--seeds=0,1", "--config_flags=runlocal",
          f"--output_dir={out}", "--eval_every=2", "--set=protocol.val_fraction=0.4",
          "--set=classes_per_batch=3"]
  stdout = _run("compare_losses.py", *args, cache=cache)
  assert stdout.count("trained in") == 4, stdout
  for name in ("results.md", "results.csv", "runs.csv", "recall_at_k.png",
               "training_curves.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name

  # The table is the mean and sample std of the runs' own metrics.json.
  rows = {r["loss"]: r for r in _csv(os.path.join(out, "results.csv"))}
  assert set(rows) == {"triplet_semihard", "npairs"}
  for loss, row in rows.items():
    runs = [json.load(open(os.path.join(out, "runs", loss, f"seed{s}", "metrics.json")))
            for s in (0, 1)]
    for key in ("recall@1", "recall@8", "map@r", "nmi"):
      values = np.array([r[key] for r in runs])
      assert float(row[f"{key}_mean"]) == pytest.approx(values.mean(), abs=1e-6)
      assert float(row[f"{key}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-6)
  md = open(os.path.join(out, "results.md")).read()
  assert "compare_losses.py --losses=triplet_semihard,npairs" in md  # The command.
  best = max(rows.values(), key=lambda r: float(r["recall@1_mean"]))
  assert f"**{float(best['recall@1_mean']):.3f} ± {float(best['recall@1_std']):.3f}**" in md
  # Training curves come from the TensorBoard scalars: validation R@1 at steps 0, 2 and 4
  # (runlocal: 4 steps; step 0 is where training starts and chooses nothing); the test split once,
  # at the end, as metrics.json reports it.
  scalars = sweep.read_scalars(os.path.join(out, "runs", "npairs", "seed0"))
  steps, values = scalars["val/recall@1"]
  assert steps.tolist() == [0, 2, 4]
  report = json.load(open(os.path.join(out, "runs", "npairs", "seed0", "metrics.json")))
  assert report["val/recall@1"] == pytest.approx(values[1:].max())
  assert report["step0/val/recall@1"] == pytest.approx(values[0])
  steps, values = scalars["test/recall@1"]
  assert steps.tolist() == [4] and values[0] == pytest.approx(report["recall@1"])

  # Second invocation: nothing is trained again, the results are rewritten from the same runs.
  metrics_files = sorted(glob.glob(os.path.join(out, "runs", "*", "*", "metrics.json")))
  events = sorted(glob.glob(os.path.join(out, "runs", "*", "*", "tensorboard", "*")))
  mtimes = [os.path.getmtime(p) for p in metrics_files]
  before = open(os.path.join(out, "results.csv")).read()
  stdout = _run("compare_losses.py", *args, cache=cache)
  assert stdout.count("reused finished run") == 4 and "trained in" not in stdout, stdout
  assert [os.path.getmtime(p) for p in metrics_files] == mtimes
  assert sorted(glob.glob(os.path.join(out, "runs", "*", "*", "tensorboard", "*"))) == events
  assert open(os.path.join(out, "results.csv")).read() == before


def _image_folder(root, *, images_per_class: int) -> None:
  """20 class folders of random 20 x 20 images: 10 train classes (2 of them validate), 10 test."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c in range(20):
    os.makedirs(root / f"c{c:02d}")
    for i in range(images_per_class):
      Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
          root / f"c{c:02d}" / f"{i}.png")


def _diverging_train(calls):
  """A train_fn that records ``(config, workdir)``, leaves the run's config and then diverges."""
  def train(config, workdir):
    calls.append((config, workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, sweep.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    raise ValueError("embeddings contain NaN values")
  return train


def test_compare_losses_puts_the_untrained_baselines_in_the_table(tmp_path):
  _image_folder(tmp_path / "root", images_per_class=6)
  flags = "runlocal"
  assert compare_losses.available_baselines("folder", config_flags=flags) == list(
      sweep.BASELINE_LABELS)
  assert compare_losses.available_baselines("digits") == []  # Its config has no such flags.
  with pytest.raises(ValueError, match="--baselines: unknown 'imagenet'"):
    compare_losses.build_baseline_config("folder", "imagenet", 0)
  out = str(tmp_path / "out")
  overrides = [f"dataset=folder:{tmp_path / 'root'}", f"data_dir={tmp_path / 'tfds'}"]
  baselines = list(sweep.BASELINE_LABELS)
  results = compare_losses.run_sweep("folder", ["npairs"], [0], out, config_flags=flags,
                                     overrides=overrides, baselines=baselines,
                                     log=lambda *a, **k: 0)
  assert list(results) == baselines + ["npairs"]
  for name in baselines:
    report = json.load(open(os.path.join(out, "runs", name, "seed0", "metrics.json")))
    assert report["checkpoint_step"] == 0 and "val/recall@1" not in report
  trained = json.load(open(os.path.join(out, "runs", "npairs", "seed0", "metrics.json")))
  assert trained["checkpoint_step"] > 0
  config = compare_losses.build_config("folder", "npairs", 0, config_flags=flags,
                                       overrides=overrides)
  summary = compare_losses.summarise(results)
  table = compare_losses.write_tables(
      results, summary, out, dataset="folder", config=config, command="cmd", chance=None,
      batches={"npairs": "4 x 2", **{b: "untrained" for b in baselines}}, config_flags=flags)
  for label in sweep.BASELINE_LABELS.values():
    assert f"| {label} | untrained |" in table
  assert {r["loss"] for r in _csv(os.path.join(out, "results.csv"))} == set(results)
  compare_losses.write_plots(results, summary, out, dataset="folder", config=config, chance=None)
  assert os.path.getsize(os.path.join(out, "training_curves.png")) > 0


def test_stability_end_to_end(tmp_path, cache):
  out = str(tmp_path / "stability")
  args = ["--losses=triplet_hard,npairs", "--learning_rates=0.5", "--batch_sizes=10,20",
          "--config_flags=runlocal", f"--output_dir={out}"]
  _run("stability.py", *args, cache=cache)
  for name in ("stability.md", "stability.csv", "degenerate_fraction.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  rows = _csv(os.path.join(out, "stability.csv"))
  assert len(rows) == 2 * 1 * 2
  # 20 images as N-pairs would need 10 classes; digits trains on 5: not possible.
  na = [r for r in rows if r["reason"].startswith("n/a")]
  assert {(r["loss"], r["batch_size"]) for r in na} == {("npairs", "20")}
  # The config's K = 8 does not divide 10: all 5 training classes x 2.
  hard10 = [r for r in rows if r["loss"] == "triplet_hard" and r["batch_size"] == "10"]
  assert {(r["P"], r["K"]) for r in hard10} == {("5", "2")}
  # Chance Recall@1 of digits 5-9, from scikit-learn's own class counts.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  target = load_digits().target
  counts = np.bincount(target[target >= 5])[5:]
  chance = np.sum(counts * (counts - 1)) / (counts.sum() * (counts.sum() - 1))
  ran = [r for r in rows if not r["reason"].startswith("n/a")]
  assert len(ran) == 3
  for r in ran:
    assert float(r["chance_recall@1"]) == pytest.approx(chance, rel=1e-5)
    degenerate = (float(r["mean_cosine_distance"]) < 0.1 * float(r["initial_mean_cosine_distance"])
                  or float(r["recall@1"]) < 2 * chance
                  or not np.isfinite(float(r["final_train_loss"])))
    assert (r["degenerate"] == "True") == degenerate, r
  page = open(os.path.join(out, "stability.md")).read()
  assert "triplet (batch hard)" in page
  assert " CPU cores (" in page and ": 3 runs. This page was written on" in page
  assert "Model `small_resnet` with {'widths'" in page, page
  # Second invocation reuses runs and their diagnostics.
  stdout = _run("stability.py", *args, cache=cache)
  assert "trained in" not in stdout and stdout.count("reused") == 3, stdout


def test_stability_keeps_a_diverged_run_as_a_result(tmp_path):
  """A run whose evaluation refuses NaN embeddings is degenerate (non-finite), and not re-run."""
  calls = []
  grid = dict(dataset="digits", losses=["contrastive"], learning_rates=[10.0], batch_sizes=[40],
              seeds=[0], output_dir=str(tmp_path), config_flags="runlocal",
              train_fn=_diverging_train(calls), log=lambda *a, **k: None)
  rows = stability.run_grid(**grid)
  assert len(calls) == 1
  assert rows[0]["degenerate"] is True and rows[0]["reason"] == "non-finite"
  assert os.path.exists(os.path.join(tmp_path, "runs", "contrastive", "lr10_bs40_seed0",
                                     stability.FAILED_FILE))
  rows = stability.run_grid(**grid)
  assert len(calls) == 1 and rows[0]["reason"] == "non-finite"

  def other_error(config, workdir):
    raise ValueError("config.train.steps must be a positive integer")

  with pytest.raises(ValueError, match="positive integer"):
    stability.run_grid(**{**grid, "output_dir": str(tmp_path / "b"), "train_fn": other_error})


def test_stability_counts_the_training_classes_of_the_data_the_config_trains_on(tmp_path):
  """The batch layouts are bounded by the classes the runs train on, after the validation split."""
  _image_folder(tmp_path / "root", images_per_class=3)  # 8 classes train after validation.
  calls = []  # The runs "diverge": nothing to measure, the layout is what is checked.
  rows = stability.run_grid(
      "folder", ["npairs"], [0.1], [16, 18], [0], str(tmp_path / "out"), config_flags="runlocal",
      overrides=[f"dataset=folder:{tmp_path / 'root'}", f"data_dir={tmp_path / 'tfds'}"],
      train_fn=_diverging_train(calls), log=lambda *a, **k: None)
  # 16 images: one pair of each of the 8 training classes.
  assert [(c.classes_per_batch, c.samples_per_class) for c, _ in calls] == [(8, 2)]
  assert [r["reason"] for r in rows] == ["non-finite", "n/a: batch layout"]  # 18 needs 9.
  with pytest.raises(ValueError, match="--losses is empty"):
    stability.run_grid("digits", [], [0.1], [16], [0], str(tmp_path / "b"))


def test_every_loss_has_a_label_and_the_sweeps_default_to_the_survey_losses():
  from rankjax import losses  # pylint: disable=g-import-not-at-top
  assert tuple(sweep.LOSS_LABELS) == losses.loss_names()
  assert sweep.LOSS_LABELS["triplet_hard"] == "triplet (batch hard)"
  assert sweep.SURVEY_LOSSES == (
      "contrastive", "triplet_semihard", "triplet_hard", "triplet_all", "npairs", "angular",
      "npairs_angular", "lifted_structure", "multi_similarity")
  assert sweep.POST_SURVEY_LOSSES == ("margin", "supcon", "arcface", "cosface",
                                      "subcenter_arcface")


@pytest.mark.parametrize("study", list(omniglot_probes.STUDIES))
def test_omniglot_probe_candidates_build_valid_models(study):
  from rankjax import configs, models, train  # pylint: disable=g-import-not-at-top
  info = types.SimpleNamespace(num_channels=1, train_classes=964)
  _, common, candidates = omniglot_probes.STUDIES[study]
  for name, own in candidates.items():
    overrides = {**common, **own}
    config = omniglot_probes.candidate_config(study, name, steps=7, data_dir="/x")
    configs.check_config(config)
    assert (config.train.steps, config.eval.every, config.data_dir) == (7, 0, "/x")
    for key, value in overrides.items():
      node = config
      for part in key.split("."):
        node = node[part]
      assert node == value, key
    model = train.build_model(config, info)
    models.check_image_size(config.model.name, config.image_size)
    assert model.backbone.num_features in (64, 128, 256, 512)
    proxies = train.init_loss_params(config, info).get("proxies", jnp.zeros((0, 1)))
    assert proxies.shape[0] == (0 if not configs.loss_spec(config.loss.name).learns_proxies
                                else 964 * (4 if config.rotate_classes else 1))
  with pytest.raises(Exception, match="Unknown candidate 'vgg'"):
    omniglot_probes.candidate_config(study, "vgg", steps=7, data_dir=None)


def test_sweep_reuses_a_run_made_before_a_config_field_was_added(tmp_path):
  from rankjax import configs  # pylint: disable=g-import-not-at-top
  config = compare_losses.build_config("digits", "npairs", 0)
  stored = sweep.config_as_dict(config)
  del stored["affine"]  # As written by a version without the field.
  (tmp_path / sweep.CONFIG_FILE).write_text(json.dumps(stored))
  sweep.check_same_config(config, str(tmp_path))  # The new field at its default: same run.
  config.affine.shift = 0.1
  with pytest.raises(ValueError, match=r"affine: \(absent\) in the run"):
    sweep.check_same_config(config, str(tmp_path))
  assert configs.base_config().affine.shift == 0.0


def test_validation_curves_reads_start_best_and_speed(tmp_path):
  from experiments import validation_curves  # pylint: disable=g-import-not-at-top
  from rankjax import run_log  # pylint: disable=g-import-not-at-top
  writer = run_log.SummaryWriter(str(tmp_path / "run" / "tensorboard"))
  for step, value in ((0, 0.10), (100, 0.15), (200, 0.195), (300, 0.20), (400, 0.18)):
    writer.scalars(step, {"val/map@r": value})
  writer.close()
  row = validation_curves.curve_row(str(tmp_path / "run"), "map@r")
  # 90% of the gain 0.10 -> 0.20 is 0.19, first reached at step 200.
  assert row == {"run": "run", "start": pytest.approx(0.10), "best": pytest.approx(0.20),
                 "best_step": 300, "last": pytest.approx(0.18), "last_step": 400,
                 "steps_to_90": 200}
  assert "| run | 0.1000 | 0.2000 (300) | 0.1800 (400) | 200 |" in validation_curves.table(
      [str(tmp_path / "run")], "map@r")
  with pytest.raises(ValueError, match="no val/recall@1"):
    validation_curves.curve_row(str(tmp_path / "run"), "recall@1")
  # Runs of a sweep are named below their common folder; a run without step 0 has no start.
  # A baseline run (no validation scalars) is listed as such.
  for name in ("contrastive/seed0", "npairs/seed0", "imagenet_features/seed0"):
    writer = run_log.SummaryWriter(str(tmp_path / "sweep" / name / "tensorboard"))
    writer.scalars(50, {"val/map@r": 0.3} if "features" not in name else {"test/map@r": 0.2})
    writer.close()
  rows = validation_curves.table([str(tmp_path / "sweep" / loss / "seed0") for loss in (
      "contrastive", "npairs", "imagenet_features")], "map@r").splitlines()[2:]
  assert rows == ["| contrastive/seed0 | - | 0.3000 (50) | 0.3000 (50) | - |",
                  "| npairs/seed0 | - | 0.3000 (50) | 0.3000 (50) | - |",
                  "| imagenet_features/seed0 | no validation evaluations | | | |"]
