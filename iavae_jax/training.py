"""Training models with early stopping: one model at a time, or a population at once.

A model's state is a ``TrainState`` (flax's: step, params, optimiser state; plus its key, the
frozen inputs it uses but does not train, and early stopping). An epoch is a pass of optimiser
steps over shuffled batches, then ``end_epoch``: the monitored score, best-model selection and
early stopping. Once a model has stopped, its epochs pass its state through unchanged.

Two drivers:
  ``train_model`` runs one model's epochs, given any epoch function: the image experiments loop
      over a jitted ``train_step(state, batch)`` in Python (XLA:CPU runs convolution gradients
      inside a loop several times slower than outside one: docs/devices.md);
  ``train_population`` runs a population (VAE seeds, IA-VAE seeds, encoder widths), stacked
      along a leading model axis, with the epoch of ``make_epoch_fn``: steps under lax.scan,
      models under vmap, several epochs per jitted call. The fast form for small models.

A population's model is described by functions of (params, frozen, ...), ``frozen`` being
``TrainState.frozen`` (e.g. phi_AVI in stage 2):
  noise_fn(key, num_steps, epoch) -> the epoch's random inputs, leading axis num_steps;
      ``epoch`` counts completed epochs. Drawn in one call per epoch: one big draw is several
      times cheaper on CPU than one per step;
  loss_fn(params, frozen, x_batch [B, ...], noise) -> (the loss to minimise, the negative ELBO;
      the batch's mean KL term, reported);
  score_fn(params, frozen, data [N, ...]) -> scalar to maximise, monitored once per epoch on the
      full data, for early stopping and best-model selection.

Data order: epoch e of a model whose order seed is the integer tuple s visits the examples in
the order of ``numpy.random.default_rng([*s, e]).permutation(N)`` (the last N mod B are
dropped). It is drawn on the host, while the device runs the previous chunk: XLA's sort on CPU is
much slower than NumPy's shuffle (docs/devices.md), and a pure function of (s, e) makes a resumed
run see exactly the batches an uninterrupted one would.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax import parallel as parallel_lib
from iavae_jax.blocks import PyTree

__all__ = ["NoiseFn", "LossFn", "ScoreFn", "TrainState", "StepMetrics", "EpochMetrics", "diverged",
           "patience_check", "Schedule", "init_state", "derive_key", "model_keys",
           "population_keys", "is_done", "idle_metrics", "end_epoch", "make_step_fn",
           "make_epoch_fn", "scan_epoch_fn", "train_model", "cpu_compiler_options",
           "make_population_step", "data_orders", "train_population"]

NoiseFn = Callable[[jax.Array, int, jax.Array], PyTree]
LossFn = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[jax.Array, jax.Array]]
ScoreFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """One model's training state; a population stacks these along a leading axis."""
  params: PyTree          # what the optimiser trains
  frozen: PyTree          # what the model uses but does not train (phi_AVI, frozen batch-norm
                          # statistics); None when there is nothing
  opt_state: PyTree
  key: jax.Array          # split once per epoch: its steps' randomness and the next epoch's key
  step: jax.Array         # optimiser steps taken (int32)
  epoch: jax.Array        # epochs completed (int32)
  best_params: PyTree     # parameters at the best monitored score so far
  best_score: jax.Array   # best full-data score so far
  best_epoch: jax.Array   # the epoch that reached it
  stopped: jax.Array      # early stopping has triggered (bool)


class StepMetrics(NamedTuple):
  """What one optimiser step reports; an epoch's steps stack them along a leading axis."""
  loss: jax.Array       # the loss minimised (the negative ELBO, KL-weighted during a warm-up)
  kl: jax.Array         # the batch's mean KL(q(z|x) || p(z))
  grad_norm: jax.Array  # the global L2 norm of the gradient, before any clipping


class EpochMetrics(NamedTuple):
  """An epoch's summary (NaN means and the best score once a model is done)."""
  loss: jax.Array          # mean training loss over the epoch's steps
  kl: jax.Array            # mean of the steps' KL
  grad_norm: jax.Array     # mean of the steps' gradient norms
  score: jax.Array         # full-data score after the epoch
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


