"""Population training: early stopping, masking, determinism, resume, checkpoints."""

import os
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iavae_jax import checkpoints, training
from iavae_jax.errors import ConfigError

DATA = jnp.linspace(-1.0, 1.0, 40)[:, None]


def _epoch_fn(schedule, score_fn):
  """A toy model: params {'w': scalar}; loss (w - frozen - mean(x))^2 + noise * 0; KL 0."""
  def noise_fn(key, num_steps, unused_epoch):
    return jax.random.normal(key, (num_steps,))

  def loss_fn(params, frozen, x, noise):
    return (params["w"] - frozen - jnp.mean(x)) ** 2 + 0.0 * noise, 0.0

  return training.make_epoch_fn(noise_fn, loss_fn, score_fn, optax.sgd(0.1), schedule)


def _states(num_models, frozen=None):
  """Toy states, w = 1, 2, ...; frozen [num_models] (default zeros)."""
  params = {"w": jnp.arange(num_models, dtype=jnp.float32) + 1.0}
  keys = jax.random.split(jax.random.PRNGKey(0), num_models)
  frozen = jnp.zeros(num_models) if frozen is None else jnp.asarray(frozen)
  return jax.vmap(lambda p, k, f: training.init_state(p, optax.sgd(0.1), k, f))(
      params, keys, frozen)


