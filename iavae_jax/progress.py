"""What a training stage reports: a progress line per chunk of epochs (and inside long epochs),
every epoch's metrics as a line of WORKDIR/metrics.jsonl (and TensorBoard scalars), and the
learning curves read back from that file. Only the primary process writes
(``parallel.is_primary``)."""

import json
import os
import re
import time
from typing import Any, Callable

import numpy as np

from iavae_jax import parallel

__all__ = ["METRICS", "StageLog", "StepProgress", "read_learning_curves"]

METRICS = ("train_loss", "train_kl", "grad_norm", "valid_elbo")   # per model, per epoch
_METRIC_FIELDS = {"train_loss": "loss", "train_kl": "kl", "grad_norm": "grad_norm",
                  "valid_elbo": "score"}                           # training.EpochMetrics's


class StageLog:
  """One stage's progress and learning curves (primary process only): a progress line per
  chunk of epochs, a line per epoch in WORKDIR/metrics.jsonl and, with ``tensorboard``,
  TensorBoard scalars under WORKDIR/tensorboard/NAME (tagged METRIC, or METRIC/model_I in a
  population, against the epoch).

  A metrics.jsonl line: {"stage": NAME, "epoch": epochs completed, "training": how many models
  trained in that epoch, "train_loss", "train_kl", "grad_norm", "valid_elbo": one value per
  model of the stage (null for a model that had stopped), "steps_per_s": optimiser steps per
  second (every model of a population takes each step), "seconds": since the stage started}.
  """

  def __init__(self, name: str, workdir: str, total_epochs: int, num_models: int,
               steps_per_epoch: int, start_epoch: int = 0, tensorboard: bool = False):
    self.name, self.total, self.num_models = name, total_epochs, num_models
    self.steps_per_epoch = steps_per_epoch
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.start_epoch = start_epoch
    self.start_time = self.chunk_start = time.time()
    self.writer = None
    if tensorboard and parallel.is_primary():
      import tensorboardX  # pylint: disable=g-import-not-at-top  (an optional extra)
      self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard", name))

  def restart_clock(self, start: float) -> None:
    """Times the next chunk from ``start`` (a time.time())."""
    self.chunk_start = start

  def chunk(self, epochs_before, epochs_after, metrics, best, done) -> None:
    """Logs a chunk of epochs: per model [M], the epochs completed before and after it, the best
    scores and done flags after it; ``metrics`` a training.EpochMetrics of NumPy arrays
    ([epochs, M], or scalars for one model)."""
    if not parallel.is_primary():
      return
    now = time.time()
    trained = epochs_after - epochs_before    # epochs each model trained in this chunk
    rows = int(trained.max())
    first = int(epochs_before[trained > 0].max())
    steps_per_s = rows * self.steps_per_epoch / max(now - self.chunk_start, 1e-9)
    values = {key: np.asarray(getattr(metrics, field)).reshape(-1, self.num_models)
              for key, field in _METRIC_FIELDS.items()}
    lines = []
    for row in range(rows):
      ran = trained > row
      line = {"stage": self.name, "epoch": first + row + 1, "training": int(ran.sum())}
      line.update({key: [float(str(v)) if r else None for v, r in zip(values[key][row], ran)]
                   for key in METRICS})
      line.update({"steps_per_s": steps_per_s, "seconds": now - self.start_time})
      lines.append(line)
    with open(self.metrics_path, "a") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
    if self.writer is not None:
      for line in lines:
        for key in METRICS:
          for i, value in enumerate(line[key]):
            if value is not None:
              tag = key if self.num_models == 1 else f"{key}/model_{i}"
              self.writer.add_scalar(tag, value, line["epoch"])
        self.writer.add_scalar("steps_per_s", steps_per_s, line["epoch"])
    epoch = int(epochs_after.max())
    rate = (epoch - self.start_epoch) / (now - self.start_time)
    eta = (self.total - epoch) / rate if rate > 0 else float("nan")
    print(f"[{self.name}] epoch {epoch}/{self.total}  training {int((~done).sum())}/{done.size}"
          f"  best ELBO mean {best.mean():.4f} (min {best.min():.4f}, max {best.max():.4f})  "
          f"{rate:.1f} epochs/s ({steps_per_s:.0f} steps/s)  ETA {eta:.0f}s at most",
          flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class StepProgress:
  """Progress inside a long epoch: at most every ``interval`` seconds, a line with the step, the
  rate and the time left (``update`` waits for the steps dispatched so far before it counts)."""

  def __init__(self, name: str, epoch: int, total_epochs: int, num_steps: int,
               interval: float = 30.0):
    self.name, self.epoch, self.total, self.num_steps = name, epoch, total_epochs, num_steps
    self.interval = interval
    self.start = self.last = time.time()

  def update(self, step: int, wait: Callable[[], Any]) -> None:
    """After ``step`` (1-based) of the epoch's steps; wait() blocks until they have run."""
    if time.time() - self.last < self.interval or not parallel.is_primary():
      return
    wait()
    self.last = time.time()
    rate = step / (self.last - self.start)
    left = (self.num_steps - step) / rate
    stage_left = left + (self.total - self.epoch) * self.num_steps / rate
    print(f"[{self.name}] step {step}/{self.num_steps} of epoch {self.epoch}/{self.total}: "
          f"{rate:.1f} steps/s, ETA {left:.0f}s for the epoch, {stage_left:.0f}s for the stage "
          "at most", flush=True)


def read_learning_curves(metrics_path: str) -> dict:
  """The curves of metrics.jsonl, grouped by stage kind (a stage's name less any _seedN):
  {kind: {"epoch": [E], METRIC: [E, curves]}}, a curve per model of each stage of that kind, NaN
  where a model did not train. Of an epoch logged twice (a run killed after logging it, before
  its checkpoint, then resumed), the last line counts."""
  lines = {}
  with open(metrics_path) as f:
    for text in f:
      line = json.loads(text)
      lines[line["stage"], line["epoch"]] = line
  stages = {}   # stage -> {epoch: line}, in the order stages first appear
  for (stage, epoch), line in lines.items():
    stages.setdefault(stage, {})[epoch] = line
  kinds = {}
  for stage, by_epoch in stages.items():
    kinds.setdefault(re.sub(r"_seed\d+$", "", stage), []).append(by_epoch)
  curves = {}
  for kind, runs in kinds.items():
    epochs = sorted({epoch for by_epoch in runs for epoch in by_epoch})
    curves[kind] = {"epoch": np.array(epochs)}
    for key in METRICS:
      columns = []
      for by_epoch in runs:
        width = len(next(iter(by_epoch.values()))[key])
        column = np.full((len(epochs), width), np.nan)
        for row, epoch in enumerate(epochs):
          if epoch in by_epoch:
            column[row] = [np.nan if v is None else v for v in by_epoch[epoch][key]]
        columns.append(column)
      curves[kind][key] = np.concatenate(columns, axis=1)
  return curves
