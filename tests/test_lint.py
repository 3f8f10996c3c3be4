"""The tree is clean under the project's ruff configuration (pyproject.toml, [tool.ruff])."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra: "
                    "pip install -e '.[test]'")
def test_ruff_finds_nothing():
  result = subprocess.run(["ruff", "check", "--output-format=concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
