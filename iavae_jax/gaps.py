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
come as keys; large sample counts are drawn ``sample_chunk`` samples per decoder call. The two
optimisations (q*, refinement) are also given as a state and its step functions, with Python
drivers (``drive_search``, ``drive_refinement``) that give the same iterates: XLA:CPU runs
convolution gradients inside lax loops slower than as separate jitted calls (docs/devices.md).

``Measurements`` puts these together for a batch of examples of any decoder: compiled once,
each example's noise from its own key, the optimisations driven from Python.

Convergence rule for q*: L[q*] counts as converged when the optimisation rerun with
``QStarSettings.doubled()`` (twice the patience and twice max_steps, the same key: the longer run
replays the shorter one and goes on) moves the mean of L[q*] over the examples by less than
``CONVERGENCE_TOLERANCE`` nats, both estimated with the same final noise.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from iavae_jax import objectives
from iavae_jax.hparams import REFINE_TUNE_SAMPLES, SA_VAE_BATCH_SIZE, GapSettings

__all__ = ["CONVERGENCE_TOLERANCE", "QStarSettings", "SA_VAE_BATCH_SIZE", "RefineSettings",
           "elbo_estimate", "log_px_estimate", "QStarSearch", "start_search", "search_step",
           "search_check", "QStar", "search_result", "optimize_gaussian", "drive_search",
           "Refinement", "Refined", "start_refinement", "refinement_step", "refine",
           "drive_refinement", "TUNE_SGD_FACTORS", "TUNE_ADAM_RATES", "refinement_candidates",
           "tune_refinement", "steps_to_reach", "Compiled", "Measurements"]

CONVERGENCE_TOLERANCE = GapSettings.convergence_tolerance   # nats, on the mean of L[q*]


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
  learning_rate: float = GapSettings.qstar_learning_rate   # Adam
  samples_per_step: int = GapSettings.qstar_samples    # reparameterised samples in a step's ELBO
  check_every: int = GapSettings.qstar_check_every     # steps between checks
  check_samples: int = GapSettings.qstar_check_samples  # samples of the check's ELBO estimate
  patience: int = GapSettings.qstar_patience     # checks without improvement before stopping
  max_steps: int = GapSettings.qstar_max_steps   # at most this many (rounded up to a whole check)
  sample_chunk: int = GapSettings.sample_chunk   # samples per decoder call in the check

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




@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """Test-time refinement of (mean, log_var) by gradient ascent on the ELBO (defaults: SA-VAE's
  settings per example, see hparams.SA_VAE_BATCH_SIZE)."""
  learning_rate: float = GapSettings.refine_learning_rate
  momentum: float = GapSettings.refine_momentum              # heavy ball, as optax.sgd
  max_grad_norm: float = GapSettings.refine_max_grad_norm    # each of the two gradients
  samples_per_step: int = GapSettings.refine_samples
  optimizer: str = GapSettings.refine_optimizer   # "sgd" (with momentum) or "adam" (no momentum)

  def validate(self) -> "RefineSettings":
    _positive("RefineSettings", learning_rate=self.learning_rate,
              max_grad_norm=self.max_grad_norm, samples_per_step=self.samples_per_step)
    if not 0 <= self.momentum < 1:
      raise ValueError(f"RefineSettings.momentum must be in [0, 1), got {self.momentum}.")
    if self.optimizer not in ("sgd", "adam"):
      raise ValueError(f"RefineSettings.optimizer must be 'sgd' or 'adam', got "
                       f"{self.optimizer!r}.")
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


def _select(condition: jax.Array, new, old):
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


# q*. The search is a state and three pure functions of one example: ``start_search``, then
# rounds of ``check_every`` x ``search_step`` and one ``search_check`` until ``done``.
# ``optimize_gaussian`` runs it under lax.while_loop (one jittable function); ``drive_search``
# runs it from Python over jitted steps, the fast form on CPU for convolutional decoders.

