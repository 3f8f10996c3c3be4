"""The synthetic experiment's true generative model (paper section 4.1, after Kim et al. 2018).

z ~ N(0, I_2), x = f(z) + eps, eps ~ N(0, sigma^2 I_3), f(z) = A z + g(z),
A = [[1, 0], [0, 1], [1, 1]], g(z) = [0, 0, z1 z2].
"""

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import distributions

__all__ = ["A", "LATENT_DIM", "DATA_DIM", "decoder", "log_likelihood", "log_joint",
           "expected_log_likelihood", "exact_elbo"]

A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
LATENT_DIM = 2
DATA_DIM = 3


def _check_last_axes(fn: str, **arrays) -> None:
  """Each array's last axis is DATA_DIM (x) or LATENT_DIM (the others)."""
  for name, value in arrays.items():
    size = DATA_DIM if name == "x" else LATENT_DIM
    if jnp.ndim(value) < 1 or jnp.shape(value)[-1] != size:
      raise ValueError(f"{fn}: {name} must have shape [..., {size}], got {jnp.shape(value)}.")


def decoder(z: jax.Array) -> jax.Array:
  """f(z) = A z + g(z). z: [..., 2] -> [..., 3]."""
  _check_last_axes("decoder", z=z)
  z1, z2 = z[..., 0], z[..., 1]
  return jnp.stack([z1, z2, z1 + z2 + z1 * z2], axis=-1)


def log_likelihood(x: jax.Array, z: jax.Array, sigma: float) -> jax.Array:
  """log p(x | z) = log N(x; f(z), sigma^2 I). x: [..., 3], z: [..., 2] -> [...]."""
  _check_last_axes("log_likelihood", x=x, z=z)
  return distributions.gaussian_log_likelihood(x, decoder(z), sigma)


def log_joint(z: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  """log p(x, z) = log p(z) + log p(x | z): the unnormalised log posterior of z given x."""
  return distributions.standard_normal_log_prob(z) + log_likelihood(x, z, sigma)


def expected_log_likelihood(x: jax.Array, mean: jax.Array, log_var: jax.Array,
                            sigma: float) -> jax.Array:
  """E_{z ~ N(mean, diag(exp(log_var)))}[log p(x | z)] in closed form: no Monte Carlo noise.

  The third output is P - 1 with P = (1+z1)(1+z2), a product of independent Gaussians with means
  a = 1 + m1, b = 1 + m2: E[P] = ab, Var[P] = a^2 v2 + b^2 v1 + v1 v2, so
  E[(x3 + 1 - P)^2] = (x3 + 1 - ab)^2 + a^2 v2 + b^2 v1 + v1 v2 (written this way, not by
  expanding the square, to avoid cancellation in float32).
  x: [..., 3], mean, log_var: [..., 2] -> [...].
  """
  _check_last_axes("expected_log_likelihood", x=x, mean=mean, log_var=log_var)
  v = jnp.exp(log_var)
  m1, m2, v1, v2 = mean[..., 0], mean[..., 1], v[..., 0], v[..., 1]
  a, b = 1.0 + m1, 1.0 + m2
  squared_error = ((x[..., 0] - m1) ** 2 + v1 + (x[..., 1] - m2) ** 2 + v2
                   + (x[..., 2] + 1.0 - a * b) ** 2 + a**2 * v2 + b**2 * v1 + v1 * v2)
  return (-0.5 * squared_error / sigma**2 - DATA_DIM * jnp.log(sigma)
          - 0.5 * DATA_DIM * distributions.LOG_2PI)


def exact_elbo(x: jax.Array, mean: jax.Array, log_var: jax.Array, sigma: float) -> jax.Array:
  """The ELBO of q = N(mean, diag(exp(log_var))) for the oracle decoder, exactly.
  x: [..., 3], mean, log_var: [..., 2] -> [...]."""
  _check_last_axes("exact_elbo", x=x, mean=mean, log_var=log_var)
  return (expected_log_likelihood(x, mean, log_var, sigma)
          - distributions.kl_to_standard_normal(mean, log_var))
