"""Population training: early stopping, masking, determinism, resume, checkpoints."""

import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iavae_jax import checkpoints, training

DATA = jnp.linspace(-1.0, 1.0, 40)[:, None]


def _epoch_fn(schedule, score_fn, python_steps=False):
  """A toy model: params {'w': scalar}; loss (w - mean(x))^2 + noise * 0."""
  def noise_fn(key, num_steps, unused_epoch):
    return jax.random.normal(key, (num_steps,))

  def loss_fn(params, frozen, x, noise):
    return (params["w"] - frozen - jnp.mean(x)) ** 2 + 0.0 * noise

  return training.make_epoch_fn(noise_fn, loss_fn, score_fn, optax.sgd(0.1), schedule,
                                python_steps=python_steps)


def _states(num_models):
  params = {"w": jnp.arange(num_models, dtype=jnp.float32) + 1.0}
  keys = jax.random.split(jax.random.PRNGKey(0), num_models)
  return jax.vmap(lambda p, k: training.init_state(p, optax.sgd(0.1), k))(params, keys)


class TrainingTest(chex.TestCase):

  def test_early_stopping_stops_when_it_should(self):
    # Model 0's score peaks at epoch 6 and then falls: with patience 4 it stops after epoch 10 and
    # keeps its epoch-6 parameters. Model 1's score keeps rising: it runs to max_epochs.
    schedule = training.Schedule(batch_size=8, max_epochs=30, patience=4)

    def score_fn(params, frozen, data):
      return jnp.where(frozen > 0, -jnp.abs(params["w"] - 3.0), params["w"])

    def loss_fn(params, frozen, x, noise):
      return -params["w"] + 0.0 * noise    # sgd(0.1): w grows by 0.1 a step, 0.5 an epoch

    epoch_fn = training.make_epoch_fn(lambda key, n, unused_epoch: jnp.zeros((n,)), loss_fn,
                                      score_fn, optax.sgd(0.1), schedule)
    params = {"w": jnp.zeros(2)}
    states = jax.vmap(lambda p, k: training.init_state(p, optax.sgd(0.1), k))(
        params, jax.random.split(jax.random.PRNGKey(0), 2))
    states = training.train_population(epoch_fn, states, jnp.array([1.0, 0.0]), DATA,
                                       np.array([[0], [1]]), schedule, epochs_per_call=3)
    # 5 steps of batch 8 per epoch: w = 0.5 e, so model 0's score -|0.5 e - 3| peaks at e = 6.
    self.assertEqual(int(states.best_epoch[0]), 6)
    self.assertEqual(int(states.epoch[0]), 6 + 4)
    self.assertTrue(bool(states.stopped[0]))
    np.testing.assert_allclose(states.best_params["w"][0], 3.0, atol=1e-5)
    self.assertEqual(int(states.epoch[1]), 30)
    self.assertFalse(bool(states.stopped[1]))
    self.assertEqual(int(states.best_epoch[1]), 30)

  def test_stopped_models_are_frozen(self):
    schedule = training.Schedule(batch_size=8, max_epochs=5, patience=50)
    epoch_fn = _epoch_fn(schedule, lambda p, f, d: -(p["w"] - f) ** 2)
    states = _states(3)
    states = states._replace(stopped=jnp.array([False, True, False]))
    run = training.make_population_step(epoch_fn)
    orders = training.data_orders(np.arange(3)[:, None], 0, 2, 40, 8)
    chex.assert_shape(orders, (2, 3, 40))
    new, metrics = run(states, jnp.zeros(3), DATA, orders)
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
    straight = training.train_population(epoch_fn, _states(2), jnp.zeros(2), DATA, seeds,
                                         schedule, epochs_per_call=3)
    saved = []
    ckpt_dir = tempfile.mkdtemp()
    ckpt = checkpoints.Checkpointer(ckpt_dir)

    def stop_after_first_chunk(states, metrics):
      ckpt.save(int(states.epoch.max()), states)
      saved.append(True)
      raise KeyboardInterrupt   # simulate the run dying after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
      training.train_population(epoch_fn, _states(2), jnp.zeros(2), DATA, seeds, schedule,
                                epochs_per_call=3, on_chunk=stop_after_first_chunk)
    restored = checkpoints.Checkpointer(ckpt_dir).restore(like=_states(2))
    self.assertEqual(int(restored.epoch.max()), 3)
    resumed = training.train_population(epoch_fn, restored, jnp.zeros(2), DATA, seeds, schedule,
                                        epochs_per_call=3)
    chex.assert_trees_all_equal(resumed, straight)

  def test_python_steps_train_the_same_model_as_a_population_of_one(self):
    # The convolutional models' driver (a Python loop over jitted steps, one model) and the
    # scanned, vmapped population driver see the same batches and noise: same result.
    schedule = training.Schedule(batch_size=8, max_epochs=7, patience=3)
    score_fn = lambda p, f, d: -(p["w"] - 2.0 - f) ** 2
    population = training.train_population(_epoch_fn(schedule, score_fn), _states(1),
                                           jnp.zeros(1), DATA, np.array([[4]]), schedule,
                                           epochs_per_call=2)
    epochs_seen = []
    single = training.train_model(_epoch_fn(schedule, score_fn, python_steps=True),
                                  jax.tree.map(lambda a: a[0], _states(1)), jnp.zeros(()), DATA,
                                  np.array([4]), schedule,
                                  lambda state, metrics: epochs_seen.append(int(state.epoch)))
    chex.assert_trees_all_close(single, jax.tree.map(lambda a: a[0], population), atol=1e-6)
    self.assertEqual(epochs_seen, list(range(1, int(single.epoch) + 1)))

  def test_single_model_resume_from_checkpoint_is_bitwise_identical(self):
    # The image experiments' path: a run that dies after an epoch's checkpoint and restarts from
    # it ends exactly where an uninterrupted run does.
    schedule = training.Schedule(batch_size=8, max_epochs=5, patience=100)
    epoch_fn = _epoch_fn(schedule, lambda p, f, d: -(p["w"] - f) ** 2, python_steps=True)
    start = jax.tree.map(lambda a: a[0], _states(1))
    straight = training.train_model(epoch_fn, start, jnp.zeros(()), DATA, np.array([3]),
                                    schedule)
    ckpt = checkpoints.Checkpointer(tempfile.mkdtemp())

    def die_after_epoch_2(state, metrics):
      ckpt.save(int(state.epoch), state)
      if int(state.epoch) == 2:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      training.train_model(epoch_fn, start, jnp.zeros(()), DATA, np.array([3]), schedule,
                           die_after_epoch_2)
    restored = ckpt.restore(like=start)
    self.assertEqual(int(restored.epoch), 2)
    resumed = training.train_model(epoch_fn, restored, jnp.zeros(()), DATA, np.array([3]),
                                   schedule)
    chex.assert_trees_all_equal(resumed, straight)

  def test_merge_aux_sets_state_the_optimiser_does_not_train(self):
    # A running mean kept in params["stat"]: the loss returns its new value as aux, the
    # optimiser's update for it is zeroed, and merge_aux writes it back.
    def loss_fn(params, frozen, x, noise):
      return (params["w"] - jnp.mean(x)) ** 2, 0.5 * params["stat"] + 0.5 * jnp.mean(x)
    optimizer = optax.multi_transform({"w": optax.sgd(0.1), "stat": optax.set_to_zero()},
                                      {"w": "w", "stat": "stat"})
    step = training.make_step_fn(loss_fn, optimizer,
                                 lambda params, stat: {**params, "stat": stat})
    params = {"w": jnp.array(0.0), "stat": jnp.array(0.0)}
    (params, _), loss = step(None, (params, optimizer.init(params)), (jnp.full(4, 2.0), None))
    self.assertAlmostEqual(float(loss), 4.0)
    self.assertAlmostEqual(float(params["stat"]), 1.0)
    self.assertAlmostEqual(float(params["w"]), 0.4, places=6)

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

  def test_schedule_validation(self):
    with self.assertRaisesRegex(ValueError, "batch_size must be positive"):
      training.Schedule(batch_size=0, max_epochs=1, patience=1)
