"""Training across devices with ``jax.sharding``: seed-parallel or data-parallel, one mesh axis.

  seeds : a population's models (seeds, widths) are split over the devices; each device trains
          its own models, nothing is communicated during training. The population is padded to
          a multiple of the device count with copies of its last model, which are dropped.
  data  : every batch is split over the devices along its example axis and the parameters are
          replicated; XLA sums the gradients across devices (batch-norm statistics too).
  none  : the default device, as without this module.

The same code runs on 1 device or many and across hosts: a ``Mesh`` over ``jax.devices()`` (all
processes' devices after ``jax.distributed.initialize``), arrays placed with
``jax.make_array_from_callback`` from the full host copy every process holds, and results
brought back with ``to_host`` (gathered across processes when needed). Nothing here depends on
the mode but placement: the jitted computations are the single-device ones, partitioned by XLA.
"""

import dataclasses
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iavae_jax.blocks import PyTree

__all__ = ["MODES", "AXIS", "is_primary", "to_host", "Parallel", "pad_models"]

MODES = ("none", "seeds", "data")
AXIS = "devices"


def is_primary() -> bool:
  """Whether this process writes a run's files: process 0 of a multi-host run, or the only one."""
  return jax.process_index() == 0


def _place(tree: PyTree, sharding_of) -> PyTree:
  """Every leaf as a global array with sharding_of(ndim), built from the host copy."""
  def place(leaf):
    host = np.asarray(to_host(leaf))
    return jax.make_array_from_callback(host.shape, sharding_of(host.ndim),
                                        lambda index: host[index])
  return jax.tree.map(place, tree)


def to_host(tree: PyTree) -> PyTree:
  """Every leaf as a NumPy array holding the whole value (gathered across processes if needed)."""
  def gather(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return jax.tree.map(gather, tree)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """How training uses the devices (hashable: jitted functions may close over it)."""
  mode: str = "none"
  mesh: Optional[Mesh] = None

  @classmethod
  def create(cls, mode: str, devices: Optional[list] = None) -> "Parallel":
    """A 1-D mesh over ``devices`` (default: every device of every process) for ``mode``."""
    if mode not in MODES:
      raise ValueError(f"parallel mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if mode == "none":
      return cls()
    devices = jax.devices() if devices is None else devices
    return cls(mode, Mesh(np.asarray(devices), (AXIS,)))

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def _sharding(self, *spec) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  def models(self, tree: PyTree, axis: int = 0) -> PyTree:
    """Per-model arrays (the model axis ``axis``): split over the devices in ``seeds`` mode (the
    model count must divide evenly: see ``pad_models``), replicated in ``data`` mode."""
    if self.mode == "seeds":
      return _place(tree, lambda ndim: self._sharding(*[None] * axis, AXIS))
    return self.shared(tree)

  def shared(self, tree: PyTree) -> PyTree:
    """Arrays every device needs whole (data sets, parameters in ``data`` mode): replicated."""
    if self.mesh is None:
      return tree
    return _place(tree, lambda ndim: self._sharding())

  def batch_sharding(self, example_axis: int, ndim: int) -> Optional[NamedSharding]:
    """In ``data`` mode, the sharding that splits an array of ``ndim`` axes along its example
    axis (for ``jax.lax.with_sharding_constraint`` inside a jitted epoch); else None."""
    if self.mode != "data":
      return None
    spec = [None] * ndim
    spec[example_axis] = AXIS
    return self._sharding(*spec)

  def padded_size(self, num_models: int) -> int:
    """The population size that splits evenly over the devices in ``seeds`` mode."""
    if self.mode != "seeds":
      return num_models
    return -(-num_models // self.num_devices) * self.num_devices


def pad_models(tree: PyTree, size: int, axis: int = 0) -> PyTree:
  """Pads the model axis to ``size`` with copies of the last model."""
  def pad(leaf):
    leaf = np.asarray(to_host(leaf))
    extra = size - leaf.shape[axis]
    last = np.take(leaf, [-1], axis=axis)
    return np.concatenate([leaf, np.repeat(last, extra, axis=axis)], axis=axis)
  return jax.tree.map(pad, tree)
