"""Learning curves: metrics.jsonl lines per epoch and model, their reading and plot, TensorBoard
event files, and progress inside a long epoch."""

import json
import os
import struct

import numpy as np
import pytest

from iavae_jax import progress, runs, training


def _metrics(loss, kl, grad_norm, score):
  """EpochMetrics of NumPy arrays [epochs, models] (what run_stage hands StageLog)."""
  loss = np.asarray(loss, np.float32)
  return training.EpochMetrics(loss, np.asarray(kl, np.float32),
                               np.asarray(grad_norm, np.float32),
                               np.asarray(score, np.float32), np.full(loss.shape, -1),
                               np.ones(loss.shape, bool))


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_line_per_epoch_with_a_value_per_model(tmp_path, capsys):
  # Two models from epoch 4; model 1 stops after one epoch of this 2-epoch chunk.
  log = progress.StageLog("vae", str(tmp_path), total_epochs=10, num_models=2, steps_per_epoch=5,
                        start_epoch=4)
  nan = np.nan
  log.chunk(np.array([4, 4]), np.array([6, 5]),
            _metrics([[1.5, 2.5], [1.25, nan]], [[0.5, 0.75], [0.25, nan]],
                     [[3.0, 4.0], [2.0, nan]], [[-10.0, -20.0], [-9.0, -20.0]]),
            best=np.array([-9.0, -20.0]), done=np.array([False, True]))
  first, second = _lines(tmp_path)
  assert first["stage"] == "vae" and (first["epoch"], second["epoch"]) == (5, 6)
  assert (first["training"], second["training"]) == (2, 1)
  assert first["train_loss"] == [1.5, 2.5] and second["train_loss"] == [1.25, None]
  assert second["train_kl"] == [0.25, None] and second["grad_norm"] == [2.0, None]
  assert first["valid_elbo"] == [-10.0, -20.0] and second["valid_elbo"] == [-9.0, None]
  assert first["steps_per_s"] == second["steps_per_s"] > 0    # 2 epochs x 5 steps, timed
  out = capsys.readouterr().out
  assert out.startswith("[vae] epoch 6/10  training 1/2  best ELBO mean -14.5000")
  log.close()


def test_a_single_model_logs_one_value_lists(tmp_path):
  log = progress.StageLog("iavae_seed3", str(tmp_path), 5, 1, 2)
  log.chunk(np.array([0]), np.array([1]), _metrics(2.0, 0.5, 1.0, -3.0), best=np.array([-3.0]),
            done=np.array([False]))
  (line,) = _lines(tmp_path)
  assert line["epoch"] == 1 and line["valid_elbo"] == [-3.0] and line["training"] == 1


def test_curves_group_the_seeds_of_a_stage_and_the_last_line_of_an_epoch_counts(tmp_path):
  def write(stage, epoch, loss, seconds=0.0):
    line = {"stage": stage, "epoch": epoch, "training": len(loss), "train_loss": loss,
            "train_kl": loss, "grad_norm": loss, "valid_elbo": loss, "steps_per_s": 1.0,
            "seconds": seconds}
    with open(tmp_path / "metrics.jsonl", "a") as f:
      f.write(json.dumps(line) + "\n")
  write("vae_seed0", 1, [1.0])
  write("vae_seed0", 2, [2.0])
  write("vae_seed0", 2, [2.0], seconds=9.0)     # logged again after a kill and a resume
  write("iavae_seed0", 1, [5.0])
  write("vae_seed1", 1, [3.0])
  write("vae_seed1", 2, [None])
  curves = progress.read_learning_curves(str(tmp_path / "metrics.jsonl"))
  assert list(curves) == ["vae", "iavae"]
  np.testing.assert_array_equal(curves["vae"]["epoch"], [1, 2])
  np.testing.assert_array_equal(curves["vae"]["train_loss"], [[1.0, 3.0], [2.0, np.nan]])
  np.testing.assert_array_equal(curves["iavae"]["valid_elbo"], [[5.0]])
  runs.save_learning_curves(str(tmp_path), "a test")
  assert os.path.getsize(tmp_path / "learning_curves.png") > 0


def _read_records(path):
  """The payloads of a TFRecord file (length, its CRC, data, its CRC)."""
  records = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      records.append(f.read(length))
      f.read(4)
  return records


def test_tensorboard_event_files_hold_every_model_and_metric(tmp_path):
  pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  log = progress.StageLog("iavae", str(tmp_path), 10, 2, 5, tensorboard=True)
  log.chunk(np.array([0, 0]), np.array([1, 1]),
            _metrics([[1.5, 2.5]], [[0.5, 0.75]], [[3.0, 4.0]], [[-10.0, -20.0]]),
            best=np.array([-10.0, -20.0]), done=np.array([False, False]))
  log.close()
  directory = tmp_path / "tensorboard" / "iavae"
  (event_file,) = os.listdir(directory)
  scalars = {}
  for record in _read_records(directory / event_file):
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      scalars[value.tag] = (event.step, value.simple_value)
  assert scalars["train_loss/model_1"] == (1, 2.5)
  assert scalars["valid_elbo/model_0"] == (1, -10.0)
  assert scalars["grad_norm/model_0"] == (1, 3.0) and "train_kl/model_1" in scalars
  assert scalars["steps_per_s"][0] == 1


def test_progress_inside_a_long_epoch(capsys):
  waited = []
  ticker = progress.StepProgress("vae_seed0", epoch=3, total_epochs=10, num_steps=1000,
                                interval=0.0)
  ticker.update(250, lambda: waited.append(True))
  out = capsys.readouterr().out
  assert waited == [True]
  # Not "[vae_seed0] epoch 3/": that prefix is the end of an epoch (tests kill runs on it).
  assert out.startswith("[vae_seed0] step 250/1000 of epoch 3/10: ")
  assert "steps/s, ETA" in out and "for the stage at most" in out
  quiet = progress.StepProgress("vae_seed0", 3, 10, 1000, interval=3600.0)
  quiet.update(250, lambda: waited.append(True))
  assert waited == [True] and not capsys.readouterr().out