def init_state(params: PyTree, optimizer: optax.GradientTransformation, key: jax.Array,
               frozen: PyTree = None, score: jax.Array | float | None = None) -> TrainState:
  """A fresh state for one model (vmap it over stacked params and keys for a population).

  ``score``: the monitored score of ``params`` as given. With it, the starting point is a
  candidate for best-model selection (as epoch 0: kept unless an epoch scores higher, and early
  stopping counts from it), e.g. the stage-1 encoder that a stage 2 starts from. Without it, the
  first epoch is selected whatever its score.
  """
  return TrainState(params=params, frozen=frozen, opt_state=optimizer.init(params), key=key,
                    step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                    best_params=params,
                    best_score=jnp.asarray(-jnp.inf if score is None else score, jnp.float32),
                    best_epoch=jnp.zeros((), jnp.int32), stopped=jnp.zeros((), bool))


def derive_key(seed: int, *path: int) -> jax.Array:
  """PRNGKey(seed) folded with each integer of ``path`` in turn: a key named by integers."""
  key = jax.random.PRNGKey(seed)
  for i in path:
    key = jax.random.fold_in(key, i)
  return key


def model_keys(seed: int, *path: int) -> tuple[jax.Array, jax.Array]:
  """The initialisation and training keys of the model named (seed, *path): the two halves of
  ``derive_key(seed, *path)``. Its data-order seed (``data_orders``) is (seed, *path)."""
  init_key, train_key = jax.random.split(derive_key(seed, *path))
  return init_key, train_key


def population_keys(paths: list[tuple[int, ...]], prefix: tuple[int, ...] = ()
                    ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """For a population of models named by integer tuples (seed, *path), or by prefix + each of
  ``paths`` (e.g. prefix (seed, population id) and paths the models' indices), their stacked
  ``model_keys``, initialisation [M, 2] and training [M, 2], and their data-order seeds [M, K]
  (``train_population``'s order_seeds)."""
  paths = [tuple(prefix) + tuple(path) for path in paths]
  if not paths or len({len(p) for p in paths}) != 1 or not paths[0]:
    raise ValueError("population_keys: give one or more paths, all of the same length, that "
                     "with the prefix name a seed.")
  init_keys, train_keys = zip(*(model_keys(*path) for path in paths))
  return jnp.stack(init_keys), jnp.stack(train_keys), np.array(paths)


def is_done(state: TrainState, schedule: Schedule) -> jax.Array:
  return state.stopped | (state.epoch >= schedule.max_epochs)


def _tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def idle_metrics(state: TrainState) -> EpochMetrics:
  """The metrics of an epoch that a finished model skips."""
  nan = jnp.array(jnp.nan, jnp.float32)
  return EpochMetrics(nan, nan, nan, state.best_score, jnp.array(-1, jnp.int32),
                      jnp.array(True))


def end_epoch(state: TrainState, trained: TrainState, steps: StepMetrics, score: jax.Array,
              schedule: Schedule) -> tuple[TrainState, EpochMetrics]:
  """Closes an epoch: ``state`` as it began, ``trained`` after its steps (params, optimiser
  state, key and step count advanced), ``steps`` their metrics [num_steps], ``score`` the
  monitored score of ``trained.params``. Selects the best parameters, applies early stopping and
  summarises the epoch; a model that was already done passes through unchanged."""
  improved = score > state.best_score
  num_epochs = state.epoch + 1
  best_epoch = jnp.where(improved, num_epochs, state.best_epoch)
  new_state = trained._replace(
      epoch=num_epochs, best_params=_tree_select(improved, trained.params, state.best_params),
      best_score=jnp.where(improved, score, state.best_score), best_epoch=best_epoch,
      stopped=num_epochs - best_epoch >= schedule.patience)
  bad = ~jnp.isfinite(steps.loss)
  metrics = EpochMetrics(jnp.mean(steps.loss), jnp.mean(steps.kl), jnp.mean(steps.grad_norm),
                         score, jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32),
                         _all_finite(trained.params))
  done = is_done(state, schedule)
  return (_tree_select(done, state, new_state),
          _tree_select(done, idle_metrics(state), metrics))


