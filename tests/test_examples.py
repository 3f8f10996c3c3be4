"""The README's library example and examples/ run as a user would run them, and they train."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REAL_DATA, ROOT, optimized_env


def test_readme_example_trains_an_iavae_above_its_vae():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1, "the README should hold one Python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)   # pylint: disable=exec-used
  assert namespace["after"] > namespace["before"] + 1.0, (namespace["before"], namespace["after"])


def _run_example(name: str, *args: str) -> str:
  """examples/NAME's standard output (given args), run as after `pip install -e .` (the library
  importable, the script run by path), optimised: the script's time is training, not compiling."""
  env = dict(optimized_env(),
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, os.path.join("examples", name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow   # a whole script in a subprocess
def test_own_encoder_example_prints_the_elbo_before_and_after_stage_2():
  stdout = _run_example("own_encoder.py")
  elbos = [float(v) for v in re.findall(r"test ELBO .*:\s+(-?\d+\.\d+) nats", stdout)]
  assert len(elbos) == 4, stdout
  before, *after = elbos   # the VAE; the IA-VAE x-only, with feedback, on the output layers
  assert -1000 < before < min(after) and max(after) < 0, stdout
  assert "deltas on Dense_1/bias, Dense_1/kernel, Dense_2/bias, Dense_2/kernel only" in stdout


@pytest.mark.slow   # a whole script in a subprocess
def test_image_vae_example_trains_both_stages_and_the_control_from_the_library():
  # On the MNIST subset where IAVAE_TEST_DATA holds it, else on the example's toy images.
  mnist = os.path.join(REAL_DATA or "", "mnist-5k")
  stdout = _run_example("image_vae.py", *([mnist] if REAL_DATA and os.path.isdir(mnist) else []))
  found = re.findall(r"(VAE|IA-VAE|control): +test ELBO (-?\d+\.\d+) nats, IWAE \(K=100\) "
                     r"(-?\d+\.\d+)", stdout)
  assert [name for name, _, _ in found] == ["VAE", "IA-VAE", "control"], stdout
  elbo, iwae = ({name: float(value) for name, value in zip(("VAE", "IA-VAE", "control"), column)}
                for column in list(zip(*found))[1:])
  # Trained (a decoder that says 1/2 for every pixel scores 784 log 2 = 543 nats), the IWAE
  # bound above the ELBO, and stage 2, which starts at the VAE, no worse than it.
  assert -450 < elbo["VAE"] and all(elbo[name] < iwae[name] < 0 for name in elbo), stdout
  assert min(elbo["IA-VAE"], elbo["control"]) > elbo["VAE"] - 1.0, stdout
