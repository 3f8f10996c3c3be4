"""Running one training stage with Orbax checkpoints: resume, progress and learning curves
(``progress``), and the faults that stop a run (``errors``); and stages on a second thread
(``Background``)."""

import atexit
import os
import shutil
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import checkpoints, parallel as parallel_lib, progress, training
from iavae_jax.errors import Cancelled, ConfigError, RunError

__all__ = ["KEPT_CHECKPOINTS", "run_stage", "Background"]

KEPT_CHECKPOINTS = 2


def run_stage(name: str, workdir: str, epoch_fn, states: training.TrainState, data,
              order_seeds, schedule: training.Schedule, checkpoint_every: int,
              epochs_per_call: int | None = None,
              model_names: list[str] | None = None,
              parallel: parallel_lib.Parallel | None = None,
              tensorboard: bool = False,
              cancelled: Callable[[], bool] | None = None) -> training.TrainState:
  """Trains (or resumes, or just loads) the population ``states`` under DIR/checkpoints/NAME,
  ``epochs_per_call`` epochs per jitted call (``training.train_population``); without
  ``epochs_per_call``, ``states`` is one model's, trained by ``training.train_model`` with
  ``epoch_fn(state, data, order)``.

  A checkpoint that cannot be restored into ``states`` (another architecture or configuration,
  or a damaged file) raises ConfigError before anything is written. A checkpoint is saved every
  ``checkpoint_every`` epochs and when every model is done; the final state is returned. Every
  epoch's metrics go to DIR/metrics.jsonl (and to TensorBoard under DIR/tensorboard/NAME with
  ``tensorboard``; see ``progress.StageLog``).

  Faults raise RunError and leave the last good checkpoint as it was: a NaN or Inf in a model's
  loss or parameters (the message names the stage, the model from ``model_names``, the epoch and
  the step), too little free disk for the checkpoints, or a failed checkpoint write.

  With a ``parallel``, training uses its devices (see ``iavae_jax.parallel``); checkpoints and
  the returned state are host copies, so a run may resume on another number of devices.

  ``cancelled`` (e.g. for a stage run on another thread) is checked after every chunk; when it
  returns True the stage raises Cancelled, keeping its checkpoints.
  """
  directory = os.path.join(workdir, "checkpoints", name)
  ckpt = checkpoints.Checkpointer(directory, max_to_keep=KEPT_CHECKPOINTS)
  states = _restored(ckpt, states, name, directory)
  _check_free_space(name, directory, states)
  num_models = int(np.size(states.epoch))
  names = model_names or ([name] if num_models == 1 else
                          [f"{name} model {i}" for i in range(num_models)])
  log = progress.StageLog(name, workdir, schedule.max_epochs, num_models,
                        data.shape[0] // schedule.batch_size,
                        start_epoch=int(jnp.max(states.epoch)), tensorboard=tensorboard)
  on_chunk = _OnChunk(name, names, directory, ckpt, log, schedule, checkpoint_every,
                      np.asarray(states.epoch).reshape(-1), epochs_per_call is not None,
                      cancelled)
  try:
    if epochs_per_call is not None:
      states = training.train_population(epoch_fn, states, data, order_seeds, schedule,
                                         epochs_per_call, on_chunk, parallel)
    else:
      states = training.train_model(epoch_fn, states, data, order_seeds, schedule, on_chunk,
                                    parallel)
  finally:
    ckpt.close()
    log.close()
  return states if parallel is None else parallel_lib.to_host(states)


def _restored(ckpt: checkpoints.Checkpointer, states, name: str, directory: str):
  """states from the stage's latest checkpoint, if it has one; ConfigError if that cannot be
  restored into them."""
  latest = ckpt.latest_step()
  if latest is None:
    return states
  try:
    states = ckpt.restore(like=states)
  except Exception as e:  # orbax raises several types for structure, shape and read errors
    ckpt.close()
    raise ConfigError(
        f"the checkpoint in {directory} cannot be restored into this configuration's stage "
        f"'{name}': it was written by another configuration or is damaged "
        f"({type(e).__name__}: {str(e)[:300]}). Use a new workdir; if it is damaged, delete "
        f"{os.path.join(directory, str(latest))} to resume from the previous checkpoint, or "
        f"{directory} to retrain this stage.") from e
  print(f"[{name}] resumed from the checkpoint at epoch {latest}", flush=True)
  return states


