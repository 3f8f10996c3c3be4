"""Hypernetworks that emit per-block deltas for a frozen encoder's parameter tree."""

import flax.linen as nn
import jax

from iavae_jax.blocks import BlockLayout, PyTree


class LinearHypernet(nn.Module):
  """The synthetic experiment's hypernetwork (paper section 4.1).

  For block l with embedding e_l: h(x, e_l) = W [x; e_l] + b, W: [d_max, d + l], b: [d_max];
  the first d_l outputs, reshaped, are block l's delta. W ~ N(0, init_std^2), b = 0, so at
  initialisation the deltas are ~init_std and the encoder starts at phi_AVI.

  Call on one example x: [d]; returns a tree shaped like the encoder's parameters.
  """
  layout: BlockLayout
  embed_dim: int = 2
  init_std: float = 1e-3
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> PyTree:
    if x.ndim != 1:
      raise ValueError(f"LinearHypernet: expected one example x of shape [d], got {x.shape}; "
                       "vmap over the batch (see iavae_jax.adaptive).")
    num_blocks, d_max = self.layout.num_blocks, self.layout.d_max
    block_embeddings = self.param("block_embeddings", self.embedding_init,
                                  (num_blocks, self.embed_dim))
    w = self.param("W", nn.initializers.normal(self.init_std),
                   (d_max, x.shape[0] + self.embed_dim))
    b = self.param("b", nn.initializers.zeros, (d_max,))
    # W [x; e_l] + b = W_x x + (W_e e_l + b): the x-part is shared by all blocks, so it is
    # computed once per example rather than once per block (same function, fewer FLOPs).
    w_x, w_e = w[:, :x.shape[0]], w[:, x.shape[0]:]
    rows = (w_x @ x)[None, :] + (block_embeddings @ w_e.T + b)   # [L, d_max]
    return self.layout.unflatten(rows)


def block_slices(shape: tuple[int, ...]) -> tuple[str, int, int]:
  """How StructuredHypernet cuts a block of this shape: (group, number of slices, slice size).

  conv kernel [kh, kw, C_in, C_out]: C_in slices of kh*kw*C_out (along the input channel, as in
  Ha et al.); dense kernel [d_in, d_out] (Flax layout): d_in slices of d_out, i.e. the paper's
  columns dW[:, j] of the [d_out, d_in] matrix; a vector (bias, batch-norm scale) [d]: one slice.
  """
  if len(shape) == 4:
    kh, kw, c_in, c_out = shape
    return "conv", c_in, kh * kw * c_out
  if len(shape) == 2:
    return "dense", shape[0], shape[1]
  if len(shape) == 1:
    return "dense", 1, shape[0]
  raise ValueError(f"StructuredHypernet: no slicing rule for a block of shape {shape}; "
                   "expected a conv kernel (4-D), a dense kernel (2-D) or a vector (1-D).")


def slices_to_block(slices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[num_slices, slice_size] -> the block's shape (the inverse of the cut in block_slices)."""
  if len(shape) == 4:
    kh, kw, c_in, c_out = shape
    return slices.reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3)
  return slices.reshape(shape)


class StructuredHypernet(nn.Module):
  """The image experiments' hypernetwork (paper section 4.2).

  Every block is cut into slices (``block_slices``); slice j of block l gets
      delta_{l,j} = (W_g [x; e_l; e_in_{g,j}] + b_g)[:d_l],
  with one output layer (W_g, b_g) per group g in {conv, dense}: W_g: [d_max_g, m + l + n], where
  d_max_g is the largest slice in the group. e_l (size ``block_embed_dim``, paper 16) is block l's
  embedding; e_in_{g,j} (size ``input_embed_dim``, paper 8) is the embedding of input index j,
  shared by the group's blocks. W_g ~ N(0, init_std^2), b_g = 0 (Proposition 1: the deltas start
  at ~init_std). Biases and batch-norm scales/offsets are blocks too (one slice each).

  init_std defaults to 1e-5, not the paper's 1e-3: the x-part of every conv slice's delta is the
  same vector, so it adds up over the input channels, and at 1e-3 the image encoder's mean moved
  by ~1,500x its norm at initialisation (paper architecture); at 1e-5, by ~0.07x.

  As in LinearHypernet, W_g [x; e_l; e_in_j] is computed as W_x x + W_e e_l + W_in e_in_j: the
  x-part once per example, the rest once per call (vmap leaves it unbatched).

  Call on one example x: [m] (for images, a row of ``adaptive.normalized_context``); returns a
  tree shaped like the encoder's parameters.
  """
  layout: BlockLayout
  block_embed_dim: int = 16
  input_embed_dim: int = 8
  init_std: float = 1e-5
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> PyTree:
    if x.ndim != 1:
      raise ValueError(f"StructuredHypernet: expected one example x of shape [m], got {x.shape}; "
                       "flatten it and vmap over the batch (see iavae_jax.adaptive).")
    cuts = [block_slices(shape) for shape in self.layout.shapes]
    block_embeddings = self.param("block_embeddings", self.embedding_init,
                                  (self.layout.num_blocks, self.block_embed_dim))
    m, l = x.shape[0], self.block_embed_dim
    out = {}
    for group in sorted({g for g, _, _ in cuts}):
      d_max = max(d for g, _, d in cuts if g == group)
      n_max = max(n for g, n, _ in cuts if g == group)
      w = self.param(f"W_{group}", nn.initializers.normal(self.init_std),
                     (d_max, m + l + self.input_embed_dim))
      b = self.param(f"b_{group}", nn.initializers.zeros, (d_max,))
      input_embeddings = self.param(f"input_embeddings_{group}", self.embedding_init,
                                    (n_max, self.input_embed_dim))
      w_x, w_e, w_in = w[:, :m], w[:, m:m + l], w[:, m + l:]
      out[group] = (w_x @ x + b, block_embeddings @ w_e.T, input_embeddings @ w_in.T)
    leaves = []
    for index, ((group, n, d), shape) in enumerate(zip(cuts, self.layout.shapes)):
      x_part, block_part, input_part = out[group]
      slices = (x_part[:d] + block_part[index, :d])[None, :] + input_part[:n, :d]
      leaves.append(slices_to_block(slices, shape))
    return jax.tree.unflatten(self.layout.treedef, leaves)
