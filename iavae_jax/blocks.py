"""A parameter PyTree seen as blocks: one block per leaf (paper section 3.3.1).

Block l is leaf l of ``jax.tree.leaves(params)``, with d_l = leaf.size elements. A hypernetwork
emits one row of d_max = max_l d_l numbers per block; the first d_l of row l, reshaped to the
leaf's shape, are that block's delta (paper: ``h(x, e_l; psi)_{1:d_l}``).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Static description of a parameter tree's blocks (hashable: usable as a Flax field)."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def from_tree(cls, params: PyTree) -> "BlockLayout":
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
      raise ValueError("BlockLayout.from_tree: the parameter tree has no leaves.")
    return cls(treedef, tuple(tuple(np.shape(leaf)) for leaf in leaves))

  @property
  def num_blocks(self) -> int:
    return len(self.shapes)

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(shape) for shape in self.shapes)

  @property
  def d_max(self) -> int:
    return max(self.sizes)

  @property
  def num_params(self) -> int:
    return sum(self.sizes)

  def unflatten(self, rows: jax.Array) -> PyTree:
    """rows: [num_blocks, >= d_max] -> a tree shaped like the params (first d_l of row l)."""
    if rows.ndim != 2 or rows.shape[0] != self.num_blocks or rows.shape[1] < self.d_max:
      raise ValueError(f"BlockLayout.unflatten: expected rows of shape [{self.num_blocks}, "
                       f">={self.d_max}], got {rows.shape}.")
    leaves = [rows[l, :size].reshape(shape)
              for l, (size, shape) in enumerate(zip(self.sizes, self.shapes))]
    return jax.tree.unflatten(self.treedef, leaves)

  def flatten(self, params: PyTree) -> jax.Array:
    """The inverse of ``unflatten``: [num_blocks, d_max], each row zero-padded after d_l."""
    leaves = jax.tree.leaves(params)
    return jnp.stack([jnp.pad(jnp.ravel(leaf), (0, self.d_max - leaf.size)) for leaf in leaves])
