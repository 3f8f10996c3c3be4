"""A run's directory: what it holds, who holds it, and how its files are written.

A workdir holds the checkpoints and results of one configuration (``prepare_workdir`` refuses
another), is held by one run at a time (``workdir_lock``), and its JSON and text files are
written atomically by the primary process only, so a reader never sees half a file and a
multi-process run writes each file once. Nothing here imports JAX until a function needs it:
a command can check its input and its workdir before JAX starts.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import socket
import sys
import tempfile
from typing import Any, Iterator

from iavae_jax.errors import ConfigError

__all__ = ["LOCK_FILE", "prepare_workdir", "record_or_compare", "differences", "workdir_lock",
           "record_config", "read_config", "as_json", "read_json", "is_primary", "write_json",
           "markdown_table", "write_text", "save_figure", "save_learning_curves", "environment",
           "write_results"]


def prepare_workdir(workdir: str, config: Any, may_change: tuple[str, ...] = ()) -> None:
  """Creates workdir and records config in it, or checks that it matches the recorded one.

  A workdir holds the checkpoints of one configuration; resuming it with another would mix runs,
  so that is refused before anything is written. Only the fields ``may_change`` (e.g. how many
  seeds a run holds: each seed's models are checkpointed apart) may differ: config.json then
  records the new values, and the run resumes what the workdir holds. A field that config.json
  lacks (one added to the configuration after the run began) counts as its default.
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
    recorded = read_json(path, "restore it, or use a new workdir")
    if not isinstance(recorded, dict):
      raise ConfigError(f"{path} does not hold a JSON object; restore it, or use a new workdir.")
    fixed = lambda fields: {k: v for k, v in fields.items() if k not in may_change}
    details = differences(fixed({**_defaults(config), **recorded}), fixed(wanted))
    if details:
      raise ConfigError(f"workdir {workdir} holds a run with a different configuration "
                        f"({details}). Use a new workdir, or the same configuration to resume.")
    if recorded != wanted:
      print(f"note: workdir {workdir} goes on with {differences(recorded, wanted)}",
            flush=True)
      write_json(path, wanted)
  elif not os.path.exists(os.path.join(workdir, "checkpoints")):
    write_json(path, wanted)
  # Checkpoints without a config.json: restoring them checks their structure and shapes, and the
  # run records its config only once it has finished (see record_config).


def _defaults(config: Any) -> dict:
  """The config's fields that have defaults, at their defaults, as they read back from JSON."""
  return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config)
                                if f.default is not dataclasses.MISSING}))


def record_or_compare(path: str, wanted: dict, remedy: str) -> str:
  """Writes ``wanted`` to the JSON file ``path`` if it is absent and returns ""; else what the
  file holds differs from ``wanted`` in (``differences``: "" if nothing). A file that cannot be
  read as JSON is a ConfigError saying ``remedy``."""
  if not os.path.exists(path):
    write_json(path, wanted)
    return ""
  recorded = read_json(path, remedy)
  if not isinstance(recorded, dict):
    raise ConfigError(f"{path} does not hold a JSON object; {remedy}.")
  return differences(recorded, wanted)


class _Absent:
  def __repr__(self) -> str:
    return "absent"


_ABSENT = _Absent()


def differences(recorded: dict, wanted: dict) -> str:
  """"key: recorded X, now Y" for every key whose value differs (a key only one of them has:
  "absent" in the other), in key order; "" if none."""
  return ", ".join(f"{k}: recorded {recorded.get(k, _ABSENT)!r}, now {wanted.get(k, _ABSENT)!r}"
                   for k in sorted(set(wanted) | set(recorded))
                   if wanted.get(k, _ABSENT) != recorded.get(k, _ABSENT))


def _require_workdir(workdir: str) -> None:
  if not workdir:
    raise ConfigError("a workdir is required: a directory for checkpoints and results.")


def _not_writable(workdir: str, e: OSError) -> ConfigError:
  return ConfigError(f"workdir {workdir} is not a writable directory ({e.strerror}); "
                     "choose another.")


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
    raise error or ConfigError(f"workdir {workdir}: process 0 could not take the workdir "
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
      raise ConfigError(f"workdir {workdir} is in use by another run ({holder}, holding "
                        f"{path}). Wait for it to finish or stop it, or choose another "
                        "workdir.") from None
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


def read_config(workdir: str, config_type: type, writer: str = "this program") -> Any:
  """The ``config_type`` dataclass that workdir/config.json records (``record_config``'s; lists
  read back as tuples). A file that is missing, damaged, or holds fields the dataclass does not
  have is a ConfigError saying it was not written by ``writer``."""
  path = os.path.join(workdir, "config.json")
  recorded = read_json(path, f"restore it, or rerun {writer}")
  fields = {f.name for f in dataclasses.fields(config_type)}
  unknown = sorted(set(recorded) - fields) if isinstance(recorded, dict) else None
  if unknown:
    raise ConfigError(f"{path} has fields this version does not know: {unknown}.")
  try:
    return config_type(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in recorded.items()})
  except (TypeError, AttributeError) as e:
    raise ConfigError(f"{path} cannot be read as a configuration ({e}); it is damaged or was "
                      f"not written by {writer}.") from e


def as_json(config: Any) -> dict:
  """The config as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def read_json(path: str, remedy: str = "rerun the experiment that wrote it or remove it"):
  """The JSON in path; a file that cannot be read as JSON is a ConfigError saying ``remedy``."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} cannot be read as JSON ({e}); {remedy}.") from e


def is_primary() -> bool:
  """Whether this process writes the run's files (``parallel.is_primary``); before JAX is
  imported, a command is the only process."""
  if "jax" not in sys.modules:
    return True
  from iavae_jax import parallel  # pylint: disable=g-import-not-at-top  (imports JAX)
  return parallel.is_primary()


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


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
  """A Markdown table's lines: the header, the separator, a line per row (cells as str)."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


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


def save_learning_curves(workdir: str, title: str) -> None:
  """Draws WORKDIR/metrics.jsonl as WORKDIR/learning_curves.png (primary process only)."""
  if not is_primary():
    return
  from iavae_jax import plots, progress  # pylint: disable=g-import-not-at-top  (imports JAX)
  curves = progress.read_learning_curves(os.path.join(workdir, "metrics.jsonl"))
  save_figure(plots.learning_curves_figure(curves, title),
              os.path.join(workdir, "learning_curves.png"))


def environment(parallel) -> dict:
  """The run's software and hardware, recorded in its results (call after JAX has started)."""
  import jax  # pylint: disable=g-import-not-at-top
  import iavae_jax  # pylint: disable=g-import-not-at-top
  return {"iavae_jax": iavae_jax.__version__, "jax": jax.__version__,
          "python": platform.python_version(), "backend": jax.default_backend(),
          "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
          "parallel": "none" if parallel is None else parallel.mode,
          "machine": platform.machine(), "cpu_count": os.cpu_count()}


def write_results(workdir: str, results: dict, markdown: str, config: Any,
                  curves_title: str) -> None:
  """Ends a run: learning_curves.png (titled curves_title), results.md, the config record (see
  record_config) and, last, results.json in WORKDIR; then says so."""
  save_learning_curves(workdir, curves_title)
  write_text(os.path.join(workdir, "results.md"), markdown)
  record_config(workdir, config)
  write_json(os.path.join(workdir, "results.json"), results)
  print(f"wrote {workdir}/results.json, results.md and figures ({results['wall_seconds']:.1f} s)",
        flush=True)
