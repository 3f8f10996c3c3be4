"""The synthetic command line: bad input (exit 2, nothing written); slow: end to end (outputs,
schema, resume after SIGKILL, determinism, divergence with exit 1, refused workdirs)."""

import dataclasses
import json
import math
import os
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, configs, synthetic_train
from iavae_jax import blocks, hypernets, objectives, synthetic_vae
from iavae_jax.data import synthetic
from iavae_jax.models import encoders, oracle
from conftest import TINY, run_module


def run(*args):
  return run_module("experiments.synthetic", *args)


@pytest.mark.slow
def test_outputs_and_schema(tiny_run):
  workdir, _ = tiny_run
  for name in ("results.json", "results.md", "figure6_posterior.png", "figure7_efficiency.png",
               "metrics.jsonl", "learning_curves.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  models = {"vae": 2, "iavae": 4, "sweep": 2}
  # The sweep trains beside stages 1-2 (on a second thread): stages' lines interleave.
  assert {stage: [l["epoch"] for l in lines if l["stage"] == stage] for stage in models} == {
      stage: [1, 2, 3, 4] for stage in models}
  assert len(lines) == 3 * 4
  for line in lines:
    for key in ("train_loss", "train_kl", "grad_norm", "valid_elbo"):
      assert len(line[key]) == models[line["stage"]], (key, line)
      assert all(v is None or math.isfinite(v) for v in line[key])
    assert line["training"] == sum(v is not None for v in line["train_loss"])
    assert line["steps_per_s"] > 0 and line["seconds"] > 0
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert len(r["table2"]) == 2
  for row in r["table2"]:
    assert {"elbo", "kl"} <= set(row["vae"])
    assert {"elbo_mean", "elbo_std", "kl_mean"} <= set(row["iavae"])
    assert len(row["iavae"]["elbo_per_seed"]) == 2
  for model in ("vae", "iavae"):
    assert {"elbo", "kl", "d_map", "r_map"} <= set(r["table3"][model])
    assert 0.0 < r["table3"][model]["r_map"] <= 1.0
    assert r["table3"][model]["d_map"] >= 0.0
  eff = r["efficiency"]
  assert eff["iavae_params"] == 68
  assert [c["params"] for c in eff["vae_curve"]] == [20, 36]
  assert {"params", "elbo"} <= set(eff["vae_curve"][0])
  gaps = r["gaps"]
  assert gaps["elbo_qstar"] <= gaps["log_px"]
  for model in ("vae", "iavae"):
    g = gaps[model]
    assert g["amortization_gap"] >= 0.0 and g["approximation_gap"] >= 0.0
    assert g["total_gap"] == pytest.approx(g["amortization_gap"] + g["approximation_gap"],
                                           abs=1e-3)
  # Held-out: Table 3's keys and the gap decomposition's, with the same bounds.
  heldout = r["heldout"]
  for model in ("vae", "iavae"):
    assert set(heldout[model]) == set(r["table3"][model])
    assert 0.0 < heldout[model]["r_map"] <= 1.0 and heldout[model]["d_map"] >= 0.0
  assert set(heldout["gaps"]) == set(gaps)
  assert heldout["gaps"]["elbo_qstar"] <= heldout["gaps"]["log_px"]
  assert heldout["gaps"]["elbo_qstar_minus_log_px_max"] <= 1e-3
  for model in ("vae", "iavae"):
    g = heldout["gaps"][model]
    assert g["amortization_gap"] >= 0.0 and g["approximation_gap"] >= 0.0
    assert g["max_excess_over_qstar"] <= 1e-3
    assert g["total_gap"] == pytest.approx(g["amortization_gap"] + g["approximation_gap"],
                                           abs=1e-3)
  assert heldout["gaps"]["log_px"] != gaps["log_px"]    # other points
  for tail in (heldout["tail"], heldout["train_tail"]):
    assert sum(b["num_points"] for b in tail["by_norm"]) == 256
    assert 0.0 <= tail["fraction_worse"] <= 1.0
  assert sum(b["num_points"] for b in heldout["tail"]["by_distance_to_train"]) == 256
  assert r["stage_seconds"]["heldout"] > 0
  assert r["wall_seconds"] > 0
  markdown = open(os.path.join(workdir, "results.md")).read()
  assert "Table 2" in markdown and "held-out data" in markdown


@pytest.mark.slow
def test_second_run_resumes_instead_of_retraining(tiny_run):
  workdir, _ = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    first = json.load(f)
  result = run(f"--workdir={workdir}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ("vae", "iavae", "sweep"):
    assert f"[{stage}] resumed from the checkpoint at epoch 4" in result.stdout
  assert "[vae] epoch" not in result.stdout   # no training epoch ran
  with open(os.path.join(workdir, "results.json")) as f:
    second = json.load(f)
  assert second["table2"] == first["table2"]
  assert second["table3"] == first["table3"]


@pytest.mark.parametrize("examples_last", [True, False])
def test_train_step_is_adam_on_the_negative_monte_carlo_elbo(examples_last):
  config = dataclasses.replace(configs.synthetic_full(), num_samples=3).validate()
  x = synthetic.generate(jax.random.PRNGKey(0), 5, config.sigma).x             # [5, 3]
  phi = encoders.MLPEncoder(config.encoder_width).init(jax.random.PRNGKey(1), x[0])["params"]
  eps = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 2))
  encode = (synthetic_vae.vae_train_encode if examples_last
            else synthetic_vae.vae_encode(config.encoder_width))
  step, optimizer = synthetic_vae.train_step(config, encode, examples_last)
  (params, _), metrics = jax.jit(step)(None, (phi, optimizer.init(phi)),
                                       (x.T if examples_last else x, eps))

  def negative_elbo(phi):
    mean, log_var = synthetic_vae.vae_encode(config.encoder_width)(phi, None, x)
    terms = objectives.elbo(eps, mean, log_var,
                            lambda z: oracle.log_likelihood(x, z, config.sigma))
    return -jnp.mean(terms.elbo), jnp.mean(terms.kl)
  (loss, kl), grads = jax.value_and_grad(negative_elbo, has_aux=True)(phi)
  chex.assert_trees_all_close((metrics.loss, metrics.kl), (loss, kl), rtol=1e-5)
  # Adam's first step: every parameter moves by learning_rate * g / (|g| + 1e-8).
  chex.assert_trees_all_close(params, jax.tree.map(
      lambda p, g: p - config.learning_rate * g / (jnp.abs(g) + 1e-8), phi, grads),
      rtol=1e-4, atol=1e-7)


