"""What every command line shares: usage errors, the workdir contract, progress, JSON output."""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import app, flags, logging



PARALLEL_MODES = ("none", "seeds", "data")   # iavae_jax.parallel.MODES (no JAX import here)


def define_run_flags() -> None:
  """The flags of every training command: how it uses the devices, and NaN diagnosis."""
  flags.DEFINE_enum("parallel", "none", list(PARALLEL_MODES),
                    "Devices: 'seeds' splits the models being trained over all devices, 'data' "
                    "splits every batch over them (parameters replicated), 'none' uses one.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first: for runs "
                    "over several hosts, one process per host. TPU pod slices, SLURM and Open "
                    "MPI need nothing more; elsewhere give the three flags below.")
  flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0, 1, ...")
  flags.DEFINE_bool("debug_nans", False, "Stop at the first operation that produces a NaN "
                    "(jax_debug_nans: slow; for diagnosing a run that diverged).")


def parallel_from_flags():
  """The iavae_jax.parallel.Parallel the run flags ask for (after --distributed is applied)."""
  from iavae_jax import parallel  # pylint: disable=g-import-not-at-top  (imports JAX)
  return parallel.Parallel.create(flags.FLAGS.parallel)


class ConfigError(ValueError):
  """Bad user input: the message names the flag or file and says how to fix it (exit code 2)."""


class RunError(RuntimeError):
  """A run that cannot go on (it diverged, the disk is full): what happened, what was kept, what
  to do (exit code 1)."""


def run_command(argv: list[str], body: Callable[[], Any]) -> None:
  """An absl main: refuses stray arguments, quiets Orbax's INFO logs (unless --verbosity is
  given), applies --debug_nans and --distributed (if the command defines them), runs body(), and turns a ConfigError into "error: ..." on stderr
  and exit code 2, a RunError into the same with exit code 1."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if "debug_nans" in flags.FLAGS and (flags.FLAGS.debug_nans or flags.FLAGS.distributed):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_debug_nans", flags.FLAGS.debug_nans)
    if flags.FLAGS.distributed:
      jax.distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                 flags.FLAGS.process_id)
  try:
    body()
  except (ConfigError, RunError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


def prepare_workdir(workdir: str, config: Any) -> None:
  """Creates workdir and records config in it, or checks that it matches the recorded one.

  A workdir holds the checkpoints of one configuration; resuming it with another would mix runs,
  so that is refused before anything is written.
  """
  _require_workdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise _not_writable(workdir, e) from e
  wanted = as_json(config)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    diffs = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
    if diffs:
      details = ", ".join(f"{k}: recorded {recorded.get(k)!r}, now {wanted.get(k)!r}"
                          for k in diffs)
      raise ConfigError(f"--workdir={workdir} holds a run with a different configuration "
                        f"({details}). Use a new --workdir, or the same flags to resume.")
  elif not os.path.exists(os.path.join(workdir, "checkpoints")):
    write_json(path, wanted)
  # Checkpoints without a config.json: restoring them checks their structure and shapes, and the
  # run records its config only once it has finished (see record_config).


def _require_workdir(workdir: str) -> None:
  if not workdir:
    raise ConfigError("--workdir is required: a directory for checkpoints and results.")


def _not_writable(workdir: str, e: OSError) -> ConfigError:
  return ConfigError(f"--workdir={workdir} is not a writable directory ({e.strerror}); "
                     "choose another --workdir.")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds workdir for one run while the block runs: every command that writes into a workdir
  wraps its work in ``with workdir_lock(workdir):``, after its flags are checked and before it
  reads or writes anything there.

  Creates workdir if absent and takes an exclusive flock(2) on workdir/.lock, which reads
  "pid P on HOST" while held and is removed on release (with workdir too, if this call created
  it and nothing was written into it: bad input found inside the block leaves nothing behind).
  If another process holds it, raises ConfigError naming the workdir and the holder, having
  created and changed nothing. The OS drops the lock when its holder exits in any way (kill -9
  included), so it is never stale: the next run takes over the file a killed one left.
  In a multi-process run (--distributed) only the primary process takes the lock, and every
  process learns whether it did, so that all of them stop together when it is refused.
  """
  fd, created, error = None, False, None
  if is_primary():
    try:
      fd, created = _lock(workdir)
    except ConfigError as e:
      error = e
  if _primary_says(error is not None):
    raise error or ConfigError(f"--workdir={workdir}: process 0 could not take the workdir "
                               "(see its error).")
  try:
    yield
  finally:
    if fd is not None:
      # Removed while still locked: a process that opened it meanwhile finds it gone once it
      # gets the lock, and starts again (see _lock).
      os.remove(os.path.join(workdir, LOCK_FILE))
      os.close(fd)
      if created:
        with contextlib.suppress(OSError):   # not empty: the run wrote into it
          os.rmdir(workdir)


