"""The tree is clean under the project's ruff configuration (pyproject.toml, [tool.ruff]), every
library module lists its public names, and no function runs over 60 lines."""

import ast
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is in the test extra: pip install -e '.[test]'")
def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format=concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def _python_files(*folders: str) -> list[str]:
  return sorted(os.path.join(root, name) for folder in folders
                for root, _, names in os.walk(os.path.join(ROOT, folder))
                for name in names if name.endswith(".py"))


def test_every_library_module_lists_public_names_it_defines():
  for path in _python_files("iavae_jax"):
    name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    assert not [n for n in module.__all__ if not hasattr(module, n)], name


def test_no_function_is_longer_than_60_lines():
  long = [f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}"
          for path in _python_files("iavae_jax", "experiments", "benchmarks", "examples")
          for node in ast.walk(ast.parse(pathlib.Path(path).read_text()))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > 60]
  assert not long, long