class TrainingTest(chex.TestCase):

  def test_early_stopping_stops_when_it_should(self):
    # Model 0's score peaks at epoch 6 and then falls: with patience 4 it stops after epoch 10 and
    # keeps its epoch-6 parameters. Model 1's score keeps rising: it runs to max_epochs.
    schedule = training.Schedule(batch_size=8, max_epochs=30, patience=4)

    def score_fn(params, frozen, data):
      return jnp.where(frozen > 0, -jnp.abs(params["w"] - 3.0), params["w"])

    def loss_fn(params, frozen, x, noise):
      return -params["w"] + 0.0 * noise, 0.0   # sgd(0.1): w grows by 0.1 a step, 0.5 an epoch

    epoch_fn = training.make_epoch_fn(lambda key, n, unused_epoch: jnp.zeros((n,)), loss_fn,
                                      score_fn, optax.sgd(0.1), schedule)
    params = {"w": jnp.zeros(2)}
    states = jax.vmap(lambda p, k, f: training.init_state(p, optax.sgd(0.1), k, f))(
        params, jax.random.split(jax.random.PRNGKey(0), 2), jnp.array([1.0, 0.0]))
    states = training.train_population(epoch_fn, states, DATA, np.array([[0], [1]]), schedule,
                                       epochs_per_call=3)
    # 5 steps of batch 8 per epoch: w = 0.5 e, so model 0's score -|0.5 e - 3| peaks at e = 6.
    self.assertEqual(int(states.best_epoch[0]), 6)
    self.assertEqual(int(states.epoch[0]), 6 + 4)
    self.assertTrue(bool(states.stopped[0]))
    np.testing.assert_allclose(states.best_params["w"][0], 3.0, atol=1e-5)
    self.assertEqual(int(states.epoch[1]), 30)
    self.assertFalse(bool(states.stopped[1]))
    self.assertEqual(int(states.best_epoch[1]), 30)

  def test_a_scored_start_is_a_selection_candidate(self):
    # The score -w falls as training raises w by 0.5 an epoch. Given the start's score, the start
    # stays selected (epoch 0, its parameters and score) and early stopping counts from it;
    # without it, the first epoch is selected.
    schedule = training.Schedule(batch_size=8, max_epochs=10, patience=3)
    epoch_fn = training.make_epoch_fn(lambda key, n, unused_epoch: jnp.zeros((n,)),
                                      lambda p, f, x, noise: (-p["w"] + 0.0 * noise, 0.0),
                                      lambda p, f, d: -p["w"], optax.sgd(0.1), schedule)
    params = {"w": jnp.array(0.0)}
    run = lambda score: training.train_model(
        epoch_fn, training.init_state(params, optax.sgd(0.1), jax.random.PRNGKey(0), None,
                                      score), DATA, np.array([0]), schedule)
    with_start, without = run(0.0), run(None)
    self.assertEqual((int(with_start.best_epoch), int(with_start.epoch)), (0, 3))
    self.assertEqual(float(with_start.best_score), 0.0)
    chex.assert_trees_all_equal(with_start.best_params, params)
    self.assertEqual((int(without.best_epoch), int(without.epoch)), (1, 4))
    np.testing.assert_allclose(float(without.best_score), -0.5, atol=1e-6)

  def test_stopped_models_are_frozen(self):
    schedule = training.Schedule(batch_size=8, max_epochs=5, patience=50)
    epoch_fn = _epoch_fn(schedule, lambda p, f, d: -(p["w"] - f) ** 2)
    states = _states(3)
    states = states._replace(stopped=jnp.array([False, True, False]))
    run = training.make_population_step(epoch_fn)
    orders = training.data_orders(np.arange(3)[:, None], 0, 2, 40, 8)
    chex.assert_shape(orders, (2, 3, 40))
    new, metrics = run(states, DATA, orders)
    chex.assert_shape(metrics.score, (2, 3))
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[1], new),
                                jax.tree.map(lambda a: a[1], states))
    self.assertFalse(np.allclose(new.params["w"][0], states.params["w"][0]))
    self.assertTrue(np.isnan(metrics.loss[0, 1]))

  def test_data_orders_are_permutations_and_reproducible(self):
    a = training.data_orders(np.array([[0, 1], [0, 2]]), 5, 2, 100, 32)
    b = training.data_orders(np.array([[0, 1], [0, 2]]), 5, 2, 100, 32)
    c = training.data_orders(np.array([[0, 1], [0, 2]]), 6, 1, 100, 32)
    chex.assert_shape(a, (2, 2, 96))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1], c[0])        # epoch 6 is epoch 6, whichever the chunk
    self.assertEqual(len(set(a[0, 0].tolist())), 96)
    self.assertFalse(np.array_equal(a[0, 0], a[0, 1]))

  def test_resume_from_checkpoint_is_bitwise_identical(self):
    schedule = training.Schedule(batch_size=8, max_epochs=6, patience=100)
    epoch_fn = _epoch_fn(schedule, lambda p, f, d: -(p["w"] - f) ** 2)
    seeds = np.arange(2)[:, None]
    straight = training.train_population(epoch_fn, _states(2), DATA, seeds, schedule,
                                         epochs_per_call=3)
    saved = []
    ckpt_dir = tempfile.mkdtemp()
    ckpt = checkpoints.Checkpointer(ckpt_dir)

    def stop_after_first_chunk(states, metrics):
      ckpt.save(int(states.epoch.max()), states)
      saved.append(True)
      raise KeyboardInterrupt   # simulate the run dying after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
      training.train_population(epoch_fn, _states(2), DATA, seeds, schedule, epochs_per_call=3,
                                on_chunk=stop_after_first_chunk)
    restored = checkpoints.Checkpointer(ckpt_dir).restore(like=_states(2))
    self.assertEqual(int(restored.epoch.max()), 3)
    resumed = training.train_population(epoch_fn, restored, DATA, seeds, schedule,
                                        epochs_per_call=3)
    chex.assert_trees_all_equal(resumed, straight)

  def test_a_single_model_trains_as_a_population_of_one(self):
    # train_model (one model, any epoch function) and the vmapped, scanned population driver
    # see the same batches and noise: the same result, and a step count of epochs x steps.
    schedule = training.Schedule(batch_size=8, max_epochs=7, patience=3)
    score_fn = lambda p, f, d: -(p["w"] - 2.0 - f) ** 2
    population = training.train_population(_epoch_fn(schedule, score_fn), _states(1), DATA,
                                           np.array([[4]]), schedule, epochs_per_call=2)
    epochs_seen = []
    single = training.train_model(jax.jit(_epoch_fn(schedule, score_fn)),
                                  jax.tree.map(lambda a: a[0], _states(1)), DATA, np.array([4]),
                                  schedule,
                                  lambda state, metrics: epochs_seen.append(int(state.epoch)))
    chex.assert_trees_all_close(single, jax.tree.map(lambda a: a[0], population), atol=1e-6)
    self.assertEqual(epochs_seen, list(range(1, int(single.epoch) + 1)))
    self.assertEqual(int(single.step), int(single.epoch) * 5)

  def test_single_model_resume_from_checkpoint_is_bitwise_identical(self):
    # The image experiments' path: a run that dies after an epoch's checkpoint and restarts from
    # it ends exactly where an uninterrupted run does.
    schedule = training.Schedule(batch_size=8, max_epochs=5, patience=100)
    epoch_fn = jax.jit(_epoch_fn(schedule, lambda p, f, d: -(p["w"] - f) ** 2))
    start = jax.tree.map(lambda a: a[0], _states(1))
    straight = training.train_model(epoch_fn, start, DATA, np.array([3]), schedule)
    ckpt = checkpoints.Checkpointer(tempfile.mkdtemp())

    def die_after_epoch_2(state, metrics):
      ckpt.save(int(state.epoch), state)
      if int(state.epoch) == 2:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      training.train_model(epoch_fn, start, DATA, np.array([3]), schedule, die_after_epoch_2)
    restored = ckpt.restore(like=start)
    self.assertEqual(int(restored.epoch), 2)
    resumed = training.train_model(epoch_fn, restored, DATA, np.array([3]), schedule)
    chex.assert_trees_all_equal(resumed, straight)

  def test_step_and_epoch_metrics_report_the_kl_and_the_gradient_norm(self):
    # loss = (w - 1)^2 + ||v||^2 at w = 3, v = (1, 2): gradient (4, 2, 4), norm 6; the KL is the
    # loss_fn's second output, 7 + noise. The epoch averages them over its 5 steps.
    optimizer = optax.sgd(0.0)
    loss_fn = lambda p, f, x, noise: ((p["w"] - 1.0) ** 2 + jnp.sum(p["v"] ** 2), 7.0 + noise)
    step = training.make_step_fn(loss_fn, optimizer)
    params = {"w": jnp.array(3.0), "v": jnp.array([1.0, 2.0])}
    _, metrics = step(None, (params, optimizer.init(params)), (DATA[:8], jnp.array(1.0)))
    self.assertAlmostEqual(float(metrics.loss), 9.0)
    self.assertAlmostEqual(float(metrics.kl), 8.0)
    self.assertAlmostEqual(float(metrics.grad_norm), 6.0, places=5)
    schedule = training.Schedule(batch_size=8, max_epochs=1, patience=1)
    epoch_fn = training.make_epoch_fn(lambda key, n, epoch: jnp.arange(n, dtype=jnp.float32),
                                      loss_fn, lambda p, f, d: 0.0, optimizer, schedule)
    state = training.init_state(params, optimizer, jax.random.PRNGKey(0))
    state, metrics = jax.jit(epoch_fn)(state, DATA, jnp.arange(40))
    self.assertAlmostEqual(float(metrics.loss), 9.0)
    self.assertAlmostEqual(float(metrics.kl), 7.0 + 2.0)       # noise 0, 1, 2, 3, 4
    self.assertAlmostEqual(float(metrics.grad_norm), 6.0, places=5)
    self.assertEqual(int(state.step), 5)

  def test_model_keys_are_the_halves_of_the_derived_key(self):
    key = training.derive_key(3, 2, 7)
    chex.assert_trees_all_equal(
        key, jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 2), 7))
    init_key, train_key = training.model_keys(3, 2, 7)
    chex.assert_trees_all_equal((init_key, train_key), tuple(jax.random.split(key)))
    self.assertFalse(np.array_equal(training.model_keys(3, 2, 8)[0], init_key))

  def test_population_keys_stack_each_models_keys_under_the_prefix(self):
    init_keys, train_keys, order_seeds = training.population_keys([(7,), (8,)], prefix=(3, 2))
    chex.assert_shape((init_keys, train_keys), (2, 2))
    np.testing.assert_array_equal(order_seeds, [[3, 2, 7], [3, 2, 8]])
    chex.assert_trees_all_equal((init_keys[1], train_keys[1]), training.model_keys(3, 2, 8))
    chex.assert_trees_all_equal((init_keys, train_keys, order_seeds),
                                training.population_keys([(3, 2, 7), (3, 2, 8)]))
    for paths, prefix in (([], (3,)), ([(1,), (1, 2)], (3,)), ([()], ())):
      with self.assertRaises(ValueError):
        training.population_keys(paths, prefix)

  def test_checkpointer_errors_and_round_trip(self):
    ckpt = checkpoints.Checkpointer(tempfile.mkdtemp())
    self.assertIsNone(ckpt.latest_step())
    with self.assertRaises(FileNotFoundError):
      ckpt.restore(like=_states(2))
    states = _states(2)
    ckpt.save(7, states)
    self.assertEqual(ckpt.latest_step(), 7)
    restored = ckpt.restore(like=states)
    self.assertIsInstance(restored, training.TrainState)
    chex.assert_trees_all_equal(restored, states)
    ckpt.close()

  def test_read_latest_gives_the_tree_as_saved_or_names_the_directory(self):
    directory = tempfile.mkdtemp()
    with self.assertRaisesRegex(ConfigError, "holds no complete checkpoint"):
      checkpoints.read_latest(directory)
    with self.assertRaisesRegex(ConfigError, "missing.* does not exist"):
      checkpoints.read_latest(os.path.join(directory, "missing"))
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(3, {"a": np.arange(3.0)})
    ckpt.save(5, {"a": np.arange(5.0)})
    ckpt.close()
    tree, step = checkpoints.read_latest(directory)
    self.assertEqual(step, 5)
    chex.assert_trees_all_equal(tree, {"a": np.arange(5.0)})

  def test_schedule_validation(self):
    with self.assertRaisesRegex(ValueError, "batch_size must be positive"):
      training.Schedule(batch_size=0, max_epochs=1, patience=1)


