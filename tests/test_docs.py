"""The API reference (docs/) builds with Sphinx with warnings as errors, and covers every module.

The build is the one a user runs, ``sphinx-build -W --keep-going -b html docs OUT``; the notebooks
are included as stored, not executed (tests/test_notebooks.py executes them).
"""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")


def _public_modules():
  """Every rankjax module whose dotted name has no part starting with an underscore.

  The top-level package is left out: it holds only ``__version__`` and a lazy alias of
  :func:`rankjax.embedder.load_embedder`.
  """
  modules = set()
  for folder, _, names in os.walk(os.path.join(REPO, "rankjax")):
    for name in names:
      if not name.endswith(".py"):
        continue
      parts = os.path.relpath(os.path.join(folder, name), REPO)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      if len(parts) > 1 and not any(p.startswith("_") for p in parts):
        modules.add(".".join(parts))
  return modules


def _documented_modules():
  found = set()
  for folder, _, names in os.walk(DOCS):
    for name in names:
      if name.endswith(".rst"):
        with open(os.path.join(folder, name)) as f:
          found.update(re.findall(r"^\.\. automodule:: (\S+)", f.read(), re.MULTILINE))
  return found


def test_every_public_module_has_a_place_in_the_api_reference():
  missing = _public_modules() - _documented_modules()
  assert not missing, f"add these modules to a page of docs/api/: {sorted(missing)}"
  assert not _documented_modules() - _public_modules()


def test_docs_build_without_warnings(tmp_path):
  out = tmp_path / "html"
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", DOCS, str(out)],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-5000:]
  losses = (out / "api" / "losses.html").read_text()
  assert 'id="rankjax.losses.triplet.triplet_loss"' in losses
  assert 'class="math' in losses  # The .. math:: and :math: of the docstrings, for MathJax.
  assert "Array(0.1743061, dtype=float32)" in losses  # A docstring example.
  for page in ("mining", "evaluation", "data", "models", "training", "launching"):
    assert (out / "api" / f"{page}.html").exists(), page
  for notebook in ("01_ranking_losses_tour", "02_compare_losses"):
    html = (out / "notebooks" / f"{notebook}.html").read_text()
    assert html.count("<img") >= 3, notebook  # The figures stored in the notebook.


def test_the_extending_guide_runs(monkeypatch):
  # Each recipe of docs/extending.md, as written, registers what it says it does.
  from rankjax import configs, data, losses, models  # pylint: disable=g-import-not-at-top
  from rankjax.data import datasets  # pylint: disable=g-import-not-at-top
  from rankjax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(losses.catalogue, "CATALOGUE", dict(losses.CATALOGUE))
  monkeypatch.setattr(losses, "CATALOGUE", losses.catalogue.CATALOGUE)
  monkeypatch.setattr(datasets, "_SPECS", dict(datasets._SPECS))  # pylint: disable=protected-access
  monkeypatch.setattr(model_lib, "_SPECS", dict(model_lib._SPECS))  # pylint: disable=protected-access
  text = open(os.path.join(REPO, "docs", "extending.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 3
  for block in blocks:
    exec(compile(block, "docs/extending.md", "exec"), {})  # pylint: disable=exec-used
  config = configs.with_loss(configs.base_config(), "scaled_ms")
  assert configs.loss_kwargs(config) == {"alpha": 2.0, "beta": 50.0}
  assert "my_birds" in data.dataset_names()
  assert models.get_model("narrow_conv4", num_channels=1, rngs=0).backbone.num_features == 16
