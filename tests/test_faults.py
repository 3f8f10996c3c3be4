"""Faults inside a run: a NaN or Inf stops it with the stage, model, epoch and step, and keeps the
last good checkpoint; a full disk or a failed checkpoint write stops it cleanly."""

import errno
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iavae_jax import checkpoints, stages, training
from iavae_jax.errors import RunError
from test_training import _states

DATA = jnp.linspace(-1.0, 1.0, 40)[:, None]
SCHEDULE = training.Schedule(batch_size=8, max_epochs=8, patience=8)   # 5 steps an epoch
NAMES = ["seed 0", "seed 1", "seed 2"]


def _poisoned_epoch_fn(bad_epoch: int, bad_step: int):
  """Toy models {'w'}; the model whose ``frozen`` is 1 gets a NaN loss at (bad_epoch, bad_step),
  both 0-based. Everything else trains normally."""
  def noise_fn(unused_key, num_steps, epoch):
    return (epoch == bad_epoch) & (jnp.arange(num_steps) == bad_step)

  def loss_fn(params, frozen, x, poison):
    loss = (params["w"] - jnp.mean(x)) ** 2
    return jnp.where(poison & (frozen == 1), jnp.nan, loss), 0.0

  score_fn = lambda params, frozen, data: -params["w"] ** 2
  return training.make_epoch_fn(noise_fn, loss_fn, score_fn, optax.sgd(0.1), SCHEDULE)


def test_nan_in_a_population_names_model_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path):
  epoch_fn = _poisoned_epoch_fn(bad_epoch=3, bad_step=4)
  with pytest.raises(RunError) as error:
    stages.run_stage("vae", str(tmp_path), epoch_fn, _states(3, frozen=[0, 1, 0]), DATA,
                     np.arange(3)[:, None], SCHEDULE, checkpoint_every=1, epochs_per_call=2,
                     model_names=NAMES)
  message = str(error.value)
  assert "[vae] seed 1 diverged in epoch 4" in message
  assert "NaN or Inf at step 5 of the epoch" in message
  assert "last good checkpoint (epoch 2)" in message and "--debug_nans" in message
  # The chunk of epochs 3-4 was not saved; epoch 2's checkpoint restores, finite.
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints", "vae"))
  assert ckpt.latest_step() == 2
  restored = ckpt.restore(like=_states(3))
  ckpt.close()
  np.testing.assert_array_equal(restored.epoch, [2, 2, 2])
  np.testing.assert_array_equal(restored.frozen, [0, 1, 0])
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(restored.params))


def test_nan_in_a_single_model_run_is_caught_after_its_epoch(tmp_path):
  epoch_fn = jax.jit(_poisoned_epoch_fn(bad_epoch=0, bad_step=2))
  state = jax.tree.map(lambda a: a[1], _states(2, frozen=[0, 1]))
  with pytest.raises(RunError, match=r"\[iavae_seed3\] iavae_seed3 diverged in epoch 1: "
                     r"the training loss was NaN or Inf at step 3 .* no checkpoint of this "
                     r"stage had been saved yet"):
    stages.run_stage("iavae_seed3", str(tmp_path), epoch_fn, state, DATA, np.array([3]),
                     SCHEDULE, checkpoint_every=1)
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints", "iavae_seed3"))
  assert ckpt.latest_step() is None      # nothing was good enough to save, and the error says so
  ckpt.close()


def test_non_finite_parameters_with_a_finite_loss_are_caught():
  # loss = sqrt(w - stop_gradient(w)) = 0, but its gradient is 1 / (2 sqrt(0)) = inf: after one
  # step (one batch of 8) the loss was finite and w is -inf.
  state = training.init_state({"w": jnp.array(1.0)}, optax.sgd(0.1), jax.random.PRNGKey(0))
  loss_fn = lambda p, f, x, noise: (jnp.sqrt(p["w"] - jax.lax.stop_gradient(p["w"])), 0.0)
  epoch_fn = training.make_epoch_fn(lambda key, n, epoch: jnp.zeros(n), loss_fn,
                                    lambda p, f, d: -p["w"] ** 2, optax.sgd(0.1), SCHEDULE)
  _, metrics = jax.jit(epoch_fn)(state, DATA, jnp.arange(8))
  assert int(metrics.bad_step) == -1 and not bool(metrics.params_finite)
  assert bool(training.diverged(metrics))


def test_too_little_free_disk_fails_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(stages.shutil, "disk_usage", lambda path: usage._replace(free=100))
  epoch_fn = _poisoned_epoch_fn(bad_epoch=-1, bad_step=-1)
  with pytest.raises(RunError, match=r"0.0 MiB free; this stage's checkpoints need"):
    stages.run_stage("vae", str(tmp_path), epoch_fn, _states(3), DATA, np.arange(3)[:, None],
                     SCHEDULE, checkpoint_every=1, epochs_per_call=2)


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(tmp_path,
                                                                             monkeypatch):
  epoch_fn = _poisoned_epoch_fn(bad_epoch=-1, bad_step=-1)
  save = checkpoints.Checkpointer.save

  def save_until_disk_full(self, step, tree):
    if step > 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    save(self, step, tree)

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save_until_disk_full)
  with pytest.raises(RunError, match=r"could not write the checkpoint of epoch 4 .*No "
                     r"space left on device.*resumes from the last checkpoint \(epoch 2\)"):
    stages.run_stage("vae", str(tmp_path), epoch_fn, _states(3), DATA, np.arange(3)[:, None],
                     SCHEDULE, checkpoint_every=1, epochs_per_call=2)
  monkeypatch.undo()
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints", "vae"))
  assert ckpt.latest_step() == 2
  chex.assert_tree_all_finite(ckpt.restore(like=_states(3)).params)
  ckpt.close()


def test_a_half_written_checkpoint_is_never_read(tmp_path):
  # What a kill during a save leaves: Orbax writes step 4 into "4.orbax-checkpoint-tmp-<time>"
  # and renames it to "4" only when complete.
  directory = tmp_path / "vae"
  states = _states(3)
  ckpt = checkpoints.Checkpointer(str(directory))
  ckpt.save(2, states)
  ckpt.close()
  partial = directory / "4.orbax-checkpoint-tmp-1764000000"
  shutil.copytree(directory / "2", partial)
  for path in partial.rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:3])          # truncated mid-write
  ckpt = checkpoints.Checkpointer(str(directory))
  assert ckpt.latest_step() == 2
  chex.assert_trees_all_equal(ckpt.restore(like=states), states)
  ckpt.save(4, states)                                  # the resumed run saves step 4 for real
  assert ckpt.latest_step() == 4
  chex.assert_trees_all_equal(ckpt.restore(like=states), states)
  ckpt.close()
