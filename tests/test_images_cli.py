"""The image experiments: bad input (exit 2, nothing written); slow: end to end (the smoke tier on
toy images), the report over them, resume, Proposition 1 and the first step of stage 2 on the
image model, and a few steps of the paper tier."""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iavae_jax import blocks, checkpoints, hypernets, hparams, image_vae, objectives, training
from iavae_jax.data import images
from experiments import common, configs, images_train

from conftest import SMOKE, run_module as run, toy_images

KEY = jax.random.PRNGKey(6)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_outputs_and_schema(smoke_run):
  _, workdir, _ = smoke_run
  for name in ("results.json", "results.md", "figure8_reconstructions.png", "metrics.jsonl",
               "learning_curves.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [(l["stage"], l["epoch"]) for l in lines] == [
      (f"{stage}_seed{seed}", epoch) for seed in (0, 1) for stage in ("vae", "iavae", "control")
      for epoch in (1, 2)]
  for line in lines:
    assert line["training"] == 1 and line["steps_per_s"] > 0
    assert all(len(line[key]) == 1 and math.isfinite(line[key][0])
               for key in ("train_loss", "train_kl", "grad_norm", "valid_elbo"))
  r = _results(workdir)
  assert (r["experiment"], r["dataset"], r["tier"]) == ("images", "mnist", "smoke")
  assert r["seeds"] == [0, 1]
  assert r["data"]["train"] == 100 and r["data"]["test"] == 40
  for model in ("vae", "iavae", "control"):
    m = r["models"][model]
    extra = set() if model == "vae" else {"valid_elbo_at_start"}
    assert set(m) == {"test_elbo", "test_kl", "test_iwae", "valid_elbo", "best_epoch"} | extra
    assert all(len(v) == 2 for v in m.values())
    assert all(math.isfinite(v) and v < 0 for v in m["test_elbo"] + m["test_iwae"])
    assert all(v >= 0 for v in m["test_kl"])
    assert all(1 <= e <= 2 for e in m["best_epoch"])
  # The mean-context IA-VAE has no selection score of its own: null, so the file is strict JSON.
  assert r["models"]["iavae_mean_context"]["valid_elbo"] == [None, None]
  with open(os.path.join(workdir, "results.json")) as f:
    json.loads(f.read(), parse_constant=lambda token: pytest.fail(f"results.json holds {token}"))
  assert r["parameters"]["encoder_blocks"] == 26
  assert r["wall_seconds"] > 0
  assert r["environment"]["device_kind"] == jax.devices()[0].device_kind   # the card, on a GPU


