"""The decoder-feedback models from the command line: the pieces that read their results (the
refinement steps a model is worth, the longest wait for a better validation ELBO, the synthetic
experiment's feedback inputs); slow: a smoke run with the gradient feedback and the residual,
experiments.gaps on it (the tuned refinement, the decoder passes, the figure), experiments.designs
over it."""

import dataclasses
import json
import os

import pytest

from conftest import SMOKE, run_module
from experiments import common, configs, designs
from iavae_jax import gaps, image_runs, progress, synthetic_vae

# A dense smoke run: the feedback's decoder passes are cheap with a dense decoder.
DENSE = ["--encoder=mlp", "--encoder_hidden=16", "--decoder=mlp", "--decoder_hidden=16,16",
         "--num_seeds=2", "--feedback_samples=2"]
FROZEN = ["vae", "iavae_frozen_decoder", "control_frozen_decoder", "corrector_frozen_decoder"]


def test_early_stopping_reads_the_waits_off_the_validation_curves(tmp_path):
  lines = [{"stage": f"iavae_frozen_decoder_seed{seed}", "epoch": epoch, "valid_elbo": [value]}
           for seed, values in enumerate(([-5, -4, -4, -4, -3], [-1, -2, -2, -2, float("nan")]))
           for epoch, value in enumerate(values, start=1)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(
      {**line, **{k: [0.0] for k in progress.METRICS if k != "valid_elbo"}}) for line in lines))
  data = {"seeds": [0, 1], "data": {"train": 30},
          "config": {"batch_size": 10, "patience": 4, "iavae_epochs": 10},
          "models": {"iavae_frozen_decoder": {"valid_elbo_at_start": [-6.0, -1.5],
                                              "best_epoch": [5, 1]}}}
  check = lambda: image_runs.early_stopping(str(tmp_path), data, [0, 1],
                                            ["iavae_frozen_decoder"])
  # Seed 0 improves at epochs 1, 2, 5 (a wait of 3 epochs of 3 steps); with half of a patience
  # of 4 epochs it stops at epoch 4 and keeps -4, one nat below -3. Seed 1 improves at epoch 1.
  assert check() == {"patience_steps": 12, "models": {"iavae_frozen_decoder": {
      "longest_wait_steps": 9, "lost_at_half_patience": 0.5, "seeds_at_epoch_cap": 0}}}
  data["config"]["patience"] = 6
  assert check()["models"]["iavae_frozen_decoder"]["lost_at_half_patience"] == 0.0
  # A start that was not a candidate is not a baseline: seed 1 then improves at epoch 1 too.
  data["config"].update(patience=4, start_as_candidate=False)
  assert check()["models"]["iavae_frozen_decoder"]["longest_wait_steps"] == 9
  # Without metrics.jsonl the waits are unknown; the epoch cap is read off results.json.
  (tmp_path / "metrics.jsonl").unlink()
  assert check()["models"]["iavae_frozen_decoder"] == {
      "longest_wait_steps": None, "lost_at_half_patience": None, "seeds_at_epoch_cap": 0}


def test_frozen_entry_counts_the_seeds_that_ended_at_the_epoch_cap(tmp_path):
  # 30 images of batch 10: 3 steps an epoch, so a patience of 6 steps is 2 epochs; with a cap of
  # 10 epochs a best epoch of 9 or 10 leaves the patience unspent at the end, 8 does not.
  model = lambda best: {"test_elbo": [-3.0, -2.0, -1.0], "best_epoch": best}
  data = {"seeds": [0, 1, 2], "data": {"train": 30},
          "config": {"batch_size": 10, "stage2_patience_steps": 6, "iavae_epochs": 10},
          "models": {"iavae_frozen_decoder": model([8, 9, 10]),
                     "corrector_frozen_decoder": model([8, 8, 8]),
                     "iavae_frozen_decoder_mean_context": model([8, 9, 10])}}
  entry = designs.frozen_entry(str(tmp_path / "results.json"), data, None, [0, 1, 2])
  assert entry["patience_steps"] == 6
  assert {m: v["seeds_at_epoch_cap"] for m, v in entry["models"].items()} == {
      "iavae_frozen_decoder": 2, "corrector_frozen_decoder": 0,
      "iavae_frozen_decoder_mean_context": None}
  assert entry["vs_corrector"]["mean_difference"] == 0.0


