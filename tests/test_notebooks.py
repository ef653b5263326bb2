"""Every notebook in notebooks/ runs top to bottom, with small settings, without a failing cell.

Each notebook reads ``RANKJAX_NOTEBOOK_SMOKE=1`` to shrink its work (a few training steps instead
of hundreds) and ``RANKJAX_NOTEBOOK_WORKDIR`` for where its training runs go. It is executed in a
fresh kernel of this Python (nbclient), from the notebooks/ folder, as a Colab or Jupyter user
would run it; the notebook files themselves are not modified.
"""

import glob
import os

import nbformat
from nbclient import NotebookClient
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert "01_ranking_losses_tour.ipynb" in names and "02_compare_losses.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  first = nb.cells[1].source if len(nb.cells) > 1 else ""
  assert "pip" in first and "find_spec(\"rankjax\")" in first, "the Colab install cell comes first"
  env = dict(os.environ)
  env.update(RANKJAX_NOTEBOOK_SMOKE="1", RANKJAX_NOTEBOOK_WORKDIR=str(tmp_path),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = ""  # One CPU device, as in Colab: not the test suite's 8 fake devices.
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute(env=env)  # Raises CellExecutionError, with the cell and traceback, on failure.
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
