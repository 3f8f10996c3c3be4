"""Training a population of models at once: epochs under lax.scan, models under vmap.

Every model (a VAE seed, an IA-VAE seed, an encoder width) has its own parameters, optimiser
state, RNG key, data order and early-stopping counters, stacked along a leading model axis, so one
jitted call advances all of them. Early stopping is per model, by masking: once a model stops,
its state is carried through unchanged while the others train on.

A model is described by functions of (params, frozen, ...):
  noise_fn(key, num_steps, epoch) -> the epoch's random inputs (and any per-step schedule
      values, such as a KL warm-up weight), leading axis num_steps; ``epoch`` counts completed
      epochs. Drawn in one call per epoch: one big draw is several times cheaper on CPU than one
      per step;
  loss_fn(params, frozen, x_batch [B, ...], noise) -> scalar to minimise (the negative ELBO);
  score_fn(params, frozen, data [N, ...]) -> scalar to maximise, monitored once per epoch on the
      full data, for early stopping and best-model selection.
``frozen`` holds what the model uses but does not train (e.g. phi_AVI in stage 2, or held-out
data for the score). With ``merge_aux``, loss_fn returns (loss, aux) and the step sets
params = merge_aux(updated params, aux): for state that is computed, not trained (batch-norm
running statistics), and that the optimiser must leave alone.

Data order: epoch e of a model whose order seed is the integer tuple s visits the examples in
the order of ``numpy.random.default_rng([*s, e]).permutation(N)`` (the last N mod B are
dropped). It is drawn on the host, while the device runs the previous chunk: XLA's sort on CPU is
~25x slower than NumPy's shuffle, and a pure function of (s, e) makes a resumed run see exactly
the batches an uninterrupted one would.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax import parallel as parallel_lib
from iavae_jax.blocks import PyTree

NoiseFn = Callable[[jax.Array, int, jax.Array], PyTree]
LossFn = Callable[[PyTree, PyTree, jax.Array, PyTree], jax.Array]
ScoreFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """One model's training state; a population stacks these along a leading axis."""
  params: PyTree
  opt_state: PyTree
  key: jax.Array
  epoch: jax.Array        # epochs completed (int32)
  best_params: PyTree     # parameters at the best monitored score so far
  best_score: jax.Array   # best full-data score so far
  best_epoch: jax.Array   # the epoch that reached it
  stopped: jax.Array      # early stopping has triggered (bool)


class EpochMetrics(NamedTuple):
  loss: jax.Array          # mean training loss over the epoch's steps (NaN once a model is done)
  score: jax.Array         # full-data score after the epoch (the best score once a model is done)
  bad_step: jax.Array      # the first step (0-based) whose loss was NaN or Inf; -1 if none
  params_finite: jax.Array  # every parameter is finite after the epoch (bool)


def diverged(metrics: EpochMetrics) -> jax.Array:
  """Which epochs (of which models) produced a non-finite loss or non-finite parameters."""
  return (metrics.bad_step >= 0) | ~metrics.params_finite


@dataclasses.dataclass(frozen=True)
class Schedule:
  batch_size: int
  max_epochs: int
  patience: int    # stop after this many epochs without a better score

  def __post_init__(self):
    for name in ("batch_size", "max_epochs", "patience"):
      if getattr(self, name) <= 0:
        raise ValueError(f"Schedule: {name} must be positive, got {getattr(self, name)}.")


def init_state(params: PyTree, optimizer: optax.GradientTransformation,
               key: jax.Array) -> TrainState:
  """A fresh state for one model (vmap it over stacked params and keys for a population)."""
  return TrainState(params=params, opt_state=optimizer.init(params), key=key,
                    epoch=jnp.zeros((), jnp.int32), best_params=params,
                    best_score=jnp.array(-jnp.inf, jnp.float32),
                    best_epoch=jnp.zeros((), jnp.int32), stopped=jnp.zeros((), bool))


def is_done(state: TrainState, schedule: Schedule) -> jax.Array:
  return state.stopped | (state.epoch >= schedule.max_epochs)


def _tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _idle_metrics(state: TrainState) -> EpochMetrics:
  """The metrics of an epoch that a finished model skips."""
  return EpochMetrics(jnp.array(jnp.nan, jnp.float32), state.best_score,
                      jnp.array(-1, jnp.int32), jnp.array(True))


def make_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                 merge_aux: Optional[Callable[[PyTree, PyTree], PyTree]] = None):
  """One optimiser step: step(frozen, (params, opt_state), (x_batch, noise)) ->
  ((params, opt_state), loss). See the module docstring for merge_aux."""
  def step(frozen, carry, inputs):
    params, opt_state = carry
    x_batch, noise = inputs
    if merge_aux is None:
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x_batch, noise)
    else:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, frozen, x_batch, noise)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if merge_aux is not None:
      params = merge_aux(params, aux)
    return (params, opt_state), loss
  return step


