"""Shared test set-up: 64-bit off (the library's default), fixed keys, and command-line runs
shared by the test modules (one tiny synthetic run, one smoke image run per session)."""

import os
import signal
import socket
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_5K = os.path.join(ROOT, "..", "shared", "data", "mnist-5k")
# The synthetic protocol in seconds: 2 VAEs x 2 IA-VAEs, widths 2 and 4, 4 epochs.
TINY = ["--quick", "--num_examples=256", "--max_epochs=4", "--patience=2", "--epochs_per_call=2",
        "--checkpoint_every=2", "--num_vae_seeds=2", "--num_iavae_seeds=2",
        "--sweep_widths=2,4"]
SMOKE = ["--dataset=mnist", "--tier=smoke", f"--data_dir={MNIST_5K}"]


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


def run_module(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
  """``python -m module *args`` in the repository root, output captured."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=env)


def start_distributed(module: str, *args) -> list[subprocess.Popen]:
  """Starts ``python -m module *args`` as 2 processes of 2 CPU devices each on this machine,
  joined by jax.distributed (--distributed with an explicit coordinator on a free port): multi-
  host in miniature. Each process's stdout and stderr are merged into its stdout pipe."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return [subprocess.Popen(
      [sys.executable, "-m", module, *args, "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, result) of the TINY synthetic run."""
  workdir = str(tmp_path_factory.mktemp("synthetic"))
  result = run_module("experiments.synthetic", f"--workdir={workdir}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """(root, workdir = root/mnist, result) of the smoke-tier image run on the MNIST subset."""
  if not os.path.isdir(MNIST_5K):
    pytest.skip(f"the MNIST subset is not at {MNIST_5K}")
  root = str(tmp_path_factory.mktemp("images"))
  workdir = os.path.join(root, "mnist")
  result = run_module("experiments.images", f"--workdir={workdir}", *SMOKE)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, workdir, result


def _kill_after_line(module: str, args: list, prefix: str) -> str:
  """Starts ``python -m module *args``, SIGKILLs it as soon as it prints a line starting with
  ``prefix`` (mid-run: the checkpoint of that epoch is usually being written), and returns its
  output up to the kill. Fails if the run ends before printing the line."""
  proc = subprocess.Popen([sys.executable, "-u", "-m", module, *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(prefix):
      proc.send_signal(signal.SIGKILL)
      break
  proc.stdout.close()
  code = proc.wait(timeout=60)
  assert code == -signal.SIGKILL, f"the run ended (code {code}) before '{prefix}':\n" + "".join(
      seen[-20:])
  return "".join(seen)


@pytest.fixture
def kill_after_line():
  return _kill_after_line
