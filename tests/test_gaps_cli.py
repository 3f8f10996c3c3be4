"""experiments.gaps: the summary over seeds and the settings (in process, fast), and the command
end to end on the smoke run (slow): the ordering log p^ >= L[q*] >= L[q], resume after a kill,
refused settings and bad input (exit 2, nothing written)."""

import functools
import json
import os
import shutil

import chex
import numpy as np
import pytest

from iavae_jax import gap_runs, gaps
from experiments import configs, gaps_eval

from conftest import SMOKE_GAPS, run_module

# The gap measurements compute more than they compile: optimised.
run = functools.partial(run_module, optimized=True)

# What a smoke run of experiments.images reports: its three models and the mean-input IA-VAE.
MODELS = ("vae", "iavae", "control", "iavae_mean_context")
QUANTITIES = ("log_px", "elbo_qstar", "elbo", "approximation_gap", "amortization_gap")


def _job(elbo, elbo_qstar, log_px, curve, doubled=None):
  """A (model, seed)'s record (gap_runs.measure_examples), from per-example lists."""
  n = len(elbo)
  return {"examples_done": n, "elbo": elbo, "elbo_qstar": elbo_qstar, "log_px": log_px,
          "qstar_steps": [100] * n, "refinement_elbo": curve, "qstar_steps_computed": 100 * n,
          "seconds": {phase: 1.0 * n for phase in gap_runs.PHASES},
          "convergence_done": len(doubled or []), "elbo_qstar_doubled": doubled or [],
          "qstar_steps_doubled": [200] * len(doubled or [])}


def test_summary_over_seeds():
  # What summarize reads of the measurements: the refinement steps, q*'s and log p^'s samples.
  measurements = gaps.Measurements(None, gaps.QStarSettings(), gaps.RefineSettings(),
                                   refine_steps=(1, 5), final_samples=100, iwae_samples=100,
                                   refine_eval_samples=100)
  # Two seeds, two examples each. VAE amortization gaps 2 and 4; IA-VAE 1 and 1: it closes
  # 1/2 and 3/4 of its seed's VAE gap.
  per_job = {
      ("vae", 0): _job([-12, -10], [-10, -8], [-9, -7], [[-12, -11, -10], [-10, -9, -9]],
                       doubled=[-9.99]),
      ("vae", 1): _job([-14, -12], [-10, -8], [-9, -7], [[-14, -13, -10], [-12, -11, -10]],
                       doubled=[-9.9]),
      ("iavae", 0): _job([-10.5, -9.5], [-9.5, -8.5], [-9, -8], [[-10.5, -10, -9.5],
                                                                 [-9.5, -9, -9]]),
      ("iavae", 1): _job([-11, -9], [-10, -8], [-9, -7], [[-11, -10, -10], [-9, -8, -8]]),
  }
  r = gap_runs.summarize(per_job, ["vae", "iavae"], [0, 1], measurements, 0.05)
  assert r["models"] == ["vae", "iavae"] and r["seeds"] == [0, 1]
  assert r["vae"]["amortization_gap"]["per_seed"] == [2, 4]
  assert r["vae"]["amortization_gap"]["mean"] == 3
  assert r["vae"]["amortization_gap"]["std"] == pytest.approx(np.sqrt(2))
  assert r["vae"]["approximation_gap"]["per_seed"] == [1, 1]
  assert r["iavae"]["amortization_gap"]["per_seed"] == [1, 1]
  assert r["iavae"]["share_of_vae_amortization_gap_closed"]["per_seed"] == [0.5, 0.75]
  assert "share_of_vae_amortization_gap_closed" not in r["vae"]
  # Refinement: the VAE's mean curves per seed are [-11, -10, -9.5] and [-13, -12, -10], their
  # mean [-12, -11, -9.75]; the IA-VAE's K = 0 means are -10 and -10 (mean -10).
  assert r["vae"]["refinement"]["steps"] == [0, 1, 5]
  assert [e["per_seed"] for e in r["vae"]["refinement"]["elbo"]] == [[-11, -13], [-10, -12],
                                                                    [-9.5, -10]]
  assert r["refinement_steps_to_match_iavae"] == {"vae": {"per_seed": [1, 5],
                                                          "of_the_means": 5}}
  per_job[("vae", 1)]["refinement_elbo"] = [[-14, -13, -12], [-12, -11, -10.5]]
  r_never = gap_runs.summarize(per_job, ["vae", "iavae"], [0, 1], measurements, 0.05)
  assert r_never["refinement_steps_to_match_iavae"]["vae"] == {"per_seed": [1, None],
                                                               "of_the_means": None}
  # Wall time per example at K: the encoder's 1 s plus K refinement steps of 1 s / 5.
  assert [t["mean"] for t in r["vae"]["refinement"]["seconds_per_example"]] == pytest.approx(
      [1, 1.2, 2])
  convergence = r["vae"]["convergence"]
  assert convergence["delta"]["per_seed"] == pytest.approx([0.01, 0.1])
  assert convergence["examples"] == 1 and not convergence["converged"]
  assert "convergence" not in r["iavae"]
  r["dataset"], r["tier"], r["num_examples"], r["wall_seconds"] = "mnist", "cpu", 2, 1.0
  r["settings"] = configs.GapsConfig().__dict__
  text = gap_runs.markdown(r)
  assert "| vae | -8.00 ± 0.00 | -9.00 ± 0.00 | -12.00 ± 1.41 |" in text
  assert "vae reaches the IA-VAE's single-pass ELBO after K = 5 refinement steps" in text


