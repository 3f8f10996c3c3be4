"""What every command line shares: its flags (from a configuration's fields and for the
devices), and turning its errors into exit codes. The workdir contract is ``iavae_jax.runs``."""

import dataclasses
import sys
from typing import Any, Callable

from absl import app, flags, logging

from iavae_jax.errors import ConfigError, RunError


def define_run_flags() -> None:
  """The flags of every training command: how it uses the devices, NaN diagnosis, TensorBoard."""
  # A string, checked by parallel_from_flags: the modes' home, iavae_jax.parallel, imports JAX.
  flags.DEFINE_string("parallel", "none",
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
  flags.DEFINE_bool("tensorboard", False, "Also write every epoch's metrics as TensorBoard "
                    "event files under WORKDIR/tensorboard (needs the tensorboardX package).")


def parallel_from_flags():
  """The iavae_jax.parallel.Parallel the run flags ask for (after --distributed is applied)."""
  from iavae_jax import parallel  # pylint: disable=g-import-not-at-top  (imports JAX)
  if flags.FLAGS.parallel not in parallel.MODES:
    raise ConfigError(f"--parallel={flags.FLAGS.parallel} is not known; choose one of "
                      f"{', '.join(parallel.MODES)}.")
  return parallel.Parallel.create(flags.FLAGS.parallel)


def check_tensorboard() -> None:
  """Refuses --tensorboard without tensorboardX, before anything is written."""
  if not flags.FLAGS.tensorboard:
    return
  try:
    import tensorboardX  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f"--tensorboard writes through the tensorboardX package, which cannot be "
                      f"imported ({e}): pip install tensorboardX (or the package's "
                      "[tensorboard] extra), or leave out --tensorboard.") from e


def define_config_flags(config_type, exclude: tuple[str, ...] = (),
                        tiers: dict[str, Any] | None = None) -> None:
  """A flag per field of the dataclass ``config_type`` (but ``exclude``), named after it:
  booleans (--name / --noname), integers, floats and strings as such, tuples of integers or of
  strings as comma-separated lists. Each flag defaults to None: unset flags leave the
  configuration's value (see ``config_overrides``). Its help gives that value in each of
  ``tiers`` ({name: configuration}), or the dataclass's default."""
  for field in dataclasses.fields(config_type):
    if field.name in exclude:
      continue
    help_text = (f"Override the configuration's {field.name} ({_tier_values(field.name, tiers)})."
                 if tiers else f"Override the configuration's {field.name} (default "
                 f"{_flag_value(field.default)}).")
    if field.type is bool:
      flags.DEFINE_bool(field.name, None, help_text)
    elif field.type is int:
      flags.DEFINE_integer(field.name, None, help_text)
    elif field.type is float:
      flags.DEFINE_float(field.name, None, help_text)
    elif field.type is str:
      flags.DEFINE_string(field.name, None, help_text)
    else:
      kind = "names" if field.type == tuple[str, ...] else "integers"
      flags.DEFINE_list(field.name, None, help_text + f" Comma-separated {kind}.")


def _flag_value(value) -> str:
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _tier_values(name: str, tiers: dict[str, Any]) -> str:
  """'X in every tier', or 'tier X, tier Y, ...' where the tiers differ."""
  values = {tier: _flag_value(getattr(config, name)) for tier, config in tiers.items()}
  if len(set(values.values())) == 1:
    return f"{next(iter(values.values()))} in every tier"
  return "; ".join(f"{tier}: {value}" for tier, value in values.items())


def config_overrides(config_type, exclude: tuple[str, ...] = ()) -> dict:
  """The fields of ``config_type`` set by their flags (``define_config_flags``), as values of
  the field's type."""
  overrides = {}
  for field in dataclasses.fields(config_type):
    value = None if field.name in exclude else flags.FLAGS[field.name].value
    if value is None:
      continue
    if isinstance(value, list) and field.type == tuple[str, ...]:
      value = tuple(value)
    elif isinstance(value, list):
      try:
        value = tuple(int(v) for v in value)
      except ValueError as e:
        raise ConfigError(f"--{field.name} must be a comma-separated list of integers, got "
                          f"{','.join(value)}.") from e
    overrides[field.name] = value
  return overrides


def run_command(argv: list[str], body: Callable[[], Any]) -> None:
  """An absl main: refuses stray arguments and a missing --workdir, quiets Orbax's INFO logs
  (unless --verbosity is given), applies --debug_nans and --distributed and checks
  --tensorboard (if the command defines them), runs body(), and turns a ConfigError into
  "error: ..." on stderr and exit code 2, a RunError into the same with exit code 1."""
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
    if "workdir" in flags.FLAGS and not flags.FLAGS.workdir:
      raise ConfigError("--workdir is required (--help says what the command keeps there).")
    if "tensorboard" in flags.FLAGS:
      check_tensorboard()
    try:
      body()
    finally:   # before the interpreter shuts down (Orbax then refuses to start a save)
      if "iavae_jax.stages" in sys.modules:   # else no stage ran on another thread
        sys.modules["iavae_jax.stages"].Background.stop_unfinished()
  except (ConfigError, RunError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