def test_examples_last_trains_the_same_model():
  # A loss and score that see [..., B] examples-last batches (and [..., N] data) give the same
  # population as the same functions on [B, ...] batches: same batches, noise and scores.
  schedule = training.Schedule(batch_size=8, max_epochs=5, patience=2)
  data = jnp.stack([DATA[:, 0], DATA[:, 0] ** 2], 1)   # [N, 2]

  def run(examples_last):
    rows = (lambda a: a.T) if examples_last else (lambda a: a)
    loss_fn = lambda p, f, x, noise: ((p["w"] - f - jnp.mean(rows(x) @ jnp.array([1.0, 2.0])))
                                      ** 2 + 0.1 * noise, 0.0)
    score_fn = lambda p, f, d: -(p["w"] - jnp.mean(rows(d)[:, 1])) ** 2
    epoch_fn = training.make_epoch_fn(lambda key, n, e: jax.random.normal(key, (n,)), loss_fn,
                                      score_fn, optax.sgd(0.1), schedule,
                                      examples_last=examples_last)
    return training.train_population(epoch_fn, _states(3), data, np.arange(3)[:, None],
                                     schedule, epochs_per_call=2)
  chex.assert_trees_all_equal(run(True), run(False))


def test_patience_check_measures_the_longest_wait_and_the_cost_of_half_the_patience():
  nan = float("nan")
  # Best at epochs 1, 2 and 7: the longest wait 5 epochs; with a patience of 6, half of it (3)
  # would have stopped at epoch 5 with the score of epoch 2, 0.5 below the selected one.
  epochs = np.arange(1, 11)
  scores = np.array([-3.0, -2.0, -2.5, -2.4, -2.2, -2.1, -1.5, -1.6, nan, nan])
  assert training.patience_check(epochs, scores, patience=6) == (5, 0.5)
  # From a starting point better than every epoch: never improved, nothing lost.
  assert training.patience_check(epochs, scores, patience=6, start=0.0) == (0, 0.0)
  # Improving every epoch: waits of one epoch, and half the patience loses nothing.
  assert training.patience_check(epochs, -1.0 / epochs, patience=4) == (1, 0.0)
