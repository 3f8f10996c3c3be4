"""Training a population of models at once: epochs under lax.scan, models under vmap.

Every model (a VAE seed, an IA-VAE seed, an encoder width) has its own parameters, optimiser
state, RNG key, data order and early-stopping counters, stacked along a leading model axis, so one
jitted call advances all of them. Early stopping is per model, by masking: once a model stops,
its state is carried through unchanged while the others train on.

A model is described by functions of (params, frozen, ...):
  noise_fn(key, num_steps) -> the epoch's random inputs, leading axis num_steps (drawn in one
      call per epoch: one big draw is several times cheaper on CPU than one per step);
  loss_fn(params, frozen, x_batch [B, ...], noise) -> scalar to minimise (the negative ELBO);
  score_fn(params, frozen, data [N, ...]) -> scalar to maximise, monitored once per epoch on the
      full data, for early stopping and best-model selection.
``frozen`` holds what the model uses but does not train (e.g. phi_AVI in stage 2).

Data order: epoch e of a model whose order seed is the integer tuple s visits the examples in
the order of ``numpy.random.default_rng([*s, e]).permutation(N)`` (the last N mod B are
dropped). It is drawn on the host, while the device runs the previous chunk: XLA's sort on CPU is
~25x slower than NumPy's shuffle, and a pure function of (s, e) makes a resumed run see exactly
the batches an uninterrupted one would.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax.blocks import PyTree

NoiseFn = Callable[[jax.Array, int], PyTree]
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
  loss: jax.Array   # mean training loss over the epoch's steps (NaN once a model is done)
  score: jax.Array  # full-data score after the epoch (the best score once a model is done)


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


def make_epoch_fn(noise_fn: NoiseFn, loss_fn: LossFn, score_fn: ScoreFn,
                  optimizer: optax.GradientTransformation, schedule: Schedule):
  """Returns epoch(state, frozen, data, order) -> (state, EpochMetrics) for one model.

  order: [num_steps * batch_size] example indices for this epoch. A model that is done passes
  through unchanged.
  """
  def epoch(state: TrainState, frozen: PyTree, data: jax.Array, order: jax.Array):
    num_steps = order.shape[0] // schedule.batch_size
    key, noise_key = jax.random.split(state.key)
    batches = data[order.reshape(num_steps, schedule.batch_size)]

    def step(carry, inputs):
      params, opt_state = carry
      x_batch, noise = inputs
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x_batch, noise)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (state.params, state.opt_state), (batches, noise_fn(noise_key, num_steps)))
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
    return (_tree_select(done, state, new_state),
            _tree_select(done, EpochMetrics(jnp.nan, state.best_score),
                         EpochMetrics(jnp.mean(losses), score)))

  return epoch


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
                     on_chunk: Optional[Callable[[TrainState, EpochMetrics], Any]] = None
                     ) -> TrainState:
  """Runs a population until every model has stopped early or reached max_epochs.

  Each jitted call runs ``epochs_per_call`` epochs (epochs past a model's end are no-ops), then
  ``on_chunk(states, metrics)`` is called: the caller's hook for progress, metrics and
  checkpoints. ``states`` may come from a checkpoint: training resumes where it stopped (models
  still training are in lockstep, at the population's largest epoch count).
  """
  if epochs_per_call <= 0:
    raise ValueError(f"train_population: epochs_per_call must be positive, got {epochs_per_call}.")
  if data.shape[0] < schedule.batch_size:
    raise ValueError(f"train_population: {data.shape[0]} examples are fewer than one batch of "
                     f"{schedule.batch_size}.")
  order_seeds = np.asarray(order_seeds).reshape(len(order_seeds), -1)
  run = make_population_step(epoch_fn)
  epoch = int(jnp.max(states.epoch))
  orders = data_orders(order_seeds, epoch, epochs_per_call, data.shape[0], schedule.batch_size)
  while not bool(jnp.all(is_done(states, schedule))):
    states, metrics = run(states, frozen, data, orders)   # dispatched asynchronously
    epoch += epochs_per_call
    orders = data_orders(order_seeds, epoch, epochs_per_call, data.shape[0], schedule.batch_size)
    if on_chunk is not None:
      on_chunk(states, metrics)
  return states
