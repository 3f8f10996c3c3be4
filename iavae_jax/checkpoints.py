"""Orbax checkpoints of training states (stage 1 VAEs, stage 2 IA-VAEs, any population).

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves no checkpoint that reads as valid; ``latest_step`` only sees finished ones.
Resume state is kept by step (the latest is always kept); best-model selection lives inside the
state (``TrainState.best_params``), never in which checkpoints survive: a manager that keeps the
best by a metric deletes the latest checkpoint when its metric is worse, and resume would go back.
"""

import os
import threading
from typing import Optional

import jax
import orbax.checkpoint as ocp

from iavae_jax.blocks import PyTree
from iavae_jax.errors import ConfigError

__all__ = ["Checkpointer", "read_latest"]

# Orbax's managers share process-wide state: two saving at once from two threads (two stages
# training side by side) broke a checkpoint. Every Orbax call here holds this lock.
_ORBAX = threading.RLock()


class Checkpointer:
  """Saves and restores one PyTree per step under ``directory``, keeping the newest few. Safe to
  use from several threads (their calls run one at a time)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    with _ORBAX:
      self._manager = ocp.CheckpointManager(
          os.path.abspath(directory),
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    with _ORBAX:
      return self._manager.latest_step()

  def save(self, step: int, tree: PyTree) -> None:
    """Saves and waits until the checkpoint is complete on disk."""
    with _ORBAX:
      self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
      self._manager.wait_until_finished()

  def restore(self, like: Optional[PyTree] = None, step: Optional[int] = None) -> PyTree:
    """Restores ``step`` (default: the latest) into a tree with the structure of ``like``, or
    (None) as it was saved: nested dicts of NumPy arrays, for reading a checkpoint whose
    structure is not known beforehand."""
    with _ORBAX:
      step = self.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
      abstract = (None if like is None
                  else jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    with _ORBAX:
      self._manager.close()


def read_latest(directory: str) -> tuple[PyTree, int]:
  """The latest complete checkpoint under ``directory`` as it was saved (nested dicts of NumPy
  arrays: for a checkpoint whose structure is not known beforehand), and its step. A directory
  that is missing, holds no complete checkpoint or one that cannot be read is a ConfigError
  naming it."""
  if not os.path.isdir(directory):
    raise ConfigError(f"{directory} does not exist: no checkpoint to read.")
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"{directory} holds no complete checkpoint: rerun the training that "
                        "writes it.")
    return ckpt.restore(step=step), step
  except ConfigError:
    raise
  except Exception as e:  # orbax raises several types for damaged files
    raise ConfigError(f"the checkpoint in {directory} cannot be read ({type(e).__name__}: "
                      f"{str(e)[:300]}); delete its step's directory to read the one before, "
                      "or rerun the training that writes it.") from e
  finally:
    ckpt.close()
