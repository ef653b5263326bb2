"""The code passes the linter configured in pyproject.toml (ruff: pyflakes and pycodestyle)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINTED = ("rankjax", "tests", "experiments", "benchmarks")


def test_ruff_finds_nothing():
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", *LINTED],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_is_in_force():
  """A line of 101 columns and an unused import are findings; 100 columns and a lambda are not."""
  code = ("import os\n\n\ndef f(x):\n  g = lambda y: y\n  return g(x)  # " + "x" * 81 + "\n"
          "# " + "y" * 99 + "\n")
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise",
       "--stdin-filename=rankjax/example.py", "-"],
      cwd=REPO, input=code, capture_output=True, text=True)
  findings = sorted(line.split(" ")[1] for line in result.stdout.splitlines()
                    if line.startswith("rankjax/example.py:"))
  assert findings == ["E501", "F401"], result.stdout