# Bad input: the command line's own check, and one of the configuration's, in a subprocess (its
# flags cannot be defined next to the image command's in one process); the configuration's
# checks in-process.


@pytest.mark.parametrize("flag, message", [
    ("--sweep_widths=2,x", "--sweep_widths must be a comma-separated list of integers"),
    ("--sigma=0", "--sigma must be positive"),
    ("--parallel=pipeline", "--parallel=pipeline is not known"),
])
def test_bad_flags_exit_2_with_a_clear_message(tmp_path, flag, message):
  workdir = tmp_path / "w"
  result = run(f"--workdir={workdir}", "--plumbing_check", flag)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert message in result.stderr
  assert not workdir.exists()   # nothing was written


@pytest.mark.parametrize("overrides, message", [
    ({"sigma": 0.0}, "--sigma must be positive"),
    ({"sigma": -0.1}, "--sigma must be positive"),
    ({"sigma": float("inf")}, "--sigma must be positive and finite, got inf"),
    ({"num_vae_seeds": 0}, "--num_vae_seeds must be a positive integer"),
    ({"encoder_width": -2}, "--encoder_width must be a positive integer"),
    ({"sweep_widths": (2, 0)}, "--sweep_widths must be positive"),
    ({"seed": -1}, "--seed must be an integer in [0, 2147483647]"),
    ({"data_seed": 4294967296}, "--data_seed must be an integer in [0, 2147483647]"),
    ({"batch_size": 99999}, "--batch_size=99999 exceeds --num_examples"),
    ({"hypernet_input": "image"},
     "--hypernet_input=image is not known; choose one of x, tanh, softclip, gradient, residual"),
])
def test_bad_settings_are_refused(overrides, message):
  with pytest.raises(common.ConfigError, match=re.escape(message)):
    dataclasses.replace(configs.synthetic_plumbing_check(), **overrides).validate()