class QStarSearch(NamedTuple):
  params: tuple           # (mean [k], log_var [k]): the Adam iterate
  opt_state: optax.OptState
  steps: jax.Array        # Adam steps taken (int32)
  best_params: tuple      # the best (mean, log_var) seen at a check
  best_value: jax.Array   # their check value: the fixed-noise ELBO estimate (biased up by the
                          # selection: report a fresh estimate, ``elbo_estimate`` with another key)
  stale: jax.Array        # checks since the last improvement (int32)
  done: jax.Array         # patience exhausted or max_steps reached (bool)
  step_key: jax.Array     # step t draws its samples from fold_in(step_key, t)
  check_key: jax.Array    # every check draws the same samples from it


def _check_value(log_likelihood_fn, params, key, settings: QStarSettings) -> jax.Array:
  return elbo_estimate(log_likelihood_fn, *params, key, settings.check_samples,
                       settings.sample_chunk)


def start_search(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                 log_var: jax.Array, key: jax.Array,
                 settings: QStarSettings = QStarSettings()) -> QStarSearch:
  """The search for q* from (mean, log_var) [k] (the encoder's output), which is also the first
  candidate: q* is never worse than the start on the check's noise."""
  settings.validate()
  step_key, check_key = jax.random.split(key)
  start = (mean, log_var)
  return QStarSearch(start, optax.adam(settings.learning_rate).init(start), jnp.int32(0), start,
                     _check_value(log_likelihood_fn, start, check_key, settings), jnp.int32(0),
                     jnp.bool_(False), step_key, check_key)


def search_step(log_likelihood_fn: objectives.LogLikelihoodFn, search: QStarSearch,
                settings: QStarSettings = QStarSettings()) -> QStarSearch:
  """One Adam step on the ELBO with samples_per_step fresh samples (none once done)."""
  eps = jax.random.normal(jax.random.fold_in(search.step_key, search.steps),
                          (settings.samples_per_step, *search.params[0].shape))
  grads = jax.grad(_negative_elbo(log_likelihood_fn))(search.params, eps)
  updates, opt_state = optax.adam(settings.learning_rate).update(grads, search.opt_state)
  stepped = search._replace(params=optax.apply_updates(search.params, updates),
                            opt_state=opt_state, steps=search.steps + 1)
  return _select(search.done, search, stepped)


