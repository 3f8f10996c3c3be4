"""A parameter PyTree seen as blocks: one block per leaf (paper section 3.3.1).

Block l is leaf l of ``jax.tree.leaves(params)``, with d_l = leaf.size elements. A hypernetwork
emits one row of d_max = max_l d_l numbers per block; the first d_l of row l, reshaped to the
leaf's shape, are that block's delta (paper: ``h(x, e_l; psi)_{1:d_l}``).

The image hypernetworks emit a block slice by slice instead, one slice per input feature
(paper section 4.2, after Ha et al.): ``Slicing`` and ``slicings``.

A hypernetwork may adapt some blocks only: laid out over ``select(params, pattern)``, the
sub-tree of the blocks whose paths match, it leaves every other block at phi_AVI's value.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PyTree", "BlockLayout", "select", "input_feature_axes", "Slicing", "slicings"]

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

  @property
  def paths(self) -> tuple[str, ...]:
    """Each block's path in the tree, its keys joined by "/" (e.g. "Conv_0/kernel")."""
    keyed, _ = jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(self.treedef, range(self.num_blocks)))
    return tuple(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in keyed)

  def unflatten(self, rows: jax.Array) -> PyTree:
    """rows: [num_blocks, >= d_max] -> a tree shaped like the params (first d_l of row l)."""
    if rows.ndim != 2 or rows.shape[0] != self.num_blocks or rows.shape[1] < self.d_max:
      raise ValueError(f"BlockLayout.unflatten: expected rows of shape [{self.num_blocks}, "
                       f">={self.d_max}], got {rows.shape}.")
    leaves = [rows[l, :size].reshape(shape)
              for l, (size, shape) in enumerate(zip(self.sizes, self.shapes))]
    return jax.tree.unflatten(self.treedef, leaves)

  def check_within(self, owner: str, params: PyTree) -> "BlockLayout":
    """params' layout, which must hold every block of this one at its path with its shape (this
    layout is params' or a ``select`` of it); raises ValueError, naming the first block that
    differs, otherwise."""
    full = BlockLayout.from_tree(params)
    shapes = dict(zip(full.paths, full.shapes))
    for path, shape in zip(self.paths, self.shapes):
      if shapes.get(path) != shape:
        raise ValueError(
            f"{owner}: the hypernetwork's block {path!r} {shape} is "
            f"{'not in' if path not in shapes else f'{shapes[path]} in'} the encoder's "
            f"parameters (blocks {', '.join(full.paths)}); lay it out over "
            "BlockLayout.from_tree(phi_avi), or over blocks.select(phi_avi, pattern).")
    return full

  def add_to(self, params: PyTree, values: Sequence[jax.Array]) -> PyTree:
    """params with values[l] added to the block at this layout's path l (this layout params'
    or a ``select`` of it: ``check_within``), every other block as it is."""
    full = BlockLayout.from_tree(params)
    added = dict(zip(self.paths, values))
    return jax.tree.unflatten(full.treedef, [leaf + added[path] if path in added else leaf
                                             for path, leaf in zip(full.paths,
                                                                   jax.tree.leaves(params))])

  def flatten(self, params: PyTree) -> jax.Array:
    """The inverse of ``unflatten``: [num_blocks, d_max], each row zero-padded after d_l."""
    leaves = jax.tree.leaves(params)
    return jnp.stack([jnp.pad(jnp.ravel(leaf), (0, self.d_max - leaf.size)) for leaf in leaves])


def _key(entry) -> Any:
  """A path entry's key (DictKey, SequenceKey or GetAttrKey) as a dict key."""
  for name in ("key", "idx", "name"):
    if hasattr(entry, name):
      return getattr(entry, name)
  raise ValueError(f"select: cannot rebuild a tree with the path entry {entry!r}.")


def select(params: PyTree, pattern: str, owner: str = "select") -> PyTree:
  """The blocks of params whose paths (``BlockLayout.paths``, e.g. "mean/kernel") match the
  regular expression ``pattern`` (``re.search``), as nested dicts holding only them: the layout
  for a hypernetwork that adapts those blocks alone. "" selects every block (params itself).
  Raises ValueError, its message starting with ``owner`` (e.g. the flag that set the pattern),
  for a pattern that is not a regular expression or matches no block."""
  if not pattern:
    return params
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{owner}: {pattern!r} is not a regular expression ({e}).") from None
  chosen = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if regex.search(jax.tree_util.keystr(path, simple=True, separator="/")):
      node = chosen
      for entry in path[:-1]:
        node = node.setdefault(_key(entry), {})
      node[_key(path[-1])] = leaf
  if not chosen:
    raise ValueError(f"{owner}: no block path matches {pattern!r}; the paths are "
                     f"{', '.join(BlockLayout.from_tree(params).paths)}.")
  return chosen


