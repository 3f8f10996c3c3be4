"""Shared test set-up: fixed keys, tiny data files written to temporary directories, and the
command-line runs shared by the test modules (one tiny synthetic run, one smoke image run).

Three tiers: ``python -m pytest`` runs the fast one (setup.cfg deselects the others);
``python -m pytest -m extended`` the in-process checks beyond it (the no-jit variants, marked by
``pytest_collection_modifyitems``, and the modulated path's second design per layer kind);
``python -m pytest -m slow`` runs whole commands in subprocesses (training end to end, kill and
resume, several devices) and the paper architecture's steps. Tests of the real data sets run
when IAVAE_TEST_DATA names a directory holding them (``mnist-5k/``, ``omniglot/``) and skip
otherwise; every other test makes its own data.

The tests compile with XLA:CPU's LLVM optimisation off (``--xla_backend_optimization_level=0``,
added to any XLA_FLAGS already set, and inherited by the tests' subprocesses): their inputs are
tiny, so compiling is most of their time, and unoptimised code takes about 40% less of it. The
commands whose time is computing, not compiling, run optimised (``run_module(...,
optimized=True)``). Every process of a session (the xdist workers and the commands they start)
shares one persistent compilation cache, removed at the end, so a program is compiled once per
session: the smoke run's, for one, is compiled by its first command and read by the next ones.
"""

import gzip
import io
import os
import signal
import socket
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

UNOPTIMIZED = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), UNOPTIMIZED]).strip()
# Set by the first process of the session (the xdist controller, or pytest with -n 0), inherited
# by the rest; a cache directory of the user's own is kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="iavae-jax-tests-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# After XLA_FLAGS and the cache's settings, which jax reads when it starts.
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.environ.get("IAVAE_TEST_DATA")
# The synthetic protocol in seconds: 2 VAEs x 2 IA-VAEs, widths 2 and 4, 4 epochs.
TINY = ["--plumbing_check", "--num_examples=256", "--max_epochs=4", "--patience=2",
        "--epochs_per_call=2", "--checkpoint_every=2", "--num_vae_seeds=2", "--num_iavae_seeds=2",
        "--sweep_widths=2,4"]
# The image smoke tier; runs that read data add --data_dir (the smoke_flags fixture).
SMOKE = ["--dataset=mnist", "--tier=smoke"]
SMOKE_GAPS = ["--num_examples=20"]   # experiments.gaps on the smoke run


def real_data(name: str) -> str:
  """The path of real data set ``name`` under IAVAE_TEST_DATA; skips the test if it is absent."""
  path = os.path.join(REAL_DATA or "", name)
  if not REAL_DATA or not os.path.isdir(path):
    pytest.skip(f"needs the real data set {name}/ in the directory named by IAVAE_TEST_DATA")
  return path


def write_idx(path: str, pixels: np.ndarray, magic: int = 2051):
  """pixels uint8 [N, rows, cols] as an IDX image file, gzipped when path ends in .gz."""
  data = struct.pack(">4I", magic, *pixels.shape) + pixels.astype(np.uint8).tobytes()
  with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
    f.write(data)


def png(image: np.ndarray) -> bytes:
  """A 1-bit PNG of image [H, W] bool (True = white background), as Omniglot's drawings are."""
  buffer = io.BytesIO()
  Image.fromarray(image).convert("1").save(buffer, format="PNG")
  return buffer.getvalue()


def write_omniglot_zip(path: str, top: str, drawings: dict):
  """A zip of <top>/<alphabet>/<character>/<drawing>.png from {relative path: bool image}."""
  with zipfile.ZipFile(path, "w") as zf:
    for name, image in drawings.items():
      zf.writestr(f"{top}/{name}", png(image))


def toy_images(num: int, seed: int = 0) -> np.ndarray:
  """uint8 [num, 28, 28]: grey strokes along a few random rows and columns, digit-like in size."""
  rng = np.random.default_rng(seed)
  rows, cols = rng.random((2, num, 28)) < 0.08
  level = rng.integers(128, 256, (num, 1, 1))
  return ((rows[:, :, None] | cols[:, None, :]) * level).astype(np.uint8)


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory) -> str:
  """A directory holding images-idx3-ubyte.gz of 400 toy images: a pool with no test split that
  the smoke tier cuts to 100 training, 40 validation and 40 test images."""
  directory = tmp_path_factory.mktemp("smoke_data")
  write_idx(str(directory / "images-idx3-ubyte.gz"), toy_images(400))
  return str(directory)


@pytest.fixture(scope="session")
def smoke_flags(smoke_data_dir) -> list:
  return SMOKE + [f"--data_dir={smoke_data_dir}"]


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


@pytest.hookimpl(tryfirst=True)   # before -m deselects by marker
def pytest_collection_modifyitems(items):
  """A test's no-jit variant (chex's ``__without_jit``, or ``use_jit=False``) is ``extended``:
  it checks the same mathematics as its jitted twin, which stays in the fast tier, one
  operation at a time, and costs several times as long."""
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if item.name.endswith("__without_jit") or params.get("use_jit") is False:
      item.add_marker(pytest.mark.extended)


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def optimized_env() -> dict:
  """The environment with XLA's optimisation on: for commands whose time is computing."""
  return dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ["XLA_FLAGS"].split() if f != UNOPTIMIZED))


def run_module(module: str, *args, env: dict | None = None,
               optimized: bool = False) -> subprocess.CompletedProcess:
  """``python -m module *args`` in the repository root, output captured; optimized: with XLA's
  optimisation on (env, if given, is taken as it is)."""
  if optimized and env is None:
    env = optimized_env()
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=env)


def start_distributed(module: str, *args) -> list[subprocess.Popen]:
  """Starts ``python -m module *args`` as 2 processes of 2 CPU devices each on this machine,
  joined by jax.distributed (--distributed with an explicit coordinator on a free port): multi-
  host in miniature. Each process's stdout and stderr are merged into its stdout pipe."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ,
             XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
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
def smoke_run(tmp_path_factory, smoke_flags):
  """(root, workdir = root/mnist, result) of the smoke-tier image run on the toy images."""
  root = str(tmp_path_factory.mktemp("images"))
  workdir = os.path.join(root, "mnist")
  result = run_module("experiments.images", f"--workdir={workdir}", *smoke_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, workdir, result


@pytest.fixture(scope="session")
def gaps_run(smoke_run):
  """(workdir, stdout) of ``experiments.gaps`` on the smoke run (SMOKE_GAPS), optimised."""
  _, workdir, _ = smoke_run
  result = run_module("experiments.gaps", f"--workdir={workdir}", *SMOKE_GAPS, optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def _kill_after_line(module: str, args: list, prefix: str, optimized: bool = False) -> str:
  """Starts ``python -m module *args`` (optimized: as run_module's), SIGKILLs it as soon as it
  prints a line starting with ``prefix`` (mid-run: the checkpoint of that epoch is usually being
  written), and returns its output up to the kill. Fails if the run ends before the line."""
  proc = subprocess.Popen([sys.executable, "-u", "-m", module, *args], cwd=ROOT,
                          env=optimized_env() if optimized else None,
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