def make_epoch_fn(noise_fn: NoiseFn, loss_fn: LossFn, score_fn: ScoreFn,
                  optimizer: optax.GradientTransformation, schedule: Schedule,
                  merge_aux: Optional[Callable[[PyTree, PyTree], PyTree]] = None,
                  python_steps: bool = False,
                  parallel: Optional[parallel_lib.Parallel] = None):
  """Returns epoch(state, frozen, data, order) -> (state, EpochMetrics) for one model.

  order: [num_steps * batch_size] example indices for this epoch. A model that is done passes
  through unchanged.

  By default the epoch is one pure function (steps under lax.scan) to be jitted, vmapped over a
  population and scanned over epochs: the fast form for small models. With ``python_steps`` the
  epoch is a Python loop over a jitted step (not itself jittable; drive it with ``train_model``):
  XLA:CPU runs convolution gradients inside a loop ~8x slower than outside one (measured), so
  convolutional models take this form.

  With a ``parallel`` in ``data`` mode, every batch is split over its devices (the caller
  places states, frozen and data with ``parallel.shared``; ``train_model`` and
  ``train_population`` do).
  """
  def begin(state: TrainState, data: jax.Array, order: jax.Array):
    num_steps = order.shape[0] // schedule.batch_size
    key, noise_key = jax.random.split(state.key)
    batches = data[order.reshape(num_steps, schedule.batch_size)]
    if parallel is not None and parallel.mode == "data":   # [steps, batch, ...]: split batch
      batches = jax.lax.with_sharding_constraint(
          batches, parallel.batch_sharding(1, batches.ndim))
    return key, batches, noise_fn(noise_key, num_steps, state.epoch)

  step = make_step_fn(loss_fn, optimizer, merge_aux)

  def finish(state: TrainState, frozen, data, key, params, opt_state, losses):
    score = score_fn(params, frozen, data)
    improved = score > state.best_score
    num_epochs = state.epoch + 1
    best_epoch = jnp.where(improved, num_epochs, state.best_epoch)
    new_state = TrainState(
        params=params, opt_state=opt_state, key=key, epoch=num_epochs,
        best_params=_tree_select(improved, params, state.best_params),
        best_score=jnp.where(improved, score, state.best_score), best_epoch=best_epoch,
        stopped=num_epochs - best_epoch >= schedule.patience)
    done = is_done(state, schedule)
    bad = ~jnp.isfinite(losses)
    metrics = EpochMetrics(jnp.mean(losses), score,
                           jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32),
                           _all_finite(params))
    return (_tree_select(done, state, new_state),
            _tree_select(done, _idle_metrics(state), metrics))

  if not python_steps:
    def epoch(state: TrainState, frozen: PyTree, data: jax.Array, order: jax.Array):
      key, batches, noise = begin(state, data, order)
      (params, opt_state), losses = jax.lax.scan(
          functools.partial(step, frozen), (state.params, state.opt_state), (batches, noise))
      return finish(state, frozen, data, key, params, opt_state, losses)
    return epoch

  begin, step, finish = jax.jit(begin), jax.jit(step), jax.jit(finish)

  def python_epoch(state: TrainState, frozen: PyTree, data: jax.Array, order: jax.Array):
    if bool(is_done(state, schedule)):
      return state, _idle_metrics(state)
    key, batches, noise = begin(state, data, order)
    carry, losses = (state.params, state.opt_state), []
    for i in range(batches.shape[0]):
      carry, loss = step(frozen, carry, (batches[i], jax.tree.map(lambda a: a[i], noise)))
      losses.append(loss)
    return finish(state, frozen, data, key, *carry, jnp.stack(losses))
  return python_epoch


def _check_one_batch(caller: str, data: jax.Array, schedule: Schedule) -> None:
  if data.shape[0] < schedule.batch_size:
    raise ValueError(f"{caller}: {data.shape[0]} examples are fewer than one batch of "
                     f"{schedule.batch_size}.")