def input_feature_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The axis of a block that indexes its input features, by Flax's layout.

  A kernel of rank >= 2 holds its input features on its second-to-last axis: nn.Conv of any
  spatial rank ([*spatial, C_in, C_out]), nn.Dense ([d_in, d_out]) and nn.DenseGeneral with one
  output axis ([*in, d_out]: the last input axis; the others then lie inside each slice). A
  vector (bias, normalisation scale or offset) or a scalar has none: it is one slice. A kernel
  whose input axes are elsewhere (DenseGeneral with several output axes, e.g. an attention
  projection [d_model, heads, head_dim]) needs its axes named (``slicings``' ``input_axes``).
  """
  return (len(shape) - 2,) if len(shape) >= 2 else ()


@dataclasses.dataclass(frozen=True)
class Slicing:
  """A block of ``shape`` cut into slices, one per input feature.

  The slices are indexed by the block's ``input_axes`` (several: flattened in order) and hold
  its other axes (flattened in order): a conv kernel [kh, kw, C_in, C_out] with input axis 2 has
  C_in slices of kh * kw * C_out, slice j being kernel[:, :, j, :] (Ha et al.'s slices); a dense
  kernel [d_in, d_out] has d_in slices of d_out (the paper's columns dW[:, j] of the [d_out,
  d_in] matrix); a vector [d] is one slice of d, a scalar one slice of 1.

  ``group`` pairs blocks of a similar kind, which share a hypernetwork's output layer: "conv"
  for rank >= 3 (conv kernels, multi-axis DenseGeneral kernels), "dense" for the rest.
  """
  shape: tuple[int, ...]
  input_axes: tuple[int, ...]

  @property
  def group(self) -> str:
    return "conv" if len(self.shape) >= 3 else "dense"

  @property
  def _order(self) -> tuple[int, ...]:
    return self.input_axes + tuple(a for a in range(len(self.shape)) if a not in self.input_axes)

  @property
  def num_slices(self) -> int:
    return math.prod(self.shape[a] for a in self.input_axes)

  @property
  def slice_size(self) -> int:
    return math.prod(self.shape) // self.num_slices if self.num_slices else 0

  def cut(self, block: jax.Array) -> jax.Array:
    """block: ``shape`` -> slices [num_slices, slice_size]."""
    return jnp.transpose(block, self._order).reshape(self.num_slices, self.slice_size)

  def assemble(self, slices: jax.Array) -> jax.Array:
    """slices [num_slices, slice_size] -> the block (the inverse of ``cut``)."""
    block = slices.reshape(tuple(self.shape[a] for a in self._order))
    return jnp.transpose(block, np.argsort(self._order))


def slicings(layout: BlockLayout,
             input_axes: Mapping[str, Sequence[int]] | None = None) -> tuple[Slicing, ...]:
  """How every block of ``layout`` is cut: ``input_feature_axes`` of its shape, or the axes
  that ``input_axes`` gives for its path (``layout.paths``)."""
  input_axes = dict(input_axes or {})
  unknown = sorted(set(input_axes) - set(layout.paths))
  if unknown:
    raise ValueError(f"slicings: input_axes names {unknown}, which are not blocks of the "
                     f"layout; its blocks are {list(layout.paths)}.")
  result = []
  for path, shape in zip(layout.paths, layout.shapes):
    if path not in input_axes:
      result.append(Slicing(shape, input_feature_axes(shape)))
      continue
    axes = tuple(input_axes[path])
    if (any(not -len(shape) <= a < len(shape) for a in axes)
        or len({a % len(shape) for a in axes}) != len(axes)):
      raise ValueError(f"slicings: input_axes[{path!r}] = {axes} does not fit the block's shape "
                       f"{shape}; give distinct axes in [-{len(shape)}, {len(shape)}), those "
                       "that index the block's input features.")
    result.append(Slicing(shape, tuple(a % len(shape) for a in axes)))
  return tuple(result)