def test_paper_tier_settings_are_the_library_defaults():
  config = configs.gaps_config("paper")
  qstar, refine = gaps.QStarSettings(), gaps.RefineSettings()
  assert (config.qstar_learning_rate, config.qstar_samples, config.qstar_check_every,
          config.qstar_check_samples, config.qstar_patience, config.qstar_max_steps,
          config.sample_chunk) == (qstar.learning_rate, qstar.samples_per_step,
                                   qstar.check_every, qstar.check_samples, qstar.patience,
                                   qstar.max_steps, qstar.sample_chunk)
  assert (config.refine_learning_rate, config.refine_momentum, config.refine_max_grad_norm,
          config.refine_samples) == pytest.approx(
              (refine.learning_rate, refine.momentum, refine.max_grad_norm,
               refine.samples_per_step))
  assert config.convergence_tolerance == gaps.CONVERGENCE_TOLERANCE
  assert (config.num_examples, config.final_samples, config.iwae_samples) == (0, 5000, 5000)
  for tier in configs.IMAGE_TIERS:
    configs.gaps_config(tier).validate()


@pytest.mark.parametrize("fields, message", [
    ({"batch_size": 0}, "--batch_size must be a positive integer"),
    ({"final_samples": 150}, "--final_samples=150 must be a multiple of --sample_chunk=100"),
    ({"refine_steps": (0, 5)}, "--refine_steps must be positive"),
    ({"refine_momentum": 1.0}, "--refine_momentum must be in"),
])
def test_bad_settings_are_refused(fields, message):
  with pytest.raises(configs.ConfigError, match=message):
    configs.GapsConfig(**fields).validate()


# The command end to end on the smoke run.

def _read(path):
  with open(path) as f:
    return json.load(f)


def _copy_run(workdir, destination):
  """The smoke run without any gaps measurements."""
  shutil.copytree(workdir, destination,
                  ignore=shutil.ignore_patterns("gaps", "gaps.*", "gaps_*"))
  return str(destination)


@pytest.mark.slow
def test_gaps_json_holds_every_model_and_the_ordering_holds(gaps_run):
  workdir, _ = gaps_run
  r = _read(os.path.join(workdir, "gaps.json"))
  seeds = _read(os.path.join(workdir, "results.json"))["seeds"]
  assert r["models"] == list(MODELS) and r["seeds"] == seeds and r["num_examples"] == 20
  for name in MODELS:
    for quantity in QUANTITIES:
      assert set(r[name][quantity]) == {"mean", "std", "per_seed"}
      assert len(r[name][quantity]["per_seed"]) == len(seeds)
    per_seed = {q: np.array(r[name][q]["per_seed"]) for q in QUANTITIES}
    np.testing.assert_allclose(per_seed["approximation_gap"],
                               per_seed["log_px"] - per_seed["elbo_qstar"], rtol=1e-6)
    np.testing.assert_allclose(per_seed["amortization_gap"],
                               per_seed["elbo_qstar"] - per_seed["elbo"], rtol=1e-6)
    # K = 0 of the refinement curve is L[q] itself (the same noise and number of samples).
    np.testing.assert_allclose(r[name]["refinement"]["elbo"][0]["per_seed"], per_seed["elbo"],
                               atol=1e-3)
    assert r[name]["refinement"]["steps"] == [0, 1, 5, 20, 100]
    # log p^ >= L[q*] >= L[q] up to Monte Carlo error: the per-image differences' mean is
    # above -3 standard errors, for every seed.
    for seed in seeds:
      job = _read(os.path.join(workdir, "gaps", f"{name}_seed{seed}.json"))
      for high, low in (("log_px", "elbo_qstar"), ("elbo_qstar", "elbo")):
        d = np.array(job[high]) - np.array(job[low])
        assert d.shape == (20,)
        assert d.mean() > -3 * d.std(ddof=1) / np.sqrt(d.size), (name, seed, high, low)
  for name in ("iavae", "control"):
    assert len(r[name]["share_of_vae_amortization_gap_closed"]["per_seed"]) == len(seeds)
  assert set(r["refinement_steps_to_match_iavae"]) == {"vae", "control", "iavae_mean_context"}
  assert r["vae"]["convergence"]["examples"] == 10
  text = open(os.path.join(workdir, "gaps.md")).read()
  assert "| model | log p^ | L[q*] | L[q] |" in text and "| iavae |" in text
  assert os.path.getsize(os.path.join(workdir, "gaps_refinement.png")) > 0


