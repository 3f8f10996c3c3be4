"""Encoders mapping x to the mean and log-variance of a diagonal Gaussian q(z|x)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from iavae_jax.blocks import PyTree


class MLPEncoder(nn.Module):
  """One hidden ReLU layer of width ``hidden``, one output layer giving mean and log-variance.

  x: [..., d] -> (mean [..., k], log_var [..., k]). Parameters: (d + 1) h + (h + 1) 2k;
  for d = 3, k = 2 that is 8h + 4 (h = 2: the paper's 20-parameter encoder).
  """
  hidden: int
  latent_dim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.relu(nn.Dense(self.hidden)(x))
    out = nn.Dense(2 * self.latent_dim)(h)
    return out[..., :self.latent_dim], out[..., self.latent_dim:]


def pad_hidden(params: PyTree, width: int) -> PyTree:
  """Embed an MLPEncoder's params in a wider one by appending zero hidden units.

  A zero unit has zero input weights, bias and output weights, so its activation is relu(0) = 0
  and every gradient reaching its weights is zero: the padded network computes the same function,
  and under Adam (zero gradient -> zero update) it trains exactly as the narrow one. This lets
  encoders of different widths train side by side in one vmap.
  """
  hidden = params["Dense_0"]["kernel"].shape[-1]
  if width < hidden:
    raise ValueError(f"pad_hidden: width {width} is smaller than the encoder's {hidden}.")
  pad = width - hidden
  return {
      "Dense_0": {"kernel": jnp.pad(params["Dense_0"]["kernel"], ((0, 0), (0, pad))),
                  "bias": jnp.pad(params["Dense_0"]["bias"], (0, pad))},
      "Dense_1": {"kernel": jnp.pad(params["Dense_1"]["kernel"], ((0, pad), (0, 0))),
                  "bias": params["Dense_1"]["bias"]},
  }