@pytest.mark.slow
def test_report_gathers_the_run(smoke_run):
  root, _, _ = smoke_run
  result = run("experiments.report", f"--workdir={root}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(root, "table4.json")) as f:
    table = json.load(f)
  r = _results(os.path.join(root, "mnist"))
  row = table["mnist"]
  assert row["iavae"]["per_seed"] == r["models"]["iavae"]["test_elbo"]
  assert row["vae"]["mean"] == pytest.approx(np.mean(r["models"]["vae"]["test_elbo"]))
  assert row["iavae_vs_control"]["test"] in ("t-test", "wilcoxon")
  assert "MNIST" in open(os.path.join(root, "table4.md")).read()


@pytest.mark.slow
@pytest.mark.parametrize("flags, recorded", [
    (["--hypernet=ha", "--ha_block_gains", "--decoder=pixelcnn_kim"],
     {"hypernet": "ha", "ha_block_gains": True, "decoder": "pixelcnn_kim"}),
    (["--hypernet=paper", "--hypernet_input=penultimate"],
     {"hypernet": "paper", "hypernet_input": "penultimate"})])
def test_other_designs_run_end_to_end(smoke_flags, tmp_path, flags, recorded):
  result = run("experiments.images", f"--workdir={tmp_path}", *smoke_flags, "--num_seeds=1",
               *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  r = _results(tmp_path)
  assert {key: r["config"][key] for key in recorded} == recorded
  assert all(math.isfinite(v) for v in r["models"]["iavae"]["test_elbo"])


@pytest.mark.slow
def test_second_run_resumes_and_reproduces_the_numbers(smoke_run, smoke_flags):
  _, workdir, _ = smoke_run
  before = _results(workdir)
  result = run("experiments.images", f"--workdir={workdir}", *smoke_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("resumed from the checkpoint") == 6   # 3 models x 2 seeds
  assert _results(workdir)["models"] == before["models"]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_numbers(smoke_run, smoke_flags, tmp_path,
                                                            kill_after_line):
  # Killed in stage 1 of seed 0, rerun and killed in stage 2 of seed 1, each while that epoch's
  # checkpoint is written, and rerun to the end. Equal to smoke_run, a separate process: this
  # is also the determinism test of this tier.
  for line in ("[vae_seed0] epoch 1/", "[iavae_seed1] epoch 1/"):
    kill_after_line("experiments.images", [f"--workdir={tmp_path}", *smoke_flags], line)
    assert not (tmp_path / "results.json").exists()
  result = run("experiments.images", f"--workdir={tmp_path}", *smoke_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _results(tmp_path)["models"] == _results(smoke_run[1])["models"]   # bitwise


@pytest.mark.slow
def test_stage_2_on_a_stage_1_checkpoint_of_another_architecture_is_refused(smoke_run,
                                                                           smoke_flags, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(smoke_run[1], workdir)
  os.remove(workdir / "config.json")   # only the checkpoints themselves can tell now
  listing = {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  result = run("experiments.images", f"--workdir={workdir}", *smoke_flags,
               "--encoder_channels=4,8")
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "checkpoints/vae_seed0 cannot be restored" in result.stderr
  assert {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == listing


# Bad input: the command line's own checks, and one of the configuration's, in a subprocess (its
# flags cannot be defined next to the synthetic command's in one process); the configuration's
# and the data's checks in-process.


@pytest.mark.parametrize("flags, message", [
    (["--dataset=cifar10", "--tier=smoke"], "--dataset=cifar10 is not known"),
    (["--dataset=mnist", "--tier=huge"], "--tier=huge is not known"),
    (["--tier=smoke"], "--dataset is required"),
    (SMOKE + ["--encoder_channels=8,x"], "--encoder_channels must be a comma-separated list"),
    (SMOKE + ["--batch_size=0"], "--batch_size must be a positive integer"),
])
def test_bad_flags_exit_2_and_write_nothing(flags, message):
  with tempfile.TemporaryDirectory() as root:
    workdir = os.path.join(root, "run")
    result = run("experiments.images", f"--workdir={workdir}", *flags)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(workdir) or not os.listdir(workdir)


@pytest.mark.parametrize("overrides, message", [
    ({"seed": 2147483600, "num_seeds": 100}, "--seed + --num_seeds"),
    ({"hypernet_input": "pixels"}, "--hypernet_input=pixels is not known"),
    ({"batch_size": 0}, "--batch_size must be a positive integer"),
    ({"decoder_learning_rate": -1.0}, "--decoder_learning_rate must be positive"),
    ({"decoder_kernel_sizes": (4,)}, "--decoder_kernel_sizes must be odd"),
    ({"hypernet": "lstm"}, "--hypernet=lstm is not known; choose one of paper, ha, mlp"),
    ({"decoder": "made"}, "--decoder=made is not known; choose one of pixelcnn, pixelcnn_kim"),
    ({"weight_decay_mode": "l1"}, "--weight_decay_mode=l1 is not known; choose one of coupled"),
    ({"hypernet": "paper", "hypernet_hidden": 8},
     "--hypernet_hidden sets the hidden width of --hypernet=ha or mlp"),
    ({"hypernet": "mlp", "ha_block_gains": True}, "--ha_block_gains applies to --hypernet=ha"),
    ({"hypernet_projection": -1}, "--hypernet_projection must be a non-negative integer"),
    ({"adapted_blocks": "mean("}, "--adapted_blocks='mean(' is not a regular expression"),
])
def test_bad_settings_are_refused(overrides, message):
  with pytest.raises(common.ConfigError, match=re.escape(message)):
    dataclasses.replace(configs.image_config("mnist", "smoke"), **overrides).validate()


@pytest.mark.parametrize("overrides, data_dir, message", [
    ({"batch_size": 500}, None, "no full batch"),
    ({}, "/nonexistent/mnist", "/nonexistent/mnist"),
    ({"adapted_blocks": "^decoder/"}, None,
     "--adapted_blocks='^decoder/': no block path matches '^decoder/'; the paths are "),
])
def test_bad_data_is_refused_before_anything_is_written(tmp_path, smoke_data_dir, overrides,
                                                       data_dir, message):
  config = dataclasses.replace(configs.image_config("mnist", "smoke"), **overrides)
  with pytest.raises(common.ConfigError, match=re.escape(message)):
    images_train.train_and_evaluate(config, str(tmp_path / "run"), data_dir or smoke_data_dir)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_workdir_of_another_configuration_is_refused(smoke_run, smoke_flags):
  _, workdir, _ = smoke_run
  before = open(os.path.join(workdir, "results.json")).read()
  result = run("experiments.images", f"--workdir={workdir}", *smoke_flags, "--vae_epochs=3")
  assert result.returncode == 2
  assert "different configuration" in result.stderr and "vae_epochs" in result.stderr
  assert open(os.path.join(workdir, "results.json")).read() == before


@pytest.mark.slow
def test_workdir_of_other_data_is_refused(smoke_run, smoke_data_dir):
  _, workdir, _ = smoke_run
  before = open(os.path.join(workdir, "results.json")).read()
  with tempfile.TemporaryDirectory() as copy:
    shutil.copy(os.path.join(smoke_data_dir, "images-idx3-ubyte.gz"), copy)
    result = run("experiments.images", f"--workdir={workdir}", *SMOKE, f"--data_dir={copy}")
  assert result.returncode == 2
  assert "holds a run on other data" in result.stderr
  assert open(os.path.join(workdir, "results.json")).read() == before


def _initial(model, stage, layout=None):
  x0 = jnp.zeros((1, 28, 28, 1))
  enc = model.encoder.init(jax.random.PRNGKey(0), x0)
  dec = model.decoder.init(jax.random.PRNGKey(1), x0,
                           jnp.zeros((1, model.config.latent_dim)))["params"]
  frozen = {"phi_avi": enc["params"], "batch_stats": enc["batch_stats"]}
  if stage == "vae":
    return {"encoder": enc["params"], "decoder": dec, "batch_stats": enc["batch_stats"]}, frozen
  layout = blocks.BlockLayout.from_tree(enc["params"])
  psi = model.init_hypernet(jax.random.PRNGKey(2), layout)
  return {"hypernet": psi, "decoder": dec}, frozen


def _smoke_model(**overrides):
  config = dataclasses.replace(configs.image_config("mnist", "smoke"), **overrides)
  return image_vae.Model(config.validate())


@pytest.mark.slow
@pytest.mark.parametrize("design, kind", [("paper", kind) for kind in hparams.HYPERNET_INPUTS]
                         + [("ha", "image_l2"), ("mlp", "penultimate")])
def test_stage_2_starts_at_the_stage_1_elbo(design, kind):
  # Proposition 1 on the image model: with the hypernetwork's output layers zero, the IA-VAE's
  # ELBO is the VAE's (same noise); at the default N(0, 1e-5^2) initialisation it is close.
  model = _smoke_model(hypernet=design, hypernet_input=kind)
  vae_params, frozen = _initial(model, "vae")
  iavae_params, _ = _initial(model, "iavae")
  data = (jax.random.uniform(jax.random.PRNGKey(3), (60, 28, 28)) < 0.2).astype(jnp.float32)
  elbo = lambda kind, params: float(image_vae.dataset_elbo(
      model, image_vae.encode_fn(model, kind, frozen), params, frozen, data, 2,
      jax.random.PRNGKey(4), 20))
  zero = {**iavae_params, "hypernet": {
      k: (jnp.zeros_like(v) if k.startswith(("W_", "b_")) else v)
      for k, v in iavae_params["hypernet"].items()}}
  vae = elbo("vae", vae_params)
  assert elbo("iavae", zero) == pytest.approx(vae, abs=1e-3)
  assert elbo("iavae", iavae_params) == pytest.approx(vae, rel=1e-2)


def test_hypernet_contexts():
  x = (jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1)) < 0.3).astype(jnp.float32)
  x = x.at[1].set(0.0)                                     # a blank image
  _, frozen = _initial(_smoke_model(), "vae")
  contexts = {kind: _smoke_model(hypernet_input=kind).hypernet_context(frozen, x)
              for kind in hparams.HYPERNET_INPUTS}
  chex.assert_trees_all_close(contexts["image"], x.reshape(3, 784))
  chex.assert_trees_all_close(jnp.linalg.norm(contexts["image_l2"], axis=-1),
                              jnp.array([1.0, 0.0, 1.0]), atol=1e-6)
  chex.assert_trees_all_close(contexts["image_l2"][0] * jnp.linalg.norm(x[0]),
                              x[0].reshape(-1), atol=1e-5)
  model = _smoke_model(hypernet_input="encoder")
  variables = {"params": frozen["phi_avi"], "batch_stats": frozen["batch_stats"]}
  mean, log_var = model.encoder.apply(variables, x, train=False)
  chex.assert_shape(contexts["encoder"], (3, model.context_size))
  chex.assert_trees_all_close(contexts["encoder"], jnp.concatenate([mean, log_var], -1))
  # The smoke encoder's penultimate feature: 2 stride-2 stages of 4 channels, 7 x 7 x 4.
  penultimate = _smoke_model(hypernet_input="penultimate")
  assert penultimate.context_size == 7 * 7 * 4
  h = variables["params"]["mean"]["kernel"]
  chex.assert_trees_all_close(contexts["penultimate"] @ h + variables["params"]["mean"]["bias"],
                              mean, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"hypernet": "paper"},
    {"hypernet": "ha", "hypernet_hidden": 8, "ha_block_gains": True, "hypernet_projection": 16},
    {"hypernet": "mlp", "hypernet_hidden": 12, "hypernet_input": "penultimate"},
    {},
])
def test_the_configured_hypernetwork(overrides):
  # Model.hypernet is make_hypernet's design with the configuration's fields.
  model = _smoke_model(**overrides)
  config = model.config
  _, frozen = _initial(model, "vae")
  layout = blocks.BlockLayout.from_tree(frozen["phi_avi"])
  hypernet = model.hypernet(layout)
  if config.hypernet_projection:
    assert isinstance(hypernet, hypernets.ProjectedContext)
    assert hypernet.dim == config.hypernet_projection
    hypernet = hypernet.hypernet
  assert isinstance(hypernet, hypernets.HYPERNETS[config.hypernet])
  assert (hypernet.block_embed_dim, hypernet.init_std) == (config.block_embed_dim,
                                                           config.hypernet_init_std)
  if config.hypernet == "ha":
    assert (hypernet.hidden_dim, hypernet.block_gains) == (8, True)
  else:
    assert hypernet.input_embed_dim == config.input_embed_dim
  assert overrides or config.hypernet == "mlp"   # the default design
  if config.hypernet == "mlp":
    assert hypernet.hidden_dim == overrides.get("hypernet_hidden", 64)
  psi = model.init_hypernet(jax.random.PRNGKey(0), layout)
  assert sum(np.size(a) for a in jax.tree.leaves(psi)) == hypernets.num_params(
      model.hypernet(layout), model.context_size)


@pytest.mark.slow
def test_stages_2_and_3_never_select_below_their_start(tmp_path):
  # One seed on toy images (three models trained and compiled: ~45 s of CPU), with a decoder
  # learning rate (20) that makes the IA-VAE and the control worse than the VAE they start from
  # (their epoch-1 validation ELBO, in metrics.jsonl, is below the start's): each selects its
  # start, epoch 0, with the start's score and parameters.
  config = dataclasses.replace(
      configs.image_config("mnist", "smoke"), vae_epochs=1, iavae_epochs=1, patience=1,
      decoder_learning_rate=20.0).validate()
  grey = np.asarray(toy_images(140), np.float32) / 255
  binary = (grey[100:] > 0.5).astype(np.float32)
  data = images.ImageSplits(train=grey[:100], valid=binary, test=binary, info={})
  selected = images_train.train_seed(image_vae.Model(config), str(tmp_path), 0, data, {}, [])
  with open(tmp_path / "metrics.jsonl") as f:
    epoch_1 = {line["stage"]: line["valid_elbo"][0] for line in map(json.loads, f)}
  vae = selected["vae"].params
  starts = {"iavae": vae["decoder"], "control": {"encoder": vae["encoder"],
                                                 "decoder": vae["decoder"]}}
  for stage in ("iavae", "control"):
    chosen = selected[stage]
    assert epoch_1[f"{stage}_seed0"] < chosen.valid_elbo_at_start, stage
    assert (chosen.best_epoch, chosen.valid_elbo) == (0, chosen.valid_elbo_at_start), stage
    chex.assert_trees_all_equal(chosen.params["decoder"] if stage == "iavae" else chosen.params,
                                starts[stage])


def _train_step(model, kind):
  return jax.jit(functools.partial(image_vae.train_step, model=model, kind=kind,
                                   steps_per_epoch=1))


def _state(model, stage, params, frozen):
  return training.init_state(params, image_vae.stage_optimizer(model.config, stage),
                             jax.random.PRNGKey(0), frozen)


def _pytorch_adam(params, grads, learning_rates, weight_decay, max_norm, mode):
  """Two steps of PyTorch's recipe, written out on {group: array}: clip_grad_norm_ over every
  parameter (.grad scaled by max_norm / norm when over it), then optimizer.step() per group:
  torch.optim.Adam(weight_decay=wd) adds wd x p to the gradient ("coupled"), torch.optim.AdamW
  moves p by -lr x wd x p ("decoupled"); betas (0.9, 0.999), eps 1e-8."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  params = dict(params)
  for t, step_grads in enumerate(grads, start=1):
    norm = np.sqrt(sum(np.sum(g ** 2) for g in step_grads.values()))
    scale = min(1.0, max_norm / norm)
    for k, g in step_grads.items():
      g, p, lr = g * scale, params[k], learning_rates[k]
      if mode == "coupled":
        g = g + weight_decay * p
      else:
        p = p - lr * weight_decay * p
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g ** 2
      m_hat, v_hat = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
      params[k] = p - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
  return params


@pytest.mark.parametrize("mode", hparams.WEIGHT_DECAY_MODES)
def test_stage_2_optimizer_is_pytorchs_adam_with_weight_decay(mode):
  # Large weights and decay, so that the decay visibly changes the step; the first gradient is
  # clipped (norm 13 > 2), the second is not.
  config = dataclasses.replace(configs.image_config("mnist", "smoke"), weight_decay=0.3,
                               weight_decay_mode=mode, max_grad_norm=2.0,
                               hypernet_learning_rate=0.01, decoder_learning_rate=0.002)
  params = {"hypernet": np.array([3.0, -2.0, 0.5], np.float32),
            "decoder": np.array([1.0, -4.0], np.float32)}
  grads = [{"hypernet": np.array([12.0, 3.0, -4.0], np.float32),
            "decoder": np.array([0.0, 0.0], np.float32)},
           {"hypernet": np.array([0.1, -0.2, 0.3], np.float32),
            "decoder": np.array([0.5, 0.1], np.float32)}]
  optimizer = image_vae.stage_optimizer(config, "iavae")
  state, got = optimizer.init(params), params
  for g in grads:
    updates, state = optimizer.update(g, state, got)
    got = optax.apply_updates(got, updates)
  want = _pytorch_adam(params, grads, {"hypernet": 0.01, "decoder": 0.002}, 0.3, 2.0, mode)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  # The other mode's numbers differ: the test tells the two apart.
  other = "decoupled" if mode == "coupled" else "coupled"
  assert not np.allclose(want["hypernet"], _pytorch_adam(
      params, grads, {"hypernet": 0.01, "decoder": 0.002}, 0.3, 2.0, other)["hypernet"],
      rtol=1e-3)


def test_kl_warm_up_is_linear_per_step_in_stage_1_only():
  config = configs.image_config("mnist", "smoke")   # warm-up from 0.1 over 1 epoch
  weight = lambda stage, step: float(image_vae.kl_weight(config, stage, jnp.array(step), 4))
  assert [weight("vae", s) for s in range(5)] == pytest.approx([0.325, 0.55, 0.775, 1.0, 1.0])
  assert weight("iavae", 0) == weight("control", 0) == 1.0


def test_train_step_minimises_the_negative_elbo_and_keeps_frozen_inputs():
  # The control's step: its loss is minus the batch's mean ELBO with the same binarisation and
  # z noise; it moves the encoder and decoder, leaves state.frozen alone and counts the step.
  model = _smoke_model()
  vae_params, _ = _initial(model, "vae")
  params = {"encoder": vae_params["encoder"], "decoder": vae_params["decoder"]}
  frozen = {"batch_stats": vae_params["batch_stats"]}
  x_grey = jax.random.uniform(jax.random.PRNGKey(3), (20, 28, 28))
  state = _state(model, "control", params, frozen)
  new, metrics = _train_step(model, "control")(state, image_vae.Batch(x_grey, KEY))
  binarize_key, eps_key = jax.random.split(KEY)
  x = images.binarize(binarize_key, x_grey)[..., None]
  mean, log_var = image_vae.encode_fn(model, "control", frozen)(params, frozen, x)
  terms = objectives.elbo(jax.random.normal(eps_key, (1, *mean.shape)), mean, log_var,
                          model.log_likelihood_fn(params["decoder"], x))
  assert float(metrics.loss) == pytest.approx(-float(jnp.mean(terms.elbo)), rel=1e-5)
  assert float(metrics.kl) == pytest.approx(float(jnp.mean(terms.kl)), rel=1e-5)
  chex.assert_trees_all_equal(new.frozen, frozen)
  assert int(new.step) == 1 and not np.array_equal(new.params["encoder"]["Conv_0"]["kernel"],
                                                    params["encoder"]["Conv_0"]["kernel"])


def test_stage_1_step_sets_the_batch_norm_running_statistics():
  # The optimiser leaves batch_stats alone (set_to_zero); the step writes the new running
  # averages of its batch, as flax's mutable batch_stats returns them.
  model = _smoke_model()
  params, _ = _initial(model, "vae")
  x_grey = jax.random.uniform(jax.random.PRNGKey(3), (20, 28, 28))
  new, _ = _train_step(model, "vae")(_state(model, "vae", params, None),
                                     image_vae.Batch(x_grey, KEY))
  x = images.binarize(jax.random.split(KEY)[0], x_grey)[..., None]
  _, updates = model.encoder.apply({"params": params["encoder"],
                                    "batch_stats": params["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
  chex.assert_trees_all_close(new.params["batch_stats"], updates["batch_stats"], atol=1e-6)


def _first_step_move(kind, x_grey):
  """How far one stage-2 step of the paper design moves the encoder's mean on x_grey (relative
  to its norm)."""
  model = _smoke_model(hypernet="paper", hypernet_input=kind)
  params, frozen = _initial(model, "iavae")
  state, _ = _train_step(model, "iavae")(_state(model, "iavae", params, frozen),
                                         image_vae.Batch(x_grey, jax.random.PRNGKey(6)))
  new_params = state.params
  encode = image_vae.encode_fn(model, "iavae", frozen)
  x = (x_grey > 0.5).astype(jnp.float32)[..., None]
  before, after = encode(params, frozen, x)[0], encode(new_params, frozen, x)[0]
  return float(jnp.linalg.norm(after - before) / jnp.linalg.norm(before))


@pytest.mark.slow
def test_normalised_image_input_keeps_the_first_step_small():
  # The paper design's Fashion-MNIST divergence: with the raw image as its x, Adam's first step
  # moves every conv delta by ~lr x (ink pixels) coherently; over its norm, ~lr x sqrt(ink).
  x_grey = jnp.where(jax.random.uniform(jax.random.PRNGKey(8), (20, 28, 28)) < 0.5, 1.0, 0.0)
  raw, normalised = (_first_step_move(kind, x_grey) for kind in ("image", "image_l2"))
  assert raw > 5 * normalised, (raw, normalised)


@pytest.mark.slow
def test_paper_tier_steps_on_cpu():
  # The paper architecture (ResNet 64, 12-layer PixelCNN 32) at batch 50: one step of each
  # stage gives finite losses and changes the parameters; the state survives an Orbax round trip.
  config = configs.image_config("mnist", "paper")
  model = image_vae.Model(config)
  x = jax.random.uniform(jax.random.PRNGKey(5), (config.batch_size, 28, 28))
  for stage in ("vae", "iavae"):
    params, frozen = _initial(model, stage)
    state, metrics = _train_step(model, stage)(
        _state(model, stage, params, frozen if stage == "iavae" else None),
        image_vae.Batch(x, jax.random.PRNGKey(6)))
    assert np.isfinite(float(metrics.loss)) and float(metrics.loss) > 0
    assert float(metrics.grad_norm) > 0 and int(state.step) == 1
    chex.assert_trees_all_equal_shapes(state.params, params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params["decoder"],
                           params["decoder"])
    assert all(jax.tree.leaves(changed))
    ckpt = checkpoints.Checkpointer(tempfile.mkdtemp())
    ckpt.save(1, state)
    chex.assert_trees_all_equal(ckpt.restore(like=state), state)
    ckpt.close()


@pytest.mark.parametrize("help_flag", ["--help", "--helpfull"])
def test_help_gives_every_tiers_value_of_a_flag(help_flag):
  result = run("experiments.images", help_flag)   # absl's help exits with 1
  text = " ".join(result.stdout.split())
  values = "; ".join(f"{tier}: {configs.image_config('mnist', tier).latent_dim}"
                     for tier in configs.IMAGE_TIERS)
  assert f"--latent_dim: Override the configuration's latent_dim ({values})." in text
  assert "--hypernet: Override the configuration's hypernet (mlp in every tier)." in text


@pytest.mark.slow
def test_more_seeds_resume_the_recorded_ones_and_train_the_new(smoke_run, smoke_flags, tmp_path):
  # The smoke run holds seeds 0 and 1; a copy of it run with --num_seeds=3 resumes their six
  # stages, trains seed 2's three, and reports seeds 0 and 1 exactly as before.
  workdir = tmp_path / "mnist"
  shutil.copytree(smoke_run[1], workdir)
  before = _results(smoke_run[1])
  result = run("experiments.images", f"--workdir={workdir}", *smoke_flags, "--num_seeds=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "goes on with num_seeds: recorded 2, now 3" in result.stdout
  assert result.stdout.count("resumed from the checkpoint") == 6
  after = _results(workdir)
  assert after["seeds"] == [0, 1, 2]
  for name, metrics in before["models"].items():
    for key, values in metrics.items():
      assert after["models"][name][key][:2] == values, (name, key)
  assert json.load(open(workdir / "config.json"))["num_seeds"] == 3
