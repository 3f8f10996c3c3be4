"""Hypernetworks that emit per-block deltas for a frozen encoder's parameter tree.

``LinearHypernet`` is the synthetic experiment's (paper section 4.1); ``StructuredHypernet`` the
image experiments' (section 4.2), which cuts every block into slices, one per input feature
(``blocks.slicings``).
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax

from iavae_jax import blocks
from iavae_jax.blocks import BlockLayout, PyTree

# Per-block input-feature axes by block path (see ``blocks.slicings``); None: Flax's layout.
InputAxes = Mapping[str, Sequence[int]] | None


class _Hypernet(nn.Module):
  """What every hypernetwork has: the layout of the blocks it emits deltas for."""
  layout: BlockLayout

  def _check_example(self, c: jax.Array):
    if c.ndim != 1:
      raise ValueError(f"{type(self).__name__}: expected one example's input of shape [m], got "
                       f"{c.shape}; flatten it and vmap over the batch (see iavae_jax.adaptive).")

  def _block_embeddings(self, dim: int, init: nn.initializers.Initializer) -> jax.Array:
    """e_l for every block: [num_blocks, dim]."""
    return self.param("block_embeddings", init, (self.layout.num_blocks, dim))

  def _assemble(self, cuts: tuple[blocks.Slicing, ...], slices: list[jax.Array]) -> PyTree:
    """Every block's slices [n_l, d_l] -> a tree shaped like the encoder's parameters."""
    return jax.tree.unflatten(self.layout.treedef,
                              [cut.assemble(s) for cut, s in zip(cuts, slices)])


def _groups(cuts: tuple[blocks.Slicing, ...]) -> dict[str, tuple[int, int]]:
  """group -> (most slices of a block in it, largest slice in it), groups in sorted order."""
  return {group: (max(c.num_slices for c in cuts if c.group == group),
                  max(c.slice_size for c in cuts if c.group == group))
          for group in sorted({c.group for c in cuts})}


class LinearHypernet(_Hypernet):
  """The synthetic experiment's hypernetwork (paper section 4.1).

  For block l with embedding e_l: h(x, e_l) = W [x; e_l] + b, W: [d_max, d + l], b: [d_max];
  the first d_l outputs, reshaped, are block l's delta. W ~ N(0, init_std^2), b = 0, so at
  initialisation the deltas are ~init_std and the encoder starts at phi_AVI.

  Call on one example x: [d]; returns a tree shaped like the encoder's parameters.
  """
  embed_dim: int = 2
  init_std: float = 1e-3
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> PyTree:
    self._check_example(x)
    d_max = self.layout.d_max
    block_embeddings = self._block_embeddings(self.embed_dim, self.embedding_init)
    w = self.param("W", nn.initializers.normal(self.init_std),
                   (d_max, x.shape[0] + self.embed_dim))
    b = self.param("b", nn.initializers.zeros, (d_max,))
    # W [x; e_l] + b = W_x x + (W_e e_l + b): the x-part is shared by all blocks, so it is
    # computed once per example rather than once per block (same function, fewer FLOPs).
    w_x, w_e = w[:, :x.shape[0]], w[:, x.shape[0]:]
    rows = (w_x @ x)[None, :] + (block_embeddings @ w_e.T + b)   # [L, d_max]
    return self.layout.unflatten(rows)


class StructuredHypernet(_Hypernet):
  """The image experiments' hypernetwork (paper section 4.2): design "paper".

  Every block is cut into slices (``blocks.Slicing``); slice j of block l gets
      delta_{l,j} = (W_g [c; e_l; e_in_{g,j}] + b_g)[:d_l],
  with one output layer (W_g, b_g) per group g in {conv, dense}: W_g: [d_max_g, m + l + n], where
  d_max_g is the largest slice in the group. e_l (size ``block_embed_dim``, paper 16) is block l's
  embedding; e_in_{g,j} (size ``input_embed_dim``, paper 8) is the embedding of input index j,
  shared by the group's blocks. W_g ~ N(0, init_std^2), b_g = 0 (Proposition 1: the deltas start
  at ~init_std). Biases and batch-norm scales/offsets are blocks too (one slice each).

  As in LinearHypernet, W_g [c; e_l; e_in_j] is computed as W_x c + W_e e_l + W_in e_in_j: the
  c-part once per example, the rest once per call (vmap leaves it unbatched). So the
  x-dependent part of the delta, W_x c, is one vector per group: every slice of every block of
  the group gets its first d_l numbers.

  Call on one example's context c: [m] (e.g. the flattened image); returns a tree shaped like the
  encoder's parameters. ``input_axes`` names a block's input-feature axes where Flax's layout
  does not (``blocks.slicings``).
  """
  block_embed_dim: int = 16
  input_embed_dim: int = 8
  init_std: float = 1e-3
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
  input_axes: InputAxes = None

  @nn.compact
  def __call__(self, c: jax.Array) -> PyTree:
    self._check_example(c)
    cuts = blocks.slicings(self.layout, self.input_axes)
    block_embeddings = self._block_embeddings(self.block_embed_dim, self.embedding_init)
    m, l = c.shape[0], self.block_embed_dim
    out = {}
    for group, (n_max, d_max) in _groups(cuts).items():
      w = self.param(f"W_{group}", nn.initializers.normal(self.init_std),
                     (d_max, m + l + self.input_embed_dim))
      b = self.param(f"b_{group}", nn.initializers.zeros, (d_max,))
      input_embeddings = self.param(f"input_embeddings_{group}", self.embedding_init,
                                    (n_max, self.input_embed_dim))
      w_x, w_e, w_in = w[:, :m], w[:, m:m + l], w[:, m + l:]
      out[group] = (w_x @ c + b, block_embeddings @ w_e.T, input_embeddings @ w_in.T)
    slices = []
    for index, cut in enumerate(cuts):
      x_part, block_part, input_part = out[cut.group]
      n, d = cut.num_slices, cut.slice_size
      slices.append((x_part[:d] + block_part[index, :d])[None, :] + input_part[:n, :d])
    return self._assemble(cuts, slices)