def test_tensorboard_without_tensorboardx_exits_2(tmp_path):
  # A tensorboardX that cannot be imported, first on the path.
  (tmp_path / "hide" / "tensorboardX").mkdir(parents=True)
  (tmp_path / "hide" / "tensorboardX" / "__init__.py").write_text(
      "raise ImportError(\"No module named 'tensorboardX'\")\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "hide"))
  workdir = tmp_path / "w"
  result = run_module("experiments.synthetic", f"--workdir={workdir}", "--plumbing_check",
                      "--tensorboard", env=env)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "--tensorboard writes through the tensorboardX package" in result.stderr
  assert not workdir.exists()


def test_missing_or_unwritable_workdir_exits_2(tmp_path):
  # --quick: the former name of --plumbing_check, still accepted.
  result = run("--quick")
  assert result.returncode == 2 and "--workdir is required" in result.stderr
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = run(f"--workdir={blocker}/sub", "--quick")
  assert result.returncode == 2 and "is not a writable directory" in result.stderr
  assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_different_configuration_in_same_workdir_is_refused(tiny_run):
  workdir, _ = tiny_run
  before = {name: os.path.getmtime(os.path.join(workdir, name))
            for name in ("results.json", "config.json")}
  result = run(f"--workdir={workdir}", *TINY, "--learning_rate=0.01")
  assert result.returncode == 2
  assert "different configuration" in result.stderr and "learning_rate" in result.stderr
  after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
  assert after == before


def test_unexpected_positional_argument_exits_2(tmp_path):
  result = run(f"--workdir={tmp_path}", "--quick", "extra")
  assert result.returncode == 2


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(tiny_run, tmp_path):
  source, _ = tiny_run
  workdir = tmp_path / "copy"
  shutil.copytree(source, workdir)
  os.remove(workdir / "config.json")   # only the checkpoint itself can tell now
  listing = sorted(str(p) for p in workdir.rglob("*"))
  result = run(f"--workdir={workdir}", *TINY, "--encoder_width=3")
  assert result.returncode == 2
  assert "checkpoints/vae cannot be restored" in result.stderr
  assert sorted(str(p) for p in workdir.rglob("*")) == listing   # nothing written


NUMBERS = ("table2", "table3", "efficiency", "gaps", "heldout", "figure6_examples")


def _numbers(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return {k: results[k] for k in NUMBERS}


@pytest.mark.slow
def test_same_command_twice_gives_identical_numbers(tiny_run, tmp_path):
  result = run(f"--workdir={tmp_path}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _numbers(tmp_path) == _numbers(tiny_run[0])    # bitwise: JSON floats compared exactly


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "iavae"])
def test_sigkill_then_rerun_gives_the_uninterrupted_numbers(tiny_run, tmp_path, kill_after_line,
                                                            stage):
  # Killed right after the epoch-2 progress line of a stage, while its checkpoint is written.
  kill_after_line("experiments.synthetic", [f"--workdir={tmp_path}", *TINY], f"[{stage}] epoch 2/")
  assert not (tmp_path / "results.json").exists()
  result = run(f"--workdir={tmp_path}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  if stage == "iavae":
    assert "[vae] resumed from the checkpoint at epoch 4" in result.stdout
  assert _numbers(tmp_path) == _numbers(tiny_run[0])


@pytest.mark.slow
def test_divergence_stops_with_exit_1_naming_stage_model_epoch_and_step(tmp_path):
  result = run(f"--workdir={tmp_path}", *TINY, "--learning_rate=1e30")
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert "error: [vae] VAE seed 0 diverged in epoch 1: the training loss was NaN or Inf at " \
         "step 2 of the epoch" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_corrupted_checkpoint_is_refused_and_left_alone(tiny_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_run[0], workdir)
  for chunk in (workdir / "checkpoints" / "iavae" / "4" / "default" / "d").iterdir():
    chunk.write_bytes(b"\0" * chunk.stat().st_size)      # the latest checkpoint's data, zeroed
  listing = {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  result = run(f"--workdir={workdir}", *TINY)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "checkpoints/iavae cannot be restored" in result.stderr and "damaged" in result.stderr
  assert "checkpoints/iavae/4 to resume from the previous checkpoint" in result.stderr
  assert {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == listing


@pytest.mark.slow
def test_debug_nans_stops_at_the_operation(tmp_path):
  result = run(f"--workdir={tmp_path}", *TINY, "--learning_rate=1e30", "--debug_nans")
  assert result.returncode != 0
  assert "FloatingPointError" in result.stderr and "nan" in result.stderr.lower()


@pytest.mark.parametrize("start_as_candidate", [True, False])
def test_stage_2_never_selects_below_its_start(tmp_path, start_as_candidate):
  # Two IA-VAEs on a good encoder (mean (x1, x2), about the posterior mean of z since x1, x2 =
  # z1, z2 + noise; log-variance -5), with a learning rate (1e-2) that makes stage 2 worse:
  # with the start as a candidate each selects it (epoch 0, its exact ELBO, psi unchanged);
  # without, the better of two worse epochs.
  config = dataclasses.replace(configs.synthetic_plumbing_check(), num_examples=256, max_epochs=2,
                               patience=2, epochs_per_call=2, learning_rate=1e-2).validate()
  x = synthetic.generate(jax.random.PRNGKey(0), config.num_examples, config.sigma).x
  phi = {"Dense_0": {"kernel": np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32),
                     "bias": np.array([10.0, 10.0], np.float32)},     # relu(x1 + 10), relu(x2 + 10)
         "Dense_1": {"kernel": np.eye(2, 4, dtype=np.float32),
                     "bias": np.array([-10.0, -10.0, -5.0, -5.0], np.float32)}}
  init_keys, train_keys, order_seeds = synthetic_train.model_keys(config, "iavae",
                                                                  [(0, 0), (0, 1)])
  iavaes = synthetic_vae.init_iavaes(config, jax.tree.map(lambda a: a[None], phi), init_keys, x)
  psi0, frozen = iavaes.params, iavaes.frozen
  chex.assert_trees_all_equal(frozen, jax.tree.map(lambda a: np.stack([a, a]), phi))
  counts = synthetic_vae.param_counts(config, iavaes.layout)   # per IA-VAE, as Figure 7's
  assert (sum(a.size for a in jax.tree.leaves(psi0)) // 2
          == counts["hypernet_params"] + counts["embedding_params"])
  states = synthetic_train.train_stage("iavae", str(tmp_path), config, iavaes.train_encode,
                                       psi0, frozen, train_keys, order_seeds, x,
                                       start_as_candidate=start_as_candidate)
  start = jax.vmap(synthetic_vae.exact_score(config, iavaes.encode, examples_last=False),
                   in_axes=(0, 0, None))(psi0, frozen, x)
  if start_as_candidate:
    np.testing.assert_array_equal(states.best_epoch, [0, 0])
    np.testing.assert_allclose(states.best_score, start, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, states.best_params, psi0)
  else:
    assert np.all(np.asarray(states.best_epoch) >= 1)
    assert np.all(np.asarray(states.best_score) < np.asarray(start))


@pytest.mark.parametrize("hypernet_input", ["x", "tanh", "softclip"])
def test_training_form_of_the_iavae_computes_the_evaluated_one(hypernet_input):
  # Stage 2 trains on iavae_train_encode (examples last); evaluation applies iavae_encode.
  config = dataclasses.replace(configs.synthetic_plumbing_check(), hypernet_input=hypernet_input)
  x = synthetic.generate(jax.random.PRNGKey(0), 64, config.sigma).x
  phi = encoders.MLPEncoder(config.encoder_width).init(jax.random.PRNGKey(1), x[0])["params"]
  layout = blocks.BlockLayout.from_tree(phi)
  psi = hypernets.LinearHypernet(layout, config.embed_dim, 0.3).init(
      jax.random.PRNGKey(2), x[0])["params"]
  context = synthetic_vae.hypernet_context(config, x)
  mean, log_var = synthetic_vae.iavae_encode(config, layout, context)(psi, phi, x)
  mean_t, log_var_t = synthetic_vae.iavae_train_encode(layout, context)(psi, phi, x.T)
  np.testing.assert_allclose(mean_t.T, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_var_t.T, log_var, rtol=1e-5, atol=1e-5)


def test_init_vaes_pads_narrower_encoders_to_compute_their_own_function():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x = synthetic.generate(jax.random.PRNGKey(1), 16, 0.1).x
  params = synthetic_vae.init_vaes(keys, [2, 4], x[0])
  chex.assert_shape(params["Dense_0"]["kernel"], (2, 3, 4))
  narrow = encoders.MLPEncoder(2).init(keys[0], x[0])["params"]
  padded = jax.tree.map(lambda a: a[0], params)
  chex.assert_trees_all_close(synthetic_vae.vae_encode(4)(padded, None, x),
                              synthetic_vae.vae_encode(2)(narrow, None, x))
  same = synthetic_vae.init_vaes(keys, [3], x[0])   # one width: every key's encoder of it
  chex.assert_shape(same["Dense_1"]["kernel"], (2, 3, 4))
  with pytest.raises(ValueError, match="3 widths for 2 keys"):
    synthetic_vae.init_vaes(keys, [2, 3, 4], x[0])
  config = configs.synthetic_plumbing_check()
  with pytest.raises(ValueError, match="3 keys for 2 VAEs"):
    synthetic_vae.init_iavaes(config, params, jax.random.split(keys[0], 3), x)
