"""Every notebook in notebooks/ runs top to bottom, with small settings, and shows what it promises.

Each notebook reads ``RANKJAX_NOTEBOOK_SMOKE=1`` to shrink its work (a few training steps instead
of hundreds) and ``RANKJAX_NOTEBOOK_WORKDIR`` for where its training runs go. It is executed in a
fresh kernel of this Python (nbclient), from the notebooks/ folder, as a Colab or Jupyter user
would run it; the notebook files themselves are not modified. Then its key outputs are checked:
the tables it prints (parsed from the executed cells) and the figures it draws (PNG images).
"""

import base64
import glob
import io
import json
import os
import re

import nbformat
from nbclient import NotebookClient
import numpy as np
from PIL import Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi")


def _printed(nb):
  """Everything the executed code cells printed, one string per cell."""
  return ["".join(o.get("text", "") for o in c.get("outputs", []) if o["output_type"] == "stream")
          for c in nb.cells if c.cell_type == "code"]


def _cell_printing(nb, marker):
  cells = [text for text in _printed(nb) if marker in text]
  assert len(cells) == 1, f"expected one cell printing {marker!r}; found {len(cells)}"
  return cells[0]


def _table_rows(text, first_column):
  """``{first column: [the other columns]}`` of the ``a | b | c`` lines starting with a key."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.split("|")]
    if cells[0] in first_column:
      rows[cells[0]] = cells[1:]
  assert set(rows) == set(first_column), text
  return rows


def _figures(nb):
  """The PNG images the notebook displayed, decoded."""
  images = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if "image/png" in output.get("data", {}):
        images.append(Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))))
  return images


def _check_tour(nb, workdir):
  """01: the mining table matches rankjax, the scale-invariance table separates the losses."""
  del workdir
  # Section 2: a P = 4 x K = 4 batch. Batch hard uses one triplet per anchor (16), semi-hard one
  # per positive pair (16 x 3 = 48), batch all the active ones of the 16 x 3 x 12 valid triplets.
  rows = _table_rows(_cell_printing(nb, "triplets used"), ("hard", "semihard", "all"))
  assert int(rows["hard"][0]) == 16 and int(rows["semihard"][0]) == 48
  assert 0 < int(rows["all"][0]) <= 16 * 3 * 12
  for name, (_, by_numpy, by_rankjax) in rows.items():
    assert abs(float(by_numpy) - float(by_rankjax)) <= 1e-5, name  # The 5 printed decimals.
    assert float(by_rankjax) > 0, name
  # Section 5: the largest relative change of each loss's value over scales 1e-3 ... 1e3.
  rows = _table_rows(_cell_printing(nb, "max rel. change"),
                     ("angular", "multi_similarity", "triplet_semihard", "contrastive", "npairs"))
  change = {name: float(cells[-1]) for name, cells in rows.items()}
  assert change["angular"] < 1e-4 and change["multi_similarity"] < 1e-4, change
  assert min(change["triplet_semihard"], change["contrastive"], change["npairs"]) > 1e-2, change
  assert len(_figures(nb)) == 4  # The batch, the three minings, triplet vs N-pairs, gradients.


def _check_compare_losses(nb, workdir):
  """02: the metrics table is what each run wrote to its workdir; the figures are drawn."""
  losses = ("triplet_semihard", "npairs", "angular")
  text = _cell_printing(nb, " r_precision |")
  header = [c.strip() for c in text.splitlines()[0].split("|")]
  assert header == ["loss", *METRICS], header
  rows = _table_rows(text, losses)
  for loss in losses:
    with open(os.path.join(workdir, loss, "metrics.json")) as f:
      written = json.load(f)
    printed = np.array([float(v) for v in rows[loss]])
    np.testing.assert_allclose(printed, [written[k] for k in METRICS], atol=5e-4 + 1e-9)
    assert np.all((printed >= 0) & (printed <= 1)), loss
  assert re.search(r"^\d+ test images embedded; Recall@1 recomputed from them matches training's",
                   _cell_printing(nb, "test images embedded"), re.MULTILINE)
  assert len(_figures(nb)) == 3  # Recall@K and training curves, t-SNE, retrieved neighbours.


KEY_OUTPUTS = {
    "01_ranking_losses_tour.ipynb": _check_tour,
    "02_compare_losses.ipynb": _check_compare_losses,
}


def test_there_are_notebooks():
  assert sorted(os.path.basename(p) for p in NOTEBOOKS) == sorted(KEY_OUTPUTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_and_shows_its_results(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  first = nb.cells[1].source if len(nb.cells) > 1 else ""
  assert "pip" in first and "find_spec(\"rankjax\")" in first, "the Colab install cell comes first"
  env = dict(os.environ)
  env.update(RANKJAX_NOTEBOOK_SMOKE="1", RANKJAX_NOTEBOOK_WORKDIR=str(tmp_path),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = ""  # One CPU device, as in Colab: not the test suite's 8 fake devices.
  # The kernel imports this checkout's rankjax, whatever else is installed.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute(env=env)  # Raises CellExecutionError, with the cell and traceback, on failure.
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  for image in _figures(nb):
    assert image.format == "PNG" and min(image.size) >= 100, image.size
  KEY_OUTPUTS[os.path.basename(path)](nb, str(tmp_path))
