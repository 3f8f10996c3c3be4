"""The decoder's feedback on the encoder's current guess, as an input for amortized inference.

For an example x, a decoder log p(x | z) and the current q = N(mean, diag(exp(log_var))), i.e.
lambda = (mean, log_var) [k] each:
  gradient: g = d ELBO(x; lambda) / d lambda, reparameterised with S fixed noise draws
            (``elbo_gradient``), then ``preprocess_gradient``: log|g| and sign g, so that its
            scale does not matter (Andrychowicz et al. 2016, as Marino, Yue and Mandt 2018 feed
            it to iterative amortized inference): 2 S decoder passes (S forward, S backward);
  residual: x - E[x | z = mean] (``residual``): one decoder forward.
Neither carries a gradient back into what is trained (``jax.lax.stop_gradient``).

Two ways to use it, each in ``num_passes`` passes (feedback recomputed at each pass's output):
  ``modulated.iterative_encode``: a hypernetwork adds a delta to the encoder's parameters per
      pass (the IA-VAE form);
  ``iterative_correct`` with a ``Corrector``: a network adds a correction to (mean, log_var)
      per pass (Marino et al.'s iterative amortized inference, no hypernetwork).
``context`` builds either's input: [a feature of x; mean; log_var; the feedback].
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from iavae_jax import objectives
from iavae_jax.hparams import FEEDBACKS

__all__ = ["FEEDBACKS", "elbo_gradient", "preprocess_gradient", "residual", "context",
           "decoder_passes", "Corrector", "iterative_correct"]


def elbo_gradient(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                  log_var: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """d ELBO / d (mean, log_var) of every example, with the noise eps [S, k] (the same draws for
  every example) or [S, B, k]. mean, log_var: [B, k]; log_likelihood_fn(z [S, B, k]) -> [S, B].
  Returns (g_mean, g_log_var) [B, k], through which no gradient flows."""
  if mean.ndim != 2 or log_var.shape != mean.shape:
    raise ValueError(f"elbo_gradient: mean and log_var must both be [B, k], got {mean.shape} "
                     f"and {log_var.shape}.")
  if eps.ndim == 2:
    eps = jnp.broadcast_to(eps[:, None, :], (eps.shape[0], *mean.shape))
  if eps.shape[1:] != mean.shape:
    raise ValueError(f"elbo_gradient: eps must be [S, k] or [S, B, k] with [B, k] = "
                     f"{mean.shape}, got {eps.shape}.")
  # The examples' ELBOs are independent, so the gradient of their sum is each one's own.
  total = lambda m, v: jnp.sum(objectives.elbo(eps, m, v, log_likelihood_fn).elbo)
  grads = jax.grad(total, argnums=(0, 1))(jax.lax.stop_gradient(mean),
                                          jax.lax.stop_gradient(log_var))
  return jax.lax.stop_gradient(grads)


def preprocess_gradient(g: jax.Array, p: float = 10.0) -> jax.Array:
  """g [..., k] -> [..., 2k]: (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g)
  (Andrychowicz et al. 2016): each half in [-1, 1] for any gradient of at most e^p."""
  large = jnp.abs(g) >= jnp.exp(-p)
  magnitude = jnp.where(large, jnp.log(jnp.maximum(jnp.abs(g), jnp.exp(-p))) / p, -1.0)
  direction = jnp.where(large, jnp.sign(g), jnp.exp(p) * g)
  return jnp.concatenate([magnitude, direction], axis=-1)


def residual(x: jax.Array, decoder_mean: jax.Array) -> jax.Array:
  """x - the decoder's mean at the current guess (E[x | z], or for an autoregressive decoder its
  per-pixel mean given the pixels before): [B, ...] -> [B, d] flattened, through which no
  gradient flows."""
  return jax.lax.stop_gradient((x - decoder_mean).reshape(x.shape[0], -1))


def context(x_feature: jax.Array, mean: jax.Array, log_var: jax.Array,
            feedback: jax.Array) -> jax.Array:
  """The input of a feedback-driven inference network: [x_feature; mean; log_var; feedback],
  each [B, ...] -> [B, m]."""
  return jnp.concatenate([a.reshape(a.shape[0], -1)
                          for a in (x_feature, mean, log_var, feedback)], axis=-1)


def decoder_passes(feedback: str | None, num_passes: int, num_samples: int) -> int:
  """Decoder passes per example (a forward or a backward pass of one sample counting one) that
  ``num_passes`` passes of this feedback cost: gradient 2 S per pass, residual 1, none 0."""
  if feedback is None:
    return 0
  if feedback not in FEEDBACKS:
    raise ValueError(f"decoder_passes: feedback={feedback!r} is not one of "
                     f"{', '.join(FEEDBACKS)} (or None).")
  return num_passes * (2 * num_samples if feedback == "gradient" else 1)


class Corrector(nn.Module):
  """A correction of (mean, log_var) from a feedback context: c [B, m] -> (d_mean, d_log_var)
  [B, latent_dim] each, through ``len(hidden)`` ELU layers. The output layer starts at zero, so
  at initialisation the correction is 0 (the inference starts at the base encoder's output)."""
  latent_dim: int
  hidden: tuple[int, ...] = (256, 256)

  @nn.compact
  def __call__(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = c
    for width in self.hidden:
      h = nn.elu(nn.Dense(width)(h))
    out = nn.Dense(2 * self.latent_dim, kernel_init=nn.initializers.zeros, name="out")(h)
    return out[:, :self.latent_dim], out[:, self.latent_dim:]


def iterative_correct(corrector_apply: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                      mean: jax.Array, log_var: jax.Array,
                      context_fn: Callable[[int, jax.Array, jax.Array], jax.Array],
                      num_passes: int = 1) -> tuple[jax.Array, jax.Array]:
  """Iterative amortized inference from (mean_0, log_var_0) [B, k]: for t = 1 .. T,
  lambda_t = lambda_{t-1} + corrector(context_fn(t, lambda_{t-1})), no gradient flowing into the
  context. Returns (mean_T, log_var_T)."""
  if num_passes < 1:
    raise ValueError(f"iterative_correct: num_passes must be at least 1, got {num_passes}.")
  for t in range(1, num_passes + 1):
    d_mean, d_log_var = corrector_apply(jax.lax.stop_gradient(context_fn(t, mean, log_var)))
    mean, log_var = mean + d_mean, log_var + d_log_var
  return mean, log_var
