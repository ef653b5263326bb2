"""The version lives in one place (rankjax.__version__); licence, citation and changelog agree."""

import os
import re
import subprocess
import sys

import yaml

import rankjax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def test_setup_reads_the_version_of_the_package():
  result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO,
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == rankjax.__version__
  assert re.fullmatch(r"\d+\.\d+\.\d+", rankjax.__version__)
  assert "version=_version()" in _read("setup.py")


def test_citation_file():
  citation = yaml.safe_load(_read("CITATION.cff"))
  assert citation["cff-version"] == "1.2.0"
  assert citation["version"] == rankjax.__version__
  assert {"message", "title", "authors"} <= set(citation)
  assert citation["authors"] == [{"name": "The rankjax authors"}]
  assert citation["license"] == "Apache-2.0"
  assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", citation["date-released"])  # A string, as CFF wants.


def test_changelog_has_the_version_and_an_unreleased_section():
  changelog = _read("CHANGELOG.md")
  assert "## [Unreleased]" in changelog
  assert re.search(rf"^## \[{re.escape(rankjax.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$",
                   changelog, re.MULTILINE)


def test_licence_is_apache_2():
  licence = _read("LICENSE")
  assert "Apache License" in licence and "Version 2.0, January 2004" in licence
  assert "END OF TERMS AND CONDITIONS" in licence
