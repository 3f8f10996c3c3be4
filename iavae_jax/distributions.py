"""Diagonal Gaussians and observation likelihoods.

All densities sum over the trailing ``event_ndim`` axes and broadcast over the leading ones.
"""

import math

import jax
import jax.numpy as jnp

__all__ = ["LOG_2PI", "reparameterize", "diag_gaussian_sample", "diag_gaussian_log_prob",
           "standard_normal_log_prob", "kl_to_standard_normal", "gaussian_log_likelihood",
           "bernoulli_log_likelihood"]

LOG_2PI = math.log(2.0 * math.pi)


def _sum_event(values: jax.Array, event_ndim: int) -> jax.Array:
  return jnp.sum(values, axis=tuple(range(-event_ndim, 0))) if event_ndim else values


def reparameterize(eps: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """z = mean + exp(log_var / 2) * eps. eps: [S, ..., k] ~ N(0, I); returns [S, ..., k]."""
  return mean + jnp.exp(0.5 * log_var) * eps


def diag_gaussian_sample(key: jax.Array, mean: jax.Array, log_var: jax.Array,
                         num_samples: int) -> jax.Array:
  """Reparameterised samples. mean, log_var: [..., k]; returns [num_samples, ..., k]."""
  return reparameterize(jax.random.normal(key, (num_samples,) + mean.shape, mean.dtype),
                        mean, log_var)


def diag_gaussian_log_prob(z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """log N(z; mean, diag(exp(log_var))). z, mean, log_var: [..., k]; returns [...]."""
  return -0.5 * jnp.sum(LOG_2PI + log_var + (z - mean) ** 2 * jnp.exp(-log_var), axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I). z: [..., k]; returns [...]."""
  return -0.5 * jnp.sum(LOG_2PI + z**2, axis=-1)


def kl_to_standard_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(mean, diag(exp(log_var))) || N(0, I)) in closed form. [..., k] -> [...]."""
  return 0.5 * jnp.sum(jnp.exp(log_var) + mean**2 - 1.0 - log_var, axis=-1)


def gaussian_log_likelihood(x: jax.Array, mean: jax.Array, sigma: float,
                            event_ndim: int = 1) -> jax.Array:
  """log N(x; mean, sigma^2 I), normalising constant included."""
  log_density = -0.5 * ((x - mean) / sigma) ** 2 - jnp.log(sigma) - 0.5 * LOG_2PI
  return _sum_event(log_density, event_ndim)


def bernoulli_log_likelihood(x: jax.Array, logits: jax.Array, event_ndim: int = 1) -> jax.Array:
  """log Bernoulli(x; sigmoid(logits)) for x in {0, 1}, computed stably from logits."""
  return _sum_event(x * logits - jax.nn.softplus(logits), event_ndim)
