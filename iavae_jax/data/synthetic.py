"""The synthetic data set of paper section 4.1: x = A z + g(z) + eps, z ~ N(0, I_2)."""

from typing import NamedTuple

import jax

from iavae_jax.models import oracle

__all__ = ["SyntheticData", "generate"]


class SyntheticData(NamedTuple):
  x: jax.Array       # [N, 3] observations
  z_true: jax.Array  # [N, 2] the latents that generated them


def generate(key: jax.Array, num_examples: int, sigma: float) -> SyntheticData:
  """Draws N examples from the oracle model with observation noise sigma."""
  if num_examples <= 0:
    raise ValueError(f"generate: num_examples must be positive, got {num_examples}.")
  if sigma <= 0:
    raise ValueError(f"generate: sigma must be positive, got {sigma}.")
  z_key, eps_key = jax.random.split(key)
  z = jax.random.normal(z_key, (num_examples, oracle.LATENT_DIM))
  eps = sigma * jax.random.normal(eps_key, (num_examples, oracle.DATA_DIM))
  return SyntheticData(oracle.decoder(z) + eps, z)