def test_frozen_entry_reads_the_steps_worth_off_the_seeds_it_compares():
  # gaps.json over seeds 0 and 1; a designs table on seed 0 alone takes seed 0's curve and
  # target (-5 is reached at K = 1), not the means over both (-3 between -6 at K = 1 and -2 at
  # K = 2: 1.75).
  elbos = lambda *per_seed: [{"per_seed": list(values)} for values in per_seed]
  gaps = {"seeds": [0, 1],
          "iavae_frozen_decoder": {"refinement": {"elbo": elbos((-5.0, -1.0))}},
          "vae_refinement": {"tuned": {"steps": [0, 1, 2],
                                       "elbo": elbos((-9.0, -9.0), (-5.0, -7.0), (-3.0, -1.0))}},
          "refinement_steps_worth": {"iavae_frozen_decoder": {}}}
  data = {"seeds": [0, 1], "data": {"train": 30},
          "config": {"batch_size": 10, "patience": 2, "iavae_epochs": 10},
          "models": {"iavae_frozen_decoder": {"test_elbo": [-3.0, -2.0], "best_epoch": [1, 1]}}}
  worth = lambda seeds: designs.frozen_entry("results.json", data, gaps, seeds)["models"][
      "iavae_frozen_decoder"]["worth_steps"]
  assert worth([0]) == {"tuned": 1.0}
  assert worth([0, 1]) == {"tuned": 1.75}


@pytest.mark.parametrize("kind, size, passes", [("x", 3, 0), ("gradient", 15, 6),
                                                ("residual", 10, 3)])
def test_synthetic_feedback_inputs(kind, size, passes):
  config = dataclasses.replace(configs.SyntheticConfig(), hypernet_input=kind,
                               passes=3 if passes else 1).validate()
  assert synthetic_vae.context_size(config) == size
  assert synthetic_vae.decoder_passes(config) == passes
  assert (synthetic_vae.feedback_context(config) is None) == (kind == "x")


def test_synthetic_passes_need_a_feedback_input():
  with pytest.raises(common.ConfigError, match="--passes=2: give 1, or more with"):
    dataclasses.replace(configs.SyntheticConfig(), passes=2).validate()


@pytest.mark.slow
def test_gradient_feedback_end_to_end(smoke_data_dir, tmp_path):
  workdir = str(tmp_path / "gradient" / "mnist")
  result = run_module("experiments.images", f"--workdir={workdir}", *SMOKE, *DENSE,
                      f"--data_dir={smoke_data_dir}", "--hypernet_input=gradient", "--passes=2",
                      f"--models={','.join(FROZEN)}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert r["decoder_passes_per_example"] == {
      "vae": 0, "iavae_frozen_decoder": 8, "control_frozen_decoder": 0,
      "corrector_frozen_decoder": 8, "iavae_frozen_decoder_mean_context": 0}
  result = run_module("experiments.gaps", f"--workdir={workdir}", "--num_examples=6",
                      "--convergence_examples=2", "--tune_examples=6", "--tune_budget=32",
                      optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "gaps.json")) as f:
    g = json.load(f)
  shared = set(FROZEN[1:]) | {"iavae_frozen_decoder_mean_context"}
  assert set(g["same_decoder_as_vae"]) == shared
  assert set(g["refinement_steps_worth"]) == shared
  assert g["decoder_passes_per_example"]["iavae_frozen_decoder"] == 8
  tuned = g["vae_refinement"]["tuned"]
  assert len(tuned["tuning"]["candidates"]) == (len(gaps.TUNE_SGD_FACTORS)
                                                + len(gaps.TUNE_ADAM_RATES)) * 3
  assert tuned["tuning"]["chosen"] in tuned["tuning"]["candidates"]
  assert [f["samples_per_step"] for f in tuned["tuning"]["sa_vae_first_step"]] == [1, 10, 100]
  assert tuned["decoder_passes"] == [2 * tuned["settings"]["samples_per_step"] * k
                                     for k in tuned["steps"]]
  assert os.path.exists(os.path.join(workdir, "gaps_passes.png"))
  result = run_module("experiments.designs", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "designs.json") as f:
    frozen = json.load(f)["mnist"]["frozen_decoder"]["mlp input=gradient passes=2 samples=2"]
  assert set(frozen["models"]) == shared
  assert {"vs_control", "vs_corrector", "vs_mean_input"} <= set(frozen)


@pytest.mark.slow
def test_residual_feedback_trains(smoke_data_dir, tmp_path):
  result = run_module("experiments.images", f"--workdir={tmp_path}", *SMOKE, *DENSE,
                      f"--data_dir={smoke_data_dir}", "--hypernet_input=residual",
                      "--models=vae,iavae,corrector")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    r = json.load(f)
  assert r["decoder_passes_per_example"]["iavae"] == 1
  assert "iavae_mean_context" in r["models"]