def patience_check(epochs, scores, patience: int, start: float | None = None
                   ) -> tuple[int, float]:
  """Whether early stopping's patience was long enough, from one model's validation curve
  (``scores`` at ``epochs``, NaN after it stopped; ``start``: its starting point's score where
  that was a candidate): the longest wait, in epochs, for an improvement, and how much lower
  the selected score would have been had training stopped after half the patience without an
  improvement (as ``end_epoch`` stops). A wait near the patience, or a loss far from 0, says
  that a longer patience could still have found better epochs."""
  best = half = -math.inf if start is None else start
  wait, last, stopped = 0, 0, False
  for epoch, score in zip(epochs, scores):
    if score > best:   # False for NaN
      wait, best, last = max(wait, int(epoch) - last), score, int(epoch)
      half = half if stopped else score
    stopped = stopped or int(epoch) - last >= max(1, patience // 2)
  return wait, float(best - half)


def make_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation):
  """A population model's optimiser step: step(frozen, (params, opt_state), (x_batch, noise))
  -> ((params, opt_state), StepMetrics)."""
  def step(frozen, carry, inputs):
    params, opt_state = carry
    x_batch, noise = inputs
    (loss, kl), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, x_batch, noise)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), StepMetrics(loss, kl, optax.tree.norm(grads))
  return step


def make_epoch_fn(noise_fn: NoiseFn, loss_fn: LossFn, score_fn: ScoreFn,
                  optimizer: optax.GradientTransformation, schedule: Schedule,
                  parallel: Optional[parallel_lib.Parallel] = None,
                  examples_last: bool = False, compiler_options: Optional[dict] = None):
  """Returns epoch(state, data, order) -> (state, EpochMetrics) for one model of a population:
  ``scan_epoch_fn`` of the step ``make_step_fn(loss_fn, optimizer)``."""
  return scan_epoch_fn(noise_fn, make_step_fn(loss_fn, optimizer), score_fn, schedule, parallel,
                       examples_last, compiler_options)


def scan_epoch_fn(noise_fn: NoiseFn, step: Callable, score_fn: ScoreFn, schedule: Schedule,
                  parallel: Optional[parallel_lib.Parallel] = None,
                  examples_last: bool = False, compiler_options: Optional[dict] = None):
  """Returns epoch(state, data, order) -> (state, EpochMetrics) for one model of a population:
  one pure function, the optimiser ``step`` (``make_step_fn``'s form) scanned over the epoch's
  batches, to be jitted, vmapped over a population and scanned over epochs
  (``train_population``).

  order: [num_steps * batch_size] example indices for this epoch. A model that is done passes
  through unchanged. With a ``parallel`` in ``data`` mode, every batch is split over its devices
  (the caller places states and data with ``parallel.shared``; ``train_population`` does).

  With ``examples_last``, the step and score_fn see their examples along the last axis: x_batch
  [..., B] and data [..., N] (``data`` is still passed as [N, ...]; it is transposed once per
  epoch). For models written to vectorise over a trailing example axis on CPU.

  ``compiler_options`` (default ``cpu_compiler_options()``) go to XLA with the
  population's epochs; the returned function carries them as its ``compiler_options``.
  """
  def epoch(state: TrainState, data: jax.Array, order: jax.Array):
    num_steps = order.shape[0] // schedule.batch_size
    key, noise_key = jax.random.split(state.key)
    indices = order.reshape(num_steps, schedule.batch_size)
    if examples_last:   # gathered from [..., N], so that the examples stay the minor axis
      batches = jnp.moveaxis(jnp.moveaxis(data, 0, -1)[..., indices], -2, 0)   # [steps, ..., B]
    else:
      batches = data[indices]   # [steps, batch, ...]
    if parallel is not None and parallel.mode == "data":   # split the batch axis
      batches = jax.lax.with_sharding_constraint(
          batches, parallel.batch_sharding(batches.ndim - 1 if examples_last else 1,
                                           batches.ndim))
    noise = noise_fn(noise_key, num_steps, state.epoch)
    (params, opt_state), steps = jax.lax.scan(
        functools.partial(step, state.frozen), (state.params, state.opt_state), (batches, noise))
    trained = state._replace(params=params, opt_state=opt_state, key=key,
                             step=state.step + num_steps)
    score = score_fn(params, state.frozen, jnp.moveaxis(data, 0, -1) if examples_last else data)
    return end_epoch(state, trained, steps, score, schedule)
  epoch.compiler_options = (cpu_compiler_options() if compiler_options is None
                            else compiler_options)
  return epoch


def _check_one_batch(caller: str, data: jax.Array, schedule: Schedule) -> None:
  if data.shape[0] < schedule.batch_size:
    raise ValueError(f"{caller}: {data.shape[0]} examples are fewer than one batch of "
                     f"{schedule.batch_size}.")


