"""Running one training stage with Orbax checkpoints, resume and progress (shared by experiments)."""

import os

import jax.numpy as jnp
import numpy as np

from iavae_jax import checkpoints, training
from experiments import common


def run_stage(name: str, workdir: str, epoch_fn, states: training.TrainState, frozen, data,
              order_seeds, schedule: training.Schedule, checkpoint_every: int,
              epochs_per_call: int | None = None) -> training.TrainState:
  """Trains (or resumes, or just loads) the population ``states`` under DIR/checkpoints/NAME,
  ``epochs_per_call`` epochs per jitted call (``training.train_population``); without
  ``epochs_per_call``, ``states`` is one model's, trained by ``training.train_model``.

  A checkpoint that does not match ``states`` (another architecture or configuration) raises
  ConfigError before anything is written. A checkpoint is saved every ``checkpoint_every`` epochs
  and when every model is done; the final state is returned.
  """
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints", name))
  if ckpt.latest_step() is not None:
    try:
      states = ckpt.restore(like=states)
    except Exception as e:  # orbax raises several types for structure and shape mismatches
      ckpt.close()
      raise common.ConfigError(
          f"the checkpoint in {workdir}/checkpoints/{name} does not match this configuration "
          f"({type(e).__name__}: {str(e)[:300]}); use a new --workdir.") from e
    print(f"[{name}] resumed from the checkpoint at epoch {ckpt.latest_step()}", flush=True)
  progress = common.Progress(name, schedule.max_epochs, os.path.join(workdir, "metrics.jsonl"),
                             start_epoch=int(jnp.max(states.epoch)))
  last_saved = [ckpt.latest_step() or 0]

  def on_chunk(states, metrics):
    epoch = int(jnp.max(states.epoch))
    done = np.asarray(training.is_done(states, schedule))
    best = np.asarray(states.best_score)
    progress.update(epoch, int((~done).sum()), done.size, float(best.mean()), float(best.min()),
                    float(best.max()))
    if done.all() or epoch // checkpoint_every > last_saved[0] // checkpoint_every:
      ckpt.save(epoch, states)
      last_saved[0] = epoch

  if epochs_per_call is not None:
    states = training.train_population(epoch_fn, states, frozen, data, order_seeds, schedule,
                                       epochs_per_call, on_chunk)
  else:
    states = training.train_model(epoch_fn, states, frozen, data, order_seeds, schedule,
                                  on_chunk)
  ckpt.close()
  return states