def train_model(epoch_fn, state: TrainState, frozen: PyTree, data: jax.Array, order_seed,
                schedule: Schedule, on_epoch: Optional[Callable[[TrainState, EpochMetrics], Any]]
                = None, parallel: Optional[parallel_lib.Parallel] = None) -> TrainState:
  """Runs one model (no population axis) until it stops early or reaches max_epochs, calling
  ``on_epoch(state, metrics)`` after every epoch. For ``python_steps`` epochs; the data order is
  that of ``data_orders`` with the same seed, so it matches a population run's. With a
  ``parallel`` (``data`` mode: the epoch_fn's), the state, frozen inputs and data are replicated
  over its devices."""
  _check_one_batch("train_model", data, schedule)
  if parallel is not None:
    if parallel.mode == "seeds":
      raise ValueError("train_model trains one model: seed-parallel training needs a "
                       "population (train_population).")
    state, frozen, data = parallel.shared((state, frozen, data))
  order_seed = np.asarray(order_seed).reshape(1, -1)
  while not bool(is_done(state, schedule)):
    order = data_orders(order_seed, int(state.epoch), 1, data.shape[0], schedule.batch_size)
    state, metrics = epoch_fn(state, frozen, data, order[0, 0])
    if on_epoch is not None:
      on_epoch(state, metrics)
  return state


@functools.lru_cache(maxsize=None)  # one jitted function per epoch_fn: compiled once
def make_population_step(epoch_fn):
  """jit(states, frozen, data, orders [E, M, n]) -> (states, metrics [E, M]): E epochs of a
  population of M models, vmapped over models (data shared), scanned over epochs."""
  population_epoch = jax.vmap(epoch_fn, in_axes=(0, 0, None, 0))

  @jax.jit
  def run(states, frozen, data, orders):
    return jax.lax.scan(lambda s, order: population_epoch(s, frozen, data, order), states, orders)
  return run


def data_orders(order_seeds: np.ndarray, first_epoch: int, num_epochs: int, num_examples: int,
                batch_size: int) -> np.ndarray:
  """[num_epochs, M, steps * batch_size] example indices for epochs first_epoch + j.

  order_seeds: [M, K] non-negative integers, one row per model.
  """
  used = (num_examples // batch_size) * batch_size
  return np.stack([
      np.stack([np.random.default_rng([*map(int, seed), first_epoch + j])
                .permutation(num_examples)[:used] for seed in order_seeds])
      for j in range(num_epochs)]).astype(np.int32)


def train_population(epoch_fn, states: TrainState, frozen: PyTree, data: jax.Array,
                     order_seeds: np.ndarray, schedule: Schedule, epochs_per_call: int,
                     on_chunk: Optional[Callable[[TrainState, EpochMetrics], Any]] = None,
                     parallel: Optional[parallel_lib.Parallel] = None) -> TrainState:
  """Runs a population until every model has stopped early or reached max_epochs.

  Each jitted call runs ``epochs_per_call`` epochs (epochs past a model's end are no-ops), then
  ``on_chunk(states, metrics)`` is called: the caller's hook for progress, metrics and
  checkpoints. ``states`` may come from a checkpoint: training resumes where it stopped (models
  still training are in lockstep, at the population's largest epoch count).

  With a ``parallel``, the population is placed on its devices (``seeds``: split, padded to a
  multiple of the device count; ``data``: replicated, batches split by the epoch_fn); on_chunk
  and the caller then get host (NumPy) copies of the population as given, without padding.
  """
  if epochs_per_call <= 0:
    raise ValueError(f"train_population: epochs_per_call must be positive, got {epochs_per_call}.")
  _check_one_batch("train_population", data, schedule)
  order_seeds = np.asarray(order_seeds).reshape(len(order_seeds), -1)
  num_models = len(order_seeds)
  place_orders = unplace = lambda tree, axis=0: tree
  if parallel is not None and parallel.mesh is not None:
    size = parallel.padded_size(num_models)
    states, frozen, order_seeds = parallel_lib.pad_models((states, frozen, order_seeds), size)
    states, frozen = parallel.models((states, frozen))
    data = parallel.shared(data)
    place_orders = lambda orders: parallel.models(orders, axis=1)
    unplace = lambda tree, axis=0: jax.tree.map(
        lambda a: np.take(a, np.arange(num_models), axis=axis), parallel_lib.to_host(tree))
  run = make_population_step(epoch_fn)
  epoch = int(jnp.max(parallel_lib.to_host(states.epoch)))
  orders = data_orders(order_seeds, epoch, epochs_per_call, data.shape[0], schedule.batch_size)
  while not bool(np.all(parallel_lib.to_host(is_done(states, schedule)))):
    states, metrics = run(states, frozen, data, place_orders(orders))   # dispatched async
    epoch += epochs_per_call
    orders = data_orders(order_seeds, epoch, epochs_per_call, data.shape[0], schedule.batch_size)
    if on_chunk is not None:
      on_chunk(unplace(states), unplace(metrics, axis=1))   # metrics: [epochs, models]
  return unplace(states)
