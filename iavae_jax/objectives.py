"""Variational objectives, batched by broadcasting.

q = N(mean, diag(exp(log_var))) with mean, log_var: [..., k] (any leading batch shape). A
likelihood is a function ``log_likelihood_fn(z) -> log p(x | z)`` taking samples z: [S, ..., k]
and returning [S, ...] (close over x and the decoder parameters). The noise eps: [S, ..., k] of
standard normal draws is an argument, so callers draw it in bulk (one draw per epoch is much
cheaper than one per step) or reuse it (common random numbers).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from iavae_jax import distributions

__all__ = ["LogLikelihoodFn", "ElboTerms", "elbo", "importance_log_weights", "iwae_bound"]

LogLikelihoodFn = Callable[[jax.Array], jax.Array]


class ElboTerms(NamedTuple):
  elbo: jax.Array                     # [...] E_q[log p(x|z)] - KL(q || p(z))
  expected_log_likelihood: jax.Array  # [...] Monte Carlo estimate of E_q[log p(x|z)]
  kl: jax.Array                       # [...] closed-form KL(q || N(0, I))


def _check_gaussian(fn: str, eps: jax.Array, mean: jax.Array, log_var: jax.Array) -> None:
  """Refuses mean and log_var of different shapes, or noise that does not broadcast against
  them to [S, *mean.shape] (S samples), naming the function and the arguments."""
  if jnp.shape(mean) != jnp.shape(log_var) or jnp.ndim(mean) == 0:
    raise ValueError(f"{fn}: mean and log_var must have the same shape [..., k], got "
                     f"{jnp.shape(mean)} and {jnp.shape(log_var)}.")
  try:
    broadcast = jnp.broadcast_shapes(jnp.shape(eps), jnp.shape(mean))
  except ValueError:
    broadcast = None
  if jnp.ndim(eps) < 2 or broadcast != (jnp.shape(eps)[0], *jnp.shape(mean)):
    raise ValueError(f"{fn}: eps must be [S, ..., k], S samples that broadcast against mean's "
                     f"{jnp.shape(mean)} to [S, {', '.join(map(str, jnp.shape(mean)))}], got "
                     f"{jnp.shape(eps)}.")


def elbo(eps: jax.Array, mean: jax.Array, log_var: jax.Array,
         log_likelihood_fn: LogLikelihoodFn) -> ElboTerms:
  """The ELBO with S = eps.shape[0] reparameterised samples per example (paper Algorithm 1)."""
  _check_gaussian("elbo", eps, mean, log_var)
  z = distributions.reparameterize(eps, mean, log_var)  # [S, ..., k]
  expected_ll = jnp.mean(log_likelihood_fn(z), axis=0)
  kl = distributions.kl_to_standard_normal(mean, log_var)
  return ElboTerms(expected_ll - kl, expected_ll, kl)


def importance_log_weights(eps: jax.Array, mean: jax.Array, log_var: jax.Array,
                           log_likelihood_fn: LogLikelihoodFn) -> jax.Array:
  """log p(x, z_k) - log q(z_k) for the samples z_k = mean + exp(log_var / 2) eps_k. Returns
  [K, ...]; callers that draw K in chunks concatenate these before the logsumexp."""
  _check_gaussian("importance_log_weights", eps, mean, log_var)
  z = distributions.reparameterize(eps, mean, log_var)  # [K, ..., k]
  return (log_likelihood_fn(z) + distributions.standard_normal_log_prob(z)
          - distributions.diag_gaussian_log_prob(z, mean, log_var))


def iwae_bound(eps: jax.Array, mean: jax.Array, log_var: jax.Array,
               log_likelihood_fn: LogLikelihoodFn) -> jax.Array:
  """log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q, K = eps.shape[0]: a bound on log p(x) that
  tightens as K grows (K = 1: a one-sample ELBO). Returns [...]."""
  log_weights = importance_log_weights(eps, mean, log_var, log_likelihood_fn)
  return jax.nn.logsumexp(log_weights, axis=0) - jnp.log(eps.shape[0])
