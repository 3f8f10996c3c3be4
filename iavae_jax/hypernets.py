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
