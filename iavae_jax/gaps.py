"""Inference gaps of a fixed decoder (Cremer, Li and Duvenaud 2018) and test-time refinement
(semi-amortised variational inference, Kim et al. 2018), for any decoder.

For one example x, a fixed decoder and q = N(mean, diag(exp(log_var))) over z [k]:

  log p(x) - L[q] = (log p(x) - L[q*]) + (L[q*] - L[q])
                  =  approximation gap  +  amortization gap,

where q* is the best diagonal Gaussian for this one x, found by optimisation from the encoder's
output (``optimize_gaussian``), and log p(x) is estimated by importance sampling with q* as the
proposal (``log_px_estimate``).

Every function is written for one example: the decoder enters as ``log_likelihood_fn(z [S, k])
-> log p(x | z) [S]`` (an ``objectives.LogLikelihoodFn`` that closes over x and the decoder's
parameters). vmap over examples and jit at the call site; the settings are static. Random inputs
come as keys; large sample counts are drawn ``sample_chunk`` samples per decoder call.

Convergence rule for q*: L[q*] counts as converged when the optimisation rerun with
``QStarSettings.doubled()`` (twice the patience and twice max_steps, the same key: the longer run
replays the shorter one and goes on) moves the mean of L[q*] over the examples by less than
``CONVERGENCE_TOLERANCE`` nats, both estimated with the same final noise.
"""

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from iavae_jax import objectives

CONVERGENCE_TOLERANCE = 0.05   # nats, on the mean of L[q*] over the examples


def _positive(owner: str, **values) -> None:
  for name, value in values.items():
    if not 0 < value < float("inf"):
      raise ValueError(f"{owner}.{name} must be positive and finite, got {value}.")


@dataclasses.dataclass(frozen=True)
class QStarSettings:
  """How q* is found. The defaults are Cremer et al.'s (Adam 1e-3, 50 samples per step, a check
  every 100 steps, stop after 10 checks without improvement), with two differences: a check is a
  fixed-noise ELBO estimate of the current (mean, log_var) (theirs: the mean training loss of the
  last 100 steps), and max_steps caps the run (theirs ran until the patience ran out)."""
  learning_rate: float = 1e-3   # Adam
  samples_per_step: int = 50    # reparameterised samples in each step's ELBO
  check_every: int = 100        # steps between checks
  check_samples: int = 100      # samples of the check's ELBO estimate (the same at every check)
  patience: int = 10            # checks without improvement before stopping
  max_steps: int = 100_000      # at most this many steps (rounded up to a whole check)
  sample_chunk: int = 100       # samples per decoder call in the check

  def validate(self) -> "QStarSettings":
    _positive("QStarSettings", learning_rate=self.learning_rate,
              samples_per_step=self.samples_per_step, check_every=self.check_every,
              check_samples=self.check_samples, patience=self.patience,
              max_steps=self.max_steps, sample_chunk=self.sample_chunk)
    _chunk_size(self.check_samples, self.sample_chunk, "QStarSettings.check_samples")
    return self

  def doubled(self) -> "QStarSettings":
    """The settings of the convergence check: twice the patience and twice max_steps."""
    return dataclasses.replace(self, patience=2 * self.patience, max_steps=2 * self.max_steps)


# SA-VAE's refinement (harvardnlp/sa-vae, train_img.py and optim_n2n.py at test time): SGD with
# momentum 0.5 and learning rate 1 on the mean negative ELBO of a batch of 50 examples, one
# sample per step, each of the batch's two [50, k] gradients (mean, log-variance) clipped to norm
# 5. Per example, independent of any batch, that is learning rate 1/50 on the example's own
# negative ELBO, and (for a batch whose examples' gradients have equal norms) a clip at 5 sqrt(50)
# of each of the example's two gradients.
SA_VAE_BATCH_SIZE = 50


