"""Every docstring example in rankjax runs as a doctest, so the examples stay true.

This is ``python -m pytest --doctest-modules rankjax`` inside the README's test command
(``python -m pytest tests``), one test per module, with two differences: numbers in an example's
output match to float32 rounding (``rtol=1e-5``: a float printed to all its digits may differ in
the last one between CPUs), and every example written in a module's docstrings must be found and
run, so an example on an object doctest does not see fails here instead of being skipped.
"""

import ast
import doctest
import importlib
import io
import os
import re

import numpy as np
import pytest

RANKJAX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rankjax")
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
RTOL = 1e-5
# Fewer examples than this in the whole library means discovery broke (there are 131 today).
MIN_EXAMPLES = 100

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _source_files():
  """``{module name: path}`` of every rankjax module, found on disk (nothing imported)."""
  files = {}
  for folder, _, names in os.walk(RANKJAX):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(RANKJAX))[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        files[".".join(parts)] = path
  return dict(sorted(files.items()))


def _written_examples(path):
  """The number of examples in every docstring of the file (module, classes, functions)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  count = 0
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      docstring = ast.get_docstring(node, clean=True)
      if docstring:
        count += len(doctest.DocTestParser().get_examples(docstring))
  return count


SOURCES = _source_files()
WITH_EXAMPLES = [name for name, path in SOURCES.items() if _written_examples(path)]


class _Float32Checker(doctest.OutputChecker):
  """Doctest's own comparison, else the same text with every number equal to ``rtol=1e-5``.

  Integers (no point, no exponent) must match exactly.
  """

  def check_output(self, want, got, optionflags):
    if super().check_output(want, got, optionflags):
      return True
    want_numbers, got_numbers = _NUMBER.findall(want), _NUMBER.findall(got)
    if len(want_numbers) != len(got_numbers) or not want_numbers:
      return False
    if not super().check_output(_NUMBER.sub("0", want), _NUMBER.sub("0", got), optionflags):
      return False
    for w, g in zip(want_numbers, got_numbers):
      if _is_integer(w) and _is_integer(g):
        if int(w) != int(g):
          return False
      elif not np.isclose(float(g), float(w), rtol=RTOL, atol=0.0):
        return False
    return True


def _is_integer(text):
  return not any(c in text for c in ".eE")


def test_the_checker_accepts_float32_rounding_only():
  checker = _Float32Checker()
  ok = lambda want, got: checker.check_output(want, got, OPTIONFLAGS)
  assert ok("Array(0.31326166, dtype=float32)\n", "Array(0.31326163, dtype=float32)\n")
  assert not ok("Array(0.31326166, dtype=float32)\n", "Array(0.3133, dtype=float32)\n")
  assert not ok("Array(0.3133, dtype=float32)\n", "Array(0.3132, dtype=float32)\n")
  assert not ok("Array(0.5, dtype=float32)\n", "Array(0.5, dtype=float64)\n")
  assert not ok("(2, 128)\n", "(2, 127)\n")
  assert not ok("1.0 2.0\n", "1.0\n")
  assert ok("[1.0, ...]\n", "[1.0, 2.0, 3.0]\n")


def test_the_library_has_examples():
  written = {name: _written_examples(SOURCES[name]) for name in WITH_EXAMPLES}
  assert sum(written.values()) >= MIN_EXAMPLES, written


@pytest.mark.parametrize("module_name", WITH_EXAMPLES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
  runner = doctest.DocTestRunner(checker=_Float32Checker(), optionflags=OPTIONFLAGS)
  report = io.StringIO()
  for test in sorted(tests, key=lambda t: t.name):
    runner.run(test, out=report.write)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, report.getvalue()
  written = _written_examples(SOURCES[module_name])
  assert result.attempted == written, (
      f"{module_name} has {written} docstring examples but doctest found {result.attempted}: "
      f"an example sits where doctest cannot see it (e.g. on a wrapped function).")