def search_check(log_likelihood_fn: objectives.LogLikelihoodFn, search: QStarSearch,
                 settings: QStarSettings = QStarSettings()) -> QStarSearch:
  """The check after a round of check_every steps: keeps the parameters if their check value is
  the best so far (a non-finite value never is), and ends the search after ``patience`` checks
  without improvement or at max_steps (rounded up to a whole round). Nothing once done."""
  value = _check_value(log_likelihood_fn, search.params, search.check_key, settings)
  better = value > search.best_value   # False for NaN
  max_rounds = -(-settings.max_steps // settings.check_every)
  stale = jnp.where(better, 0, search.stale + 1)
  checked = search._replace(
      best_params=_select(better, search.params, search.best_params),
      best_value=jnp.where(better, value, search.best_value), stale=stale,
      done=(stale >= settings.patience) | (search.steps >= max_rounds * settings.check_every))
  return _select(search.done, search, checked)


class QStar(NamedTuple):
  mean: jax.Array         # [k] the best (mean, log_var) seen at a check
  log_var: jax.Array      # [k]
  steps: jax.Array        # Adam steps taken (int32, a multiple of check_every)
  check_value: jax.Array  # their check value (see QStarSearch.best_value)


def search_result(search: QStarSearch) -> QStar:
  return QStar(*search.best_params, search.steps, search.best_value)


def optimize_gaussian(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array,
                      log_var: jax.Array, key: jax.Array,
                      settings: QStarSettings = QStarSettings()) -> QStar:
  """q*: the diagonal Gaussian that maximises this example's ELBO, by Adam from (mean, log_var)
  [k] (the encoder's output), as one jittable function.

  Every ``check_every`` steps the ELBO of the current parameters is estimated with the same
  ``check_samples`` samples; the best parameters so far are kept, and the search stops after
  ``patience`` checks without improvement or at ``max_steps``.
  """
  def round_of_steps(search: QStarSearch) -> QStarSearch:
    search = jax.lax.fori_loop(
        0, settings.check_every,
        lambda _, s: search_step(log_likelihood_fn, s, settings), search)
    return search_check(log_likelihood_fn, search, settings)

  search = start_search(log_likelihood_fn, mean, log_var, key, settings)
  return search_result(jax.lax.while_loop(lambda s: ~s.done, round_of_steps, search))


def drive_search(step_fn: Callable, check_fn: Callable, search: QStarSearch,
                 check_every: int) -> QStarSearch:
  """The search from Python: rounds of check_every ``step_fn(search)`` and one
  ``check_fn(search)`` until every example is done. step_fn and check_fn are search_step and
  search_check closed over the decoder and settings, jitted (and vmapped over examples) by the
  caller. The same steps as ``optimize_gaussian``; one host sync per round."""
  while not bool(jnp.all(search.done)):
    for _ in range(check_every):
      search = step_fn(search)
    search = check_fn(search)
  return search


# Refinement: the same structure, a fixed number of steps.

class Refinement(NamedTuple):
  params: tuple           # (mean [k], log_var [k])
  opt_state: optax.OptState
  steps: jax.Array        # steps taken (int32)
  key: jax.Array          # step t draws its samples from fold_in(key, t)


class Refined(NamedTuple):
  mean: jax.Array     # [C, k] after each requested number of steps
  log_var: jax.Array  # [C, k]


def _optimizer(settings: RefineSettings) -> optax.GradientTransformation:
  if settings.optimizer == "adam":
    return optax.adam(settings.learning_rate)
  return optax.sgd(settings.learning_rate, momentum=settings.momentum or None)


def _clip_norm(g: jax.Array, max_norm: float) -> jax.Array:
  """g scaled to norm max_norm if longer (as SA-VAE's clip_grad_norm)."""
  return g * jnp.minimum(1.0, max_norm / (jnp.linalg.norm(g) + 1e-6))


def start_refinement(mean: jax.Array, log_var: jax.Array, key: jax.Array,
                     settings: RefineSettings = RefineSettings()) -> Refinement:
  settings.validate()
  return Refinement((mean, log_var), _optimizer(settings).init((mean, log_var)), jnp.int32(0),
                    key)


def refinement_step(log_likelihood_fn: objectives.LogLikelihoodFn, refinement: Refinement,
                    settings: RefineSettings = RefineSettings()) -> Refinement:
  """One step of gradient ascent on the ELBO, samples_per_step fresh samples, each of the two
  gradients (mean, log_var) clipped to max_grad_norm."""
  eps = jax.random.normal(jax.random.fold_in(refinement.key, refinement.steps),
                          (settings.samples_per_step, *refinement.params[0].shape))
  grads = tuple(_clip_norm(g, settings.max_grad_norm)
                for g in jax.grad(_negative_elbo(log_likelihood_fn))(refinement.params, eps))
  updates, opt_state = _optimizer(settings).update(grads, refinement.opt_state)
  return Refinement(optax.apply_updates(refinement.params, updates), opt_state,
                    refinement.steps + 1, refinement.key)


def _check_steps(steps: Sequence[int]) -> None:
  if not steps or min(steps) < 0:
    raise ValueError(f"steps must be non-negative step counts, got {list(steps)}.")


def refine(log_likelihood_fn: objectives.LogLikelihoodFn, mean: jax.Array, log_var: jax.Array,
           key: jax.Array, steps: Sequence[int] = (1, 5, 20, 100),
           settings: RefineSettings = RefineSettings()) -> Refined:
  """Semi-amortised inference at test time: gradient ascent on this example's ELBO from
  (mean, log_var) [k] (the encoder's output), the decoder fixed, as one jittable function. One
  run of max(steps) steps; returns the parameters after each number of steps in ``steps`` (0:
  the start), [len(steps), k] each. Evaluate them with ``elbo_estimate``."""
  _check_steps(steps)

  def step(refinement, _):
    refinement = refinement_step(log_likelihood_fn, refinement, settings)
    return refinement, refinement.params

  _, (means, log_vars) = jax.lax.scan(step, start_refinement(mean, log_var, key, settings),
                                      None, length=max(steps))
  at = jnp.asarray(steps)
  return Refined(jnp.concatenate([mean[None], means])[at],
                 jnp.concatenate([log_var[None], log_vars])[at])


def drive_refinement(step_fn: Callable, refinement: Refinement,
                     steps: Sequence[int]) -> Refined:
  """``refine`` from Python over a jitted ``step_fn(refinement)`` (refinement_step closed over
  the decoder and settings, jitted and vmapped over examples by the caller). Returns the
  parameters after each number of steps in ``steps``, [..., len(steps), k] each."""
  _check_steps(steps)
  recorded = {}
  for step in range(max(steps) + 1):
    if step:
      refinement = step_fn(refinement)
    if step in steps:
      recorded[step] = refinement.params
  means, log_vars = zip(*(recorded[k] for k in steps))
  return Refined(jnp.stack(means, axis=-2), jnp.stack(log_vars, axis=-2))


class Compiled:
  """A function jitted and compiled ahead of its first call, once per shape of its arguments,
  so that what it runs can be timed without the compilation."""

  def __init__(self, fn: Callable):
    self._jitted, self._compiled = jax.jit(fn), {}

  def compile(self, *args):
    """Compiles for args (arrays or jax.ShapeDtypeStruct) if not yet; returns the output's
    shapes."""
    self._executable(args)
    return jax.eval_shape(self._jitted, *args)

  def __call__(self, *args):
    return self._executable(args)(*args)

  def _executable(self, args):
    signature = _signature(args)
    if signature not in self._compiled:
      self._compiled[signature] = self._jitted.lower(*args).compile()
    return self._compiled[signature]


def _signature(args) -> tuple:
  leaves, structure = jax.tree.flatten(args)
  return structure, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


# The purposes of an example's noise, each folded into its key.
_QSTAR, _FINAL, _IWAE, _REFINE = range(4)


class Measurements:
  """The gap measurements of a decoder family on chunks of examples, compiled once.

  ``log_likelihood_of(decoder_params, x_i) -> log_likelihood_fn`` gives one example's decoder
  (x_i: one example as the decoder reads it, e.g. [28, 28, 1]; the function z [S, k] ->
  log p(x_i | z) [S]). Every method takes decoder_params, examples x [B, ...] and per-example
  keys [B, 2] (or the per-example states they return); each example's noise comes from its own
  key, folded with the purpose (q*, the final ELBO, log p^, refinement), so results do not
  depend on B. The optimisations are driven from Python over jitted steps (``drive_search``,
  ``drive_refinement``): the same iterates as ``optimize_gaussian`` and ``refine``.

    measure = gaps.Measurements(log_likelihood_of, gaps.QStarSettings(), gaps.RefineSettings(),
                                refine_steps=(1, 5, 20), final_samples=5000,
                                iwae_samples=5000, refine_eval_samples=5000)
    q = measure.optimal_gaussian(decoder, x, mean, log_var, keys, count=len(x))
    gap = measure.elbo(decoder, x, q.mean, q.log_var, keys) - measure.elbo(decoder, x, mean,
                                                                            log_var, keys)
  """

  def __init__(self, log_likelihood_of: Callable[[Any, jax.Array],
                                                 objectives.LogLikelihoodFn],
               qstar: QStarSettings, refine: RefineSettings, refine_steps: Sequence[int],
               final_samples: int, iwae_samples: int, refine_eval_samples: int,
               sample_chunk: int = 100):
    _check_steps(refine_steps)
    for name, value in (("final_samples", final_samples), ("iwae_samples", iwae_samples),
                        ("refine_eval_samples", refine_eval_samples)):
      _chunk_size(value, sample_chunk, f"Measurements: {name}")
    self.qstar_settings, self.refine_settings = qstar.validate(), refine.validate()
    self.refine_steps = (0, *refine_steps)
    self.iwae_samples = iwae_samples
    self._log_likelihood_of = log_likelihood_of
    fold, doubled = jax.random.fold_in, qstar.doubled()
    self.qstar_start = self._per_example(
        lambda ll, m, v, key: start_search(ll, m, v, fold(key, _QSTAR), qstar))
    self.qstar_step = self._per_example(lambda ll, s: search_step(ll, s, qstar))
    self.qstar_check = self._per_example(lambda ll, s: search_check(ll, s, qstar))
    self.qstar_check_doubled = self._per_example(lambda ll, s: search_check(ll, s, doubled))
    self.elbo = self._per_example(lambda ll, m, v, key: elbo_estimate(
        ll, m, v, fold(key, _FINAL), final_samples, sample_chunk))
    self.log_px = self._per_example(lambda ll, m, v, key: log_px_estimate(
        ll, m, v, fold(key, _IWAE), iwae_samples, sample_chunk))
    self.refine_start = Compiled(jax.vmap(
        lambda m, v, key: start_refinement(m, v, fold(key, _REFINE), refine)))
    self.refine_step = self._per_example(lambda ll, r: refinement_step(ll, r, refine))
    self.refine_eval = self._per_example(lambda ll, m, v, key: jax.vmap(
        lambda m_k, v_k: elbo_estimate(ll, m_k, v_k, fold(key, _FINAL), refine_eval_samples,
                                       sample_chunk))(m, v))

  def _per_example(self, fn: Callable) -> Compiled:
    """fn(log_likelihood_fn, *args) for one example, as a compiled function of
    (decoder_params, x [B, ...], *args with a leading axis B)."""
    def batched(decoder_params, x, *args):
      one = lambda x_i, *args_i: fn(self._log_likelihood_of(decoder_params, x_i), *args_i)
      return jax.vmap(one)(x, *args)
    return Compiled(batched)

  def compile(self, decoder_params, x, mean, log_var, keys) -> None:
    """Compiles every function a chunk like x (with the encoder's mean, log_var [B, k], arrays
    or shapes) calls, without running any."""
    search = self.qstar_start.compile(decoder_params, x, mean, log_var, keys)
    for fn in (self.qstar_step, self.qstar_check, self.qstar_check_doubled):
      fn.compile(decoder_params, x, search)
    for fn in (self.elbo, self.log_px):
      fn.compile(decoder_params, x, mean, log_var, keys)
    self.refine_step.compile(decoder_params, x,
                             self.refine_start.compile(mean, log_var, keys))
    curve = jax.ShapeDtypeStruct((mean.shape[0], len(self.refine_steps), mean.shape[1]),
                                 mean.dtype)
    self.refine_eval.compile(decoder_params, x, curve, curve, keys)

  def optimal_gaussian(self, decoder_params, x, mean, log_var, keys, count: int,
                       doubled: bool = False) -> QStar:
    """q* of the first count examples (the others, padding, are not searched), with
    ``QStarSettings.doubled()`` if asked (the convergence check)."""
    search = self.qstar_start(decoder_params, x, mean, log_var, keys)
    search = search._replace(done=search.done | (jnp.arange(x.shape[0]) >= count))
    check = self.qstar_check_doubled if doubled else self.qstar_check
    search = drive_search(lambda s: self.qstar_step(decoder_params, x, s),
                          lambda s: check(decoder_params, x, s), search,
                          self.qstar_settings.check_every)
    return search_result(search)

  def refine(self, decoder_params, x, mean, log_var, keys) -> Refined:
    """The refined (mean, log_var) after each of refine_steps (0 first): [B, K, k] each."""
    return drive_refinement(lambda r: self.refine_step(decoder_params, x, r),
                            self.refine_start(mean, log_var, keys), self.refine_steps)


# The tuned refinement's candidates: SA-VAE's SGD with momentum at these multiples of its step
# size (its momentum and clipping kept), and Adam at these step sizes; each with each of
# REFINE_TUNE_SAMPLES samples per step.
TUNE_SGD_FACTORS = (0.1, 0.3, 1.0, 3.0)
TUNE_ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def refinement_candidates(budget: int, samples: Sequence[int] = REFINE_TUNE_SAMPLES
                          ) -> list[tuple[RefineSettings, int]]:
  """The tuned refinement's candidates (TUNE_SGD_FACTORS, TUNE_ADAM_RATES, each with each of
  ``samples`` samples per step), each with the steps it may take within ``budget`` decoder
  passes per example, forward and backward: budget // (2 x samples per step), at least 1."""
  if budget < 2 or not samples or min(samples) <= 0:
    raise ValueError(f"refinement_candidates: budget must be at least 2 decoder passes and "
                     f"samples positive, got {budget} and {list(samples)}.")
  sa_vae = RefineSettings()
  rates = ([("sgd", factor * sa_vae.learning_rate) for factor in TUNE_SGD_FACTORS]
           + [("adam", rate) for rate in TUNE_ADAM_RATES])
  return [(dataclasses.replace(sa_vae, optimizer=optimizer, learning_rate=rate,
                               samples_per_step=count), max(1, budget // (2 * count)))
          for optimizer, rate in rates for count in samples]


def tune_refinement(elbo_after: Callable[[RefineSettings, int], tuple[float, float]],
                    budget: int, samples: Sequence[int] = REFINE_TUNE_SAMPLES,
                    on_candidate: Callable[[dict], Any] | None = None) -> dict:
  """Refinement tuned on held-out examples: every candidate of ``refinement_candidates(budget,
  samples)`` scored by ``elbo_after(settings, steps)`` -> (the mean ELBO over the examples at the
  start, and after that many steps), the highest finite one chosen. Returns {"candidates":
  [{"optimizer", "learning_rate", "samples_per_step", "steps", "elbo_at_start", "elbo"}, ...],
  "chosen": one of them, or None when every candidate diverged}; ``on_candidate`` sees each
  candidate as it is scored (for progress)."""
  candidates = []
  for settings, steps in refinement_candidates(budget, samples):
    start, end = elbo_after(settings, steps)
    candidates.append({"optimizer": settings.optimizer, "learning_rate": settings.learning_rate,
                       "samples_per_step": settings.samples_per_step, "steps": steps,
                       "elbo_at_start": float(start), "elbo": float(end)})
    if on_candidate is not None:
      on_candidate(candidates[-1])
  finite = [c for c in candidates if math.isfinite(c["elbo"])]
  return {"candidates": candidates,
          "chosen": max(finite, key=lambda c: c["elbo"]) if finite else None}


def steps_to_reach(steps: list, curve: list, target: dict, interpolate: bool = False) -> dict:
  """Where a refinement curve first reaches a target ELBO, over seeds: ``curve`` holds the
  ELBO's summaries (iavae_jax.stats.summarize_seeds: {"mean", "std", "per_seed"}) after each of
  ``steps`` refinement steps, ``target`` one summary (e.g. an amortized model's ELBO). Returns
  {"per_seed": [...], "of_the_means": ...}, each the first recorded step at which the curve is
  at or above the target, or with ``interpolate`` the step linearly interpolated
  between the recorded ones (0 if it starts there); None where it never does within the largest
  step, or where a value is undefined (a diverged seed)."""
  def first(values, goal):
    if goal is None:
      return None
    previous = None
    for k, value in zip(steps, values):
      if value is not None and value >= goal:
        if not interpolate:
          return k
        if previous is None:
          return 0.0 if k == steps[0] else None
        k0, v0 = previous
        return float(k0 + (k - k0) * (goal - v0) / (value - v0))
      previous = None if value is None else (k, value)
    return None
  return {"per_seed": [first([c["per_seed"][i] for c in curve], goal)
                       for i, goal in enumerate(target["per_seed"])],
          "of_the_means": first([c["mean"] for c in curve], target["mean"])}
