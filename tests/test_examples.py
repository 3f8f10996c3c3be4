"""The README's library example and examples/ run as a user would run them, and they train."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, optimized_env


def test_readme_example_trains_an_iavae_above_its_vae():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1, "the README should hold one Python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)   # pylint: disable=exec-used
  assert namespace["after"] > namespace["before"] + 1.0, (namespace["before"], namespace["after"])


@pytest.mark.slow   # a whole script in a subprocess
def test_own_encoder_example_prints_the_elbo_before_and_after_stage_2():
  # As after `pip install -e .`: the library importable, the script run by path.
  # Optimised: the script's time is training, not compiling.
  env = dict(optimized_env(),
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, os.path.join("examples", "own_encoder.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  elbos = [float(v) for v in re.findall(r"test ELBO .*:\s+(-?\d+\.\d+) nats", result.stdout)]
  assert len(elbos) == 3, result.stdout
  before, after, with_feedback = elbos
  assert -1000 < before < min(after, with_feedback) < 0, result.stdout