def train_model(epoch_fn, state: TrainState, data: jax.Array, order_seed, schedule: Schedule,
                on_epoch: Optional[Callable[[TrainState, EpochMetrics], Any]] = None,
                parallel: Optional[parallel_lib.Parallel] = None) -> TrainState:
  """Runs one model (no population axis) until it stops early or reaches max_epochs, calling
  ``epoch_fn(state, data, order)`` for each epoch and then ``on_epoch(state, metrics)``. The data
  order is that of ``data_orders`` with the same seed, so it matches a population run's. With a
  ``parallel`` (``data`` mode: the epoch_fn's), the state and data are replicated over its
  devices."""
  _check_one_batch("train_model", data, schedule)
  if parallel is not None:
    if parallel.mode == "seeds":
      raise ValueError("train_model trains one model: seed-parallel training needs a "
                       "population (train_population).")
    state, data = parallel.shared((state, data))
  order_seed = np.asarray(order_seed).reshape(1, -1)
  while not bool(is_done(state, schedule)):
    order = data_orders(order_seed, int(state.epoch), 1, data.shape[0], schedule.batch_size)
    state, metrics = epoch_fn(state, data, order[0, 0])
    if on_epoch is not None:
      on_epoch(state, metrics)
  return state


@functools.cache
def cpu_compiler_options(loop_emitters: bool = False) -> dict:
  """XLA options for a population's epochs (``make_epoch_fn``) and other computations made of
  many small reductions: on CPU, without XLA's YNNPACK library reductions (several times slower
  for reductions over a few features or one batch, and single-example posterior summaries);
  with ``loop_emitters``, with XLA's older loop emitters instead of its fusion emitters (faster
  for some models, slower for others: benchmarks/synthetic_step.py). Options this XLA does not
  know are left out; elsewhere than on CPU, none."""
  if jax.default_backend() != "cpu":
    return {}
  wanted = {"xla_cpu_experimental_ynn_fusion_type": ""}
  if loop_emitters:
    wanted["xla_cpu_use_fusion_emitters"] = False

  def known(name, value):
    try:
      jax.jit(lambda a: a + 1, compiler_options={name: value}).lower(1.0).compile()
      return True
    except Exception:  # pylint: disable=broad-except  (XLA raises a plain runtime error)
      return False
  return {k: v for k, v in wanted.items() if known(k, v)}


@functools.lru_cache(maxsize=None)  # one jitted function per epoch_fn: compiled once
def make_population_step(epoch_fn):
  """jit(states, data, orders [E, M, n]) -> (states, metrics [E, M]): E epochs of a population
  of M models, vmapped over models (data shared), scanned over epochs, compiled with the
  epoch_fn's ``compiler_options``."""
  population_epoch = jax.vmap(epoch_fn, in_axes=(0, None, 0))

  def run(states, data, orders):
    return jax.lax.scan(lambda s, order: population_epoch(s, data, order), states, orders)
  return jax.jit(run, compiler_options=epoch_fn.compiler_options)


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


def train_population(epoch_fn, states: TrainState, data: jax.Array, order_seeds: np.ndarray,
                     schedule: Schedule, epochs_per_call: int,
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
    states, order_seeds = parallel_lib.pad_models((states, order_seeds), size)
    states = parallel.models(states)
    data = parallel.shared(data)
    place_orders = lambda orders: parallel.models(orders, axis=1)
    unplace = lambda tree, axis=0: jax.tree.map(
        lambda a: np.take(a, np.arange(num_models), axis=axis), parallel_lib.to_host(tree))
  run = make_population_step(epoch_fn)
  all_done = lambda states: bool(np.all(parallel_lib.to_host(is_done(states, schedule))))
  if all_done(states):
    return unplace(states)
  epoch = int(jnp.max(parallel_lib.to_host(states.epoch)))
  orders = lambda epoch: place_orders(data_orders(order_seeds, epoch, epochs_per_call,
                                                  data.shape[0], schedule.batch_size))
  chunk = run(states, data, orders(epoch))   # dispatched asynchronously
  while True:
    # The host draws the next chunk's data order while the device runs this one, and runs
    # on_chunk (progress, checkpoints) while the device runs the next: the device never waits.
    epoch += epochs_per_call
    next_orders = orders(epoch)
    states, metrics = chunk
    done = all_done(states)
    if not done:
      chunk = run(states, data, next_orders)
    if on_chunk is not None:
      on_chunk(unplace(states), unplace(metrics, axis=1))   # metrics: [epochs, models]
    if done:
      return unplace(states)
