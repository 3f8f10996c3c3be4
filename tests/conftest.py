"""Shared test set-up: 64-bit off (the library's default), fixed keys, command-line runs."""

import os
import signal
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


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