@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """Test-time refinement of (mean, log_var) by gradient ascent on the ELBO (defaults: SA-VAE's
  settings per example, see SA_VAE_BATCH_SIZE)."""
  learning_rate: float = 1.0 / SA_VAE_BATCH_SIZE
  momentum: float = 0.5                                  # heavy ball, as optax.sgd
  max_grad_norm: float = 5.0 * math.sqrt(SA_VAE_BATCH_SIZE)  # each of the two gradients
  samples_per_step: int = 1

  def validate(self) -> "RefineSettings":
    _positive("RefineSettings", learning_rate=self.learning_rate,
              max_grad_norm=self.max_grad_norm, samples_per_step=self.samples_per_step)
    if not 0 <= self.momentum < 1:
      raise ValueError(f"RefineSettings.momentum must be in [0, 1), got {self.momentum}.")
    return self


def _chunk_size(num_samples: int, sample_chunk: int, name: str = "num_samples") -> int:
  """Samples per decoder call: sample_chunk, or num_samples when that is smaller."""
  if num_samples <= 0 or sample_chunk <= 0:
    raise ValueError(f"{name} and sample_chunk must be positive, got {num_samples} and "
                     f"{sample_chunk}.")
  chunk = min(sample_chunk, num_samples)
  if num_samples % chunk:
    raise ValueError(f"{name}={num_samples} must be a multiple of sample_chunk={sample_chunk} "
                     "(or at most it), so that every decoder call draws as many samples.")
  return chunk


