"""Sphinx configuration of the rankjax API reference.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` from the repository root
(``pip install -e ".[docs]"`` first). The notebooks are shown as they were last run: they are not
executed here (the test suite executes them).
"""

import filecmp
import glob
import os
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)  # This checkout's rankjax, installed or not.

# Importing rankjax for autodoc needs no accelerator and should not log TensorFlow's start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import rankjax  # noqa: E402  # pylint: disable=wrong-import-position

project = "rankjax"
author = "The rankjax authors"
copyright = "The rankjax authors"  # pylint: disable=redefined-builtin
version = release = rankjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# Docstrings are Google style (napoleon) with the formulas in ``.. math::`` and ``:math:``.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

# The notebooks: stored outputs are shown, nothing is executed; $...$ math as in Jupyter.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build"]

html_theme = "sphinx_book_theme"
html_title = f"rankjax {version}"
html_theme_options = {
    "repository_url": "https://github.com/rankjax/rankjax",
    "use_repository_button": True,
    "path_to_docs": "docs",
}


def _copy_notebooks():
  """Copies notebooks/*.ipynb (where Colab opens them) to docs/notebooks/, which Sphinx reads.

  Sphinx reads sources only under docs/; the copies are ignored by git and refreshed when the
  notebook changes.
  """
  target = os.path.join(DOCS, "notebooks")
  os.makedirs(target, exist_ok=True)
  for path in sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))):
    copy = os.path.join(target, os.path.basename(path))
    if not os.path.exists(copy) or not filecmp.cmp(path, copy, shallow=False):
      shutil.copyfile(path, copy)


_copy_notebooks()


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """A NamedTuple's fields are documented by its ``Attributes:`` section, not again by autodoc."""
  del app, what, name, options
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