def _lock(workdir: str) -> tuple[int, bool]:
  """workdir/.lock's descriptor, exclusively locked and naming this process, and whether this
  call created workdir."""
  _require_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  created = not os.path.exists(workdir)
  while True:
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # no O_TRUNC: a holder's pid stays
    except OSError as e:
      raise _not_writable(workdir, e) from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 256).decode(errors="replace").strip() or "pid not yet written"
      os.close(fd)
      raise ConfigError(f"--workdir={workdir} is in use by another run ({holder}, holding "
                        f"{path}). Wait for it to finish or stop it, or choose another "
                        "--workdir.") from None
    try:
      if os.path.samestat(os.fstat(fd), os.stat(path)):
        break
    except FileNotFoundError:
      pass
    os.close(fd)   # its last holder removed it between our open and our lock: open the new one
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
  return fd, created


def _primary_says(flag: bool) -> bool:
  """flag as the primary process has it, in every process of a multi-process run."""
  if "jax" not in sys.modules:   # --distributed imports JAX first: without it, one process
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(int(flag)))


def record_config(workdir: str, config: Any) -> None:
  """Writes workdir/config.json if it is missing (after a run has validated its checkpoints)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    write_json(path, as_json(config))


def as_json(config: Any) -> dict:
  """The config as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def is_primary() -> bool:
  """Whether this process writes the run's files: process 0 of a multi-host run (JAX numbers
  the processes after jax.distributed.initialize), or the only process."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): a reader never sees half a file. Only the
  primary process writes."""
  if not is_primary():
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, allow_nan=True)
    f.write("\n")
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  if not is_primary():
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_figure(figure, path: str) -> None:
  """Saves a matplotlib figure (primary process only)."""
  if is_primary():
    figure.savefig(path, dpi=120)


class Progress:
  """Prints a progress line with rate and ETA, and appends metrics to a JSON-lines file."""

  def __init__(self, name: str, total_epochs: int, metrics_path: str, start_epoch: int = 0):
    self.name, self.total = name, total_epochs
    self.metrics_path = metrics_path
    self.start_epoch, self.start_time = start_epoch, time.time()

  def update(self, epoch: int, active: int, population: int, score_mean: float,
             score_min: float, score_max: float) -> None:
    if not is_primary():
      return
    elapsed = time.time() - self.start_time
    rate = (epoch - self.start_epoch) / elapsed if elapsed > 0 else float("nan")
    eta = (self.total - epoch) / rate if rate > 0 else float("nan")
    print(f"[{self.name}] epoch {epoch}/{self.total}  training {active}/{population}  "
          f"best ELBO mean {score_mean:.4f} (min {score_min:.4f}, max {score_max:.4f})  "
          f"{rate:.1f} epochs/s  ETA {eta:.0f}s at most", flush=True)
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps({"stage": self.name, "epoch": epoch, "training": active,
                          "best_elbo_mean": score_mean, "best_elbo_min": score_min,
                          "best_elbo_max": score_max, "seconds": elapsed}) + "\n")