def _map_chunks(fn, key: jax.Array, num_samples: int, sample_chunk: int,
                latent_shape: tuple) -> jax.Array:
  """fn(eps [c, k]) over num_samples / c chunks of fresh standard normal noise, one decoder call
  per chunk (c: ``_chunk_size``). Returns fn's outputs stacked: [num_samples / c, ...]."""
  chunk = _chunk_size(num_samples, sample_chunk)
  keys = jax.random.split(key, num_samples // chunk)
  return jax.lax.map(lambda k: fn(jax.random.normal(k, (chunk, *latent_shape))), keys)


def elbo_estimate(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                  log_var: jax.Array, key: jax.Array, num_samples: int,
                  sample_chunk: int = 100) -> jax.Array:
  """L[q]: the ELBO of q = N(mean, diag(exp(log_var))) with num_samples reparameterised samples
  (KL in closed form). mean, log_var: [k] -> scalar."""
  per_chunk = _map_chunks(
      lambda eps: objectives.elbo(eps, mean, log_var, log_likelihood_fn).elbo, key, num_samples,
      sample_chunk, mean.shape)
  return jnp.mean(per_chunk)   # chunks of equal size


def log_px_estimate(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                    log_var: jax.Array, key: jax.Array, num_samples: int = 5000,
                    sample_chunk: int = 100) -> jax.Array:
  """log p^(x) = log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q = N(mean, diag(exp(log_var))),
  K = num_samples (the IWAE bound; with q = q*, Cremer et al.'s estimate). [k] -> scalar."""
  log_weights = _map_chunks(
      lambda eps: objectives.importance_log_weights(eps, mean, log_var, log_likelihood_fn), key,
      num_samples, sample_chunk, mean.shape)
  return jax.nn.logsumexp(log_weights.reshape(-1)) - jnp.log(num_samples)


def _negative_elbo(log_likelihood_fn: objectives.LogLikelihoodFn):
  """(params = (mean, log_var), eps [S, k]) -> -ELBO: the objective q* and refinement descend."""
  return lambda params, eps: -objectives.elbo(eps, *params, log_likelihood_fn).elbo


class QStar(NamedTuple):
  mean: jax.Array         # [k] the best (mean, log_var) seen at a check
  log_var: jax.Array      # [k]
  steps: jax.Array        # Adam steps taken (int32, a multiple of check_every)
  check_value: jax.Array  # its fixed-noise ELBO estimate (biased up by the selection: report a
                          # fresh estimate, ``elbo_estimate`` with another key)


class _Search(NamedTuple):
  params: tuple
  opt_state: optax.OptState
  steps: jax.Array
  best_params: tuple
  best_value: jax.Array
  stale: jax.Array        # checks since the last improvement


def optimize_gaussian(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                      log_var: jax.Array, key: jax.Array,
                      settings: QStarSettings = QStarSettings()) -> QStar:
  """q*: the diagonal Gaussian that maximises this example's ELBO, by Adam from (mean, log_var)
  [k] (the encoder's output).

  Every ``check_every`` steps the ELBO of the current parameters is estimated with the same
  ``check_samples`` samples; the best parameters so far are kept, and the search stops after
  ``patience`` checks without improvement or at ``max_steps``. The start is the first check's
  candidate, so q* is never worse than it on the check's noise. A non-finite check value counts
  as no improvement.
  """
  settings.validate()
  optimizer = optax.adam(settings.learning_rate)
  negative_elbo = _negative_elbo(log_likelihood_fn)
  step_key, check_key = jax.random.split(key)
  check = lambda params: elbo_estimate(log_likelihood_fn, *params, check_key,
                                       settings.check_samples, settings.sample_chunk)
  max_checks = -(-settings.max_steps // settings.check_every)

  def adam_step(carry, step):
    params, opt_state = carry
    eps = jax.random.normal(jax.random.fold_in(step_key, step),
                            (settings.samples_per_step, *mean.shape))
    updates, opt_state = optimizer.update(jax.grad(negative_elbo)(params, eps), opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  def search(s: _Search) -> _Search:
    (params, opt_state), _ = jax.lax.scan(adam_step, (s.params, s.opt_state),
                                          s.steps + jnp.arange(settings.check_every))
    value = check(params)
    better = value > s.best_value   # False for NaN
    return _Search(params, opt_state, s.steps + settings.check_every,
                   jax.tree.map(lambda new, old: jnp.where(better, new, old), params,
                                s.best_params),
                   jnp.where(better, value, s.best_value), jnp.where(better, 0, s.stale + 1))

  def searching(s: _Search) -> jax.Array:
    return (s.stale < settings.patience) & (s.steps < max_checks * settings.check_every)

  start = (mean, log_var)
  found = jax.lax.while_loop(searching, search, _Search(
      start, optimizer.init(start), jnp.int32(0), start, check(start), jnp.int32(0)))
  return QStar(*found.best_params, found.steps, found.best_value)


class Refined(NamedTuple):
  mean: jax.Array     # [C, k] after each requested number of steps
  log_var: jax.Array  # [C, k]


def _clip_norm(g: jax.Array, max_norm: float) -> jax.Array:
  """g scaled to norm max_norm if longer (as SA-VAE's clip_grad_norm)."""
  return g * jnp.minimum(1.0, max_norm / (jnp.linalg.norm(g) + 1e-6))


def refine(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array, log_var: jax.Array,
           key: jax.Array, steps: Sequence[int] = (1, 5, 20, 100),
           settings: RefineSettings = RefineSettings()) -> Refined:
  """Semi-amortised inference at test time: gradient ascent on this example's ELBO from
  (mean, log_var) [k] (the encoder's output), the decoder fixed. One run of max(steps) steps;
  returns the parameters after each number of steps in ``steps`` (0: the start), [len(steps), k]
  each. Evaluate them with ``elbo_estimate``."""
  settings.validate()
  if not steps or min(steps) < 0:
    raise ValueError(f"steps must be non-negative step counts, got {list(steps)}.")
  optimizer = optax.sgd(settings.learning_rate, momentum=settings.momentum or None)
  negative_elbo = _negative_elbo(log_likelihood_fn)

  def sgd_step(carry, step):
    params, opt_state = carry
    eps = jax.random.normal(jax.random.fold_in(key, step),
                            (settings.samples_per_step, *mean.shape))
    grads = tuple(_clip_norm(g, settings.max_grad_norm)
                  for g in jax.grad(negative_elbo)(params, eps))
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), params

  start = (mean, log_var)
  _, (means, log_vars) = jax.lax.scan(sgd_step, (start, optimizer.init(start)),
                                      jnp.arange(max(steps)))
  at = jnp.asarray(steps)
  return Refined(jnp.concatenate([mean[None], means])[at],
                 jnp.concatenate([log_var[None], log_vars])[at])