@pytest.mark.slow
def test_rerun_resumes_and_keeps_the_numbers(gaps_run):
  workdir, _ = gaps_run
  before = _read(os.path.join(workdir, "gaps.json"))
  result = run("experiments.gaps", f"--workdir={workdir}", *SMOKE_GAPS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[gaps]" not in result.stdout   # every job was done: nothing measured again
  after = _read(os.path.join(workdir, "gaps.json"))
  assert all(after[name] == before[name] for name in MODELS)


@pytest.mark.slow
def test_other_settings_are_refused_and_nothing_is_written(gaps_run):
  workdir, _ = gaps_run
  files = {name: open(os.path.join(workdir, name), "rb").read()
           for name in ("gaps.json", "gaps.md", "gaps_refinement.png")}
  result = run("experiments.gaps", f"--workdir={workdir}", *SMOKE_GAPS, "--final_samples=16")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "other settings (final_samples: recorded 32, now 16)" in result.stderr
  assert files == {name: open(os.path.join(workdir, name), "rb").read() for name in files}


@pytest.mark.slow
def test_killed_then_rerun_gives_the_uninterrupted_numbers(gaps_run, tmp_path, kill_after_line):
  workdir, _ = gaps_run
  copy = _copy_run(workdir, tmp_path / "run")
  kill_after_line("experiments.gaps", [f"--workdir={copy}", *SMOKE_GAPS],
                  "[gaps] iavae seed 0: 10/20 examples", optimized=True)
  assert not os.path.exists(os.path.join(copy, "gaps.json"))
  result = run("experiments.gaps", f"--workdir={copy}", *SMOKE_GAPS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[gaps] vae seed 0" not in result.stdout   # done before the kill: not measured again
  resumed, uninterrupted = (_read(os.path.join(d, "gaps.json")) for d in (copy, workdir))
  for name in MODELS:
    for quantity in QUANTITIES:
      np.testing.assert_allclose(resumed[name][quantity]["per_seed"],
                                 uninterrupted[name][quantity]["per_seed"], rtol=1e-6)


def _listing(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, files in os.walk(directory) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("edit, flags, message", [
    (None, ["--num_examples=0"], "--num_examples must be a positive number"),
    (None, ["--num_examples=-3"], "--num_examples must be a positive number"),
    ("no_results", [], "no finished experiments.images run"),
    ("no_checkpoint", [], "its checkpoint is gone"),
    ("other_architecture", [], "parameters of another architecture"),
])
def test_bad_input_exits_2_and_writes_nothing(smoke_run, tmp_path, edit, flags, message):
  workdir = _copy_run(smoke_run[1], tmp_path / "run")
  if edit == "no_results":
    os.remove(os.path.join(workdir, "results.json"))
  elif edit == "no_checkpoint":
    shutil.rmtree(os.path.join(workdir, "checkpoints", "control_seed1"))
  elif edit == "other_architecture":
    path = os.path.join(workdir, "config.json")
    config = _read(path)
    config["decoder_features"] *= 2
    with open(path, "w") as f:
      json.dump(config, f)
  before = _listing(workdir)
  result = run("experiments.gaps", f"--workdir={workdir}", *flags)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert message in result.stderr
  assert _listing(workdir) == before


@pytest.mark.slow
def test_a_workdir_without_a_run_is_refused(tmp_path):
  missing = tmp_path / "nothing"
  result = run("experiments.gaps", f"--workdir={missing}")
  assert result.returncode == 2 and "no finished experiments.images run" in result.stderr
  assert not missing.exists()


@pytest.mark.slow
def test_checkpoints_without_frozen_inputs_take_the_vaes(smoke_run, tmp_path):
  # Training states written before they held their frozen inputs: the IA-VAE's phi_AVI and the
  # batch-norm statistics are then the seed's VAE's, which is what newer states hold.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from experiments import gaps as gaps_command  # pylint: disable=g-import-not-at-top
  from iavae_jax.image_vae import Model  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(smoke_run[1], tmp_path / "run")
  model = Model(gaps_command.run_config(workdir))
  for name in ("iavae", "control"):
    directory = os.path.join(workdir, "checkpoints", f"{name}_seed0")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    shutil.rmtree(directory)
    manager = ocp.CheckpointManager(directory)
    manager.save(step, args=ocp.args.StandardSave({k: v for k, v in state.items()
                                                   if k != "frozen"}))
    manager.wait_until_finished()
    manager.close()
    legacy = gaps_eval.load_model(model, workdir, name, 0, None)
    current = gaps_eval.load_model(model, smoke_run[1], name, 0, None)
    assert legacy.kind == current.kind == name
    chex.assert_trees_all_equal(legacy.frozen, current.frozen)
    chex.assert_trees_all_equal(legacy.params, current.params)