class _OnChunk:
  """What run_stage does after every chunk of epochs (training.train_population's or
  train_model's on_chunk): cancellation, the fault checks, the log, and a checkpoint every
  checkpoint_every epochs and when every model is done."""

  def __init__(self, name, model_names, directory, ckpt, log, schedule, checkpoint_every,
               epochs, population: bool, cancelled):
    self.name, self.model_names, self.directory, self.ckpt, self.log = (
        name, model_names, directory, ckpt, log)
    self.schedule, self.checkpoint_every, self.population = schedule, checkpoint_every, population
    self.cancelled, self.epochs_before, self.last_saved = cancelled, epochs, ckpt.latest_step() or 0

  def __call__(self, states, metrics):
    if self.cancelled is not None and self.cancelled():
      raise Cancelled(self.name)
    reported = time.time()
    # NumPy copies (gathered if spread over hosts); the whole state only when it is saved.
    metrics, epochs, best, done = parallel_lib.to_host(
        (metrics, states.epoch, states.best_score, training.is_done(states, self.schedule)))
    _check_finite(self.name, self.model_names, self.epochs_before, metrics, self.directory,
                  self.last_saved)
    self.log.chunk(self.epochs_before, epochs.reshape(-1), metrics, best.reshape(-1),
                   done.reshape(-1))
    self.epochs_before = epochs.reshape(-1)
    epoch = int(epochs.max())
    if done.all() or epoch // self.checkpoint_every > self.last_saved // self.checkpoint_every:
      self._save(epoch, states)
    # The next chunk's time: a population's next chunk already runs (train_population dispatches
    # it before calling on_chunk); a single model's next epoch starts after this checkpoint.
    self.log.restart_clock(reported if self.population else time.time())

  def _save(self, epoch: int, states) -> None:
    try:
      self.ckpt.save(epoch, parallel_lib.to_host(states))
    except Exception as e:
      raise RunError(
          f"[{self.name}] could not write the checkpoint of epoch {epoch} in {self.directory} "
          f"({type(e).__name__}: {str(e)[:300]}). Free disk space or fix the directory's "
          "permissions, then rerun the same command: it resumes from the last checkpoint "
          f"(epoch {self.last_saved}).") from e
    self.last_saved = epoch


def _check_finite(name, model_names, epochs_before, metrics: training.EpochMetrics, directory,
                  last_saved):
  """Raises RunError naming the first (epoch, model) whose loss or parameters went non-finite."""
  bad = np.asarray(training.diverged(metrics)).reshape(-1, len(model_names))  # [epochs, models]
  if not bad.any():
    return
  epoch_index, model = map(int, np.argwhere(bad)[0])
  bad_step = int(np.asarray(metrics.bad_step).reshape(bad.shape)[epoch_index, model])
  what = (f"the training loss was NaN or Inf at step {bad_step + 1} of the epoch"
          if bad_step >= 0 else "the parameters became NaN or Inf (the loss stayed finite)")
  kept = (f"the last good checkpoint (epoch {last_saved}) is intact in {directory}" if last_saved
          else "no checkpoint of this stage had been saved yet")
  epoch = int(epochs_before[model]) + epoch_index + 1
  raise RunError(
      f"[{name}] {model_names[model]} diverged in epoch {epoch}: {what}. Nothing of that epoch "
      f"was saved; {kept}. Rerun with jax_debug_nans on (the commands' --debug_nans) to stop at "
      "the operation that produced it, or lower the learning rate.")


def _check_free_space(name: str, directory: str, states) -> None:
  """Fails fast when the disk cannot hold this stage's checkpoints."""
  size = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(states))
  needed = (KEPT_CHECKPOINTS + 1) * size   # the kept ones and the one being written
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise RunError(
        f"[{name}] {directory} has {free / 2**20:.1f} MiB free; this stage's checkpoints need "
        f"about {needed / 2**20:.1f} MiB ({KEPT_CHECKPOINTS} kept + 1 being written, "
        f"{size / 2**20:.1f} MiB each). Free disk space or choose another workdir.")


class Background:
  """Runs fn(cancelled) on a second thread, where cancelled() says whether to stop early (pass
  it to ``run_stage``).

  For work that needs nothing from the main thread's: XLA runs both threads' computations at
  once, so on a CPU each gets a core. result() waits and returns fn's value (or raises its
  exception). fn should check cancelled() often (a stage checks it after every chunk) and then
  raise Cancelled: a program that ends early (an error or Ctrl-C in the main thread) asks every
  unfinished task to stop and waits for it (``stop_unfinished``, also an exit hook), since JAX
  aborts a process that exits while another thread is inside XLA. What a stopped stage
  checkpointed resumes like a killed run's.
  """
  _unfinished = set()
  _exit_hook = False

  def __init__(self, fn: Callable[[Callable[[], bool]], Any]):
    self._stop = threading.Event()
    self._outcome = {}

    def run():
      try:
        self._outcome["value"] = fn(self._stop.is_set)
      except BaseException as e:  # pylint: disable=broad-except  (re-raised by result())
        self._outcome["error"] = e
    # A daemon thread, so that the interpreter reaches the exit hook below instead of waiting.
    self._thread = threading.Thread(target=run, name="background", daemon=True)
    if not Background._exit_hook:   # registered after JAX's, so it runs before JAX's
      Background._exit_hook = bool(atexit.register(Background.stop_unfinished))
    Background._unfinished.add(self)
    self._thread.start()

  def result(self) -> Any:
    self._thread.join()
    Background._unfinished.discard(self)
    if "error" in self._outcome:
      raise self._outcome["error"]
    return self._outcome["value"]

  @staticmethod
  def stop_unfinished() -> None:
    """Asks every unfinished task to stop, and waits for it."""
    for task in list(Background._unfinished):
      task._stop.set()
      task._thread.join()
    Background._unfinished.clear()
