"""The errors a run can stop with, shared by the library and the command lines.

A command line turns a ``ConfigError`` into "error: ..." on stderr and exit code 2, and a
``RunError`` into the same with exit code 1 (``experiments.common.run_command``).
"""

__all__ = ["ConfigError", "RunError", "Cancelled"]


class ConfigError(ValueError):
  """Bad input: the message names the argument, flag or file and says how to fix it."""


class RunError(RuntimeError):
  """A run that cannot go on (it diverged, the disk is full): what happened, what was kept, what
  to do."""


class Cancelled(Exception):
  """Raised by work that was asked to stop (``stages.run_stage``'s ``cancelled``)."""
