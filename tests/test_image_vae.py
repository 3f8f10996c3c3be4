"""The library's image IA-VAE (iavae_jax.image_vae, hparams): its configuration's checks,
its errors, data-set evaluation and the data subsets, apart from the experiments that use them."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iavae_jax import adaptive, blocks, checkpoints, hypernets, hparams, image_vae, training
from iavae_jax.errors import ConfigError
from iavae_jax.data import images

DENSE = hparams.ImageVAEConfig(encoder="mlp", encoder_hidden=(16,), decoder="mlp",
                                    decoder_hidden=(32,), latent_dim=4)


def test_the_defaults_are_valid_and_the_names_match_the_modules():
  assert hparams.ImageVAEConfig().validate() == hparams.ImageVAEConfig()
  assert tuple(hypernets.HYPERNETS) == hparams.DESIGNS
  assert set(hparams.FEEDBACKS) < set(hparams.HYPERNET_INPUTS)


@pytest.mark.parametrize("overrides, message", [
    ({"encoder": "vit"}, "encoder=vit is not known; choose one of resnet, mlp"),
    ({"hypernet": "lstm"}, "hypernet=lstm is not known; choose one of paper, ha, mlp"),
    ({"latent_dim": 0}, "latent_dim must be a positive integer, got 0"),
    ({"decoder_kernel_sizes": (4,)}, "decoder_kernel_sizes must be odd positive integers"),
    ({"passes": 2}, "passes=2: later passes differ from the first only through the decoder's "
                    "feedback; use hypernet_input=gradient or residual, or passes=1"),
    ({"warmup_start": 1.5}, "warmup_start is a KL weight in (0, 1]"),
    ({"weight_decay": -1.0}, "weight_decay must be non-negative and finite"),
    ({"corrector_hidden": -1}, "corrector_hidden must be a non-negative integer, got -1"),
    ({"adapted_blocks": "mean("}, "adapted_blocks='mean(' is not a regular expression"),
    ({"hypernet_learning_rate": float("nan")},
     "hypernet_learning_rate must be positive and finite, got nan"),
])
def test_a_bad_field_is_named_in_a_value_error(overrides, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
    dataclasses.replace(hparams.ImageVAEConfig(), **overrides).validate()


def test_an_unknown_kind_is_refused_by_name():
  model = image_vae.Model(DENSE)
  with pytest.raises(ValueError, match="encode_fn: kind='iwae' is not one of vae, iavae"):
    image_vae.encode_fn(model, "iwae", {})


@pytest.mark.parametrize("use_jit", [False, True])
def test_evaluate_gives_per_example_metrics_and_the_iwae_bound_tops_the_elbo(use_jit):
  model = image_vae.Model(DENSE)
  params = model.init_vae(jax.random.PRNGKey(0))
  data = (jax.random.uniform(jax.random.PRNGKey(1), (13, 28, 28)) < 0.3).astype(jnp.float32)
  sizes = dict(test_samples=8, iwae_samples=64, iwae_chunk=16, chunk_size=5)   # 13: padded
  run = lambda: image_vae.evaluate(model, image_vae.encode_fn(model, "vae", {}), params, {},
                                   data, jax.random.PRNGKey(2), **sizes)
  if use_jit:
    metrics = run()
  else:
    with jax.disable_jit():
      metrics = run()
  for name in ("elbo", "kl", "iwae"):
    chex.assert_shape(metrics[name], (13,))
    assert np.all(np.isfinite(metrics[name]))
  assert np.all(metrics["kl"] >= 0)
  # log p(x) >= IWAE_K >= ELBO in expectation; an untrained model's gap is far above the noise.
  assert float(np.mean(metrics["iwae"])) > float(np.mean(metrics["elbo"]))
  # The dataset mean ELBO is the mean of the per-example ELBOs' estimator (same chunking).
  mean = image_vae.dataset_elbo(model, image_vae.encode_fn(model, "vae", {}), params, {}, data,
                                8, jax.random.PRNGKey(3), 5)
  assert abs(float(mean) - float(np.mean(metrics["elbo"]))) < 0.05 * abs(float(mean))


def test_the_iavae_at_zero_output_layers_is_the_vae_on_the_library_path():
  # Proposition 1 through image_vae.encode_fn: output layers zero -> the VAE's encoder exactly.
  model = image_vae.Model(dataclasses.replace(DENSE, hypernet="mlp"))
  vae = model.init_vae(jax.random.PRNGKey(0))
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  psi = model.init_hypernet(jax.random.PRNGKey(1), blocks.BlockLayout.from_tree(vae["encoder"]))
  psi = jax.tree.map(jnp.zeros_like, psi)
  x = (jax.random.uniform(jax.random.PRNGKey(2), (6, 28, 28, 1)) < 0.3).astype(jnp.float32)
  got = image_vae.encode_fn(model, "iavae", frozen)({"hypernet": psi}, frozen, x)
  want = image_vae.encode_fn(model, "vae", {})(vae, {}, x)
  chex.assert_trees_all_close(got, want, atol=1e-6)


@pytest.mark.parametrize("feedback", ["image_l2", "residual"])
def test_adapted_blocks_leave_the_other_blocks_at_the_vaes(feedback):
  # The output layers alone: the hidden layer's parameters never move; trained output layers
  # differ per example; the parameter counts and a pattern that selects nothing.
  model = image_vae.Model(dataclasses.replace(DENSE, adapted_blocks="^(mean|log_var)/",
                                              hypernet_input=feedback, hypernet_init_std=0.3))
  vae = model.init_vae(jax.random.PRNGKey(0))
  params, frozen = image_vae.stage_start(model, "iavae", vae, jax.random.PRNGKey(1))
  assert model.adapted_layout().paths == ("log_var/bias", "log_var/kernel", "mean/bias",
                                          "mean/kernel")
  counts = image_vae.param_counts(model)
  assert (counts["encoder_blocks"], counts["adapted_blocks"]) == (6, 4)
  x = (jax.random.uniform(jax.random.PRNGKey(2), (6, 28, 28, 1)) < 0.3).astype(jnp.float32)
  encode = image_vae.encode_fn(model, "iavae", frozen)
  mean, log_var = encode(params, frozen, x)
  chex.assert_shape([mean, log_var], (6, 4))
  hidden = jax.nn.relu(x.reshape(6, -1) @ vae["encoder"]["Dense_0"]["kernel"]
                       + vae["encoder"]["Dense_0"]["bias"])
  base_mean = hidden @ vae["encoder"]["mean"]["kernel"] + vae["encoder"]["mean"]["bias"]
  assert float(jnp.abs(mean - base_mean).min()) > 1e-4
  # mean_i = relu(x_i W_0 + b_0) (W + dW_i) + b + db_i with the VAE's W_0 and b_0.
  if feedback == "image_l2":
    hypernet = model.hypernet(model.adapted_layout())
    for i, c in enumerate(adaptive.normalized_context(x)):
      deltas = hypernet.apply({"params": params["hypernet"]}, c)
      want = hidden[i] @ (vae["encoder"]["mean"]["kernel"] + deltas["mean"]["kernel"]) + (
          vae["encoder"]["mean"]["bias"] + deltas["mean"]["bias"])
      chex.assert_trees_all_close(mean[i], want, rtol=1e-4, atol=1e-5)
  full = image_vae.Model(dataclasses.replace(model.config, adapted_blocks=""))
  assert image_vae.param_counts(full)["hypernetwork"] > counts["hypernetwork"]
  nothing = image_vae.Model(dataclasses.replace(DENSE, adapted_blocks="^decoder/"))
  with pytest.raises(ValueError, match=r"adapted_blocks='\^decoder/': no block path matches"):
    image_vae.stage_start(nothing, "iavae", vae, jax.random.PRNGKey(1))


def test_subset_caps_each_split_and_refuses_negative_sizes():
  splits = images.ImageSplits(train=np.zeros((10, 28, 28)), valid=np.zeros((4, 28, 28)),
                              test=np.zeros((6, 28, 28)), info={"dataset": "toy"})
  capped = images.subset(splits, 3, 0, 5)
  assert (capped.train.shape[0], capped.valid.shape[0], capped.test.shape[0]) == (3, 4, 5)
  assert capped.info == splits.info
  with pytest.raises(ValueError, match="subset: max_valid must be a non-negative integer"):
    images.subset(splits, 0, -1, 0)


@pytest.mark.parametrize("kind", ["iavae", "control", "corrector"])
def test_stage_start_keeps_the_vae_frozen_and_check_params_knows_its_kind(kind):
  model = image_vae.Model(DENSE)
  vae = model.init_vae(jax.random.PRNGKey(0))
  params, frozen = image_vae.stage_start(model, kind, vae, jax.random.PRNGKey(1))
  assert image_vae.kind_of(params) == kind
  assert image_vae.kind_of(vae) == "vae" and image_vae.kind_of({"decoder": {}}) is None
  chex.assert_trees_all_equal(params["decoder"], vae["decoder"])
  chex.assert_trees_all_equal(frozen["batch_stats"], vae["batch_stats"])
  if kind != "control":
    chex.assert_trees_all_equal(frozen["phi_avi"], vae["encoder"])
  image_vae.check_params(model, kind, params, frozen)   # no error
  image_vae.check_params(model, "vae", vae, {})
  wider = image_vae.Model(dataclasses.replace(DENSE, decoder_hidden=(48,)))
  with pytest.raises(ValueError, match=rf"not those of a {kind} of this configuration \(at "
                                       r"\['params'\]\['decoder'\]"):
    image_vae.check_params(wider, kind, params, frozen)


def test_stage_start_refuses_the_vae_kind_and_a_tree_that_is_not_a_vae():
  model = image_vae.Model(DENSE)
  with pytest.raises(ValueError, match="kind='vae' is not a stage-2 kind"):
    image_vae.stage_start(model, "vae", {}, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="vae has no batch_stats, encoder"):
    image_vae.stage_start(model, "iavae", {"decoder": {}}, jax.random.PRNGKey(0))


def test_images_of_another_shape_are_refused_by_name():
  model = image_vae.Model(DENSE)
  vae = model.init_vae(jax.random.PRNGKey(0))
  encode = image_vae.encode_fn(model, "vae", {})
  flat = jnp.zeros((5, 784))
  with pytest.raises(ValueError, match=re.escape(
      "evaluate: data must be a batch of images [N, 28, 28] with N >= 1, got shape (5, 784)")):
    image_vae.evaluate(model, encode, vae, {}, flat, jax.random.PRNGKey(1), test_samples=1,
                       iwae_samples=1, iwae_chunk=1, chunk_size=5)
  with pytest.raises(ValueError, match=re.escape(
      "encode: x must be a batch of images [N, 28, 28, 1] with N >= 1, got shape (5, 28, 28)")):
    encode(vae, {}, jnp.zeros((5, 28, 28)))
  state = training.init_state(vae, image_vae.stage_optimizer(DENSE, "vae"),
                              jax.random.PRNGKey(2))
  with pytest.raises(ValueError, match=re.escape("train_step: batch.image must be a batch")):
    image_vae.train_step(state, image_vae.Batch(jnp.zeros((4, 28, 28, 1)), jax.random.PRNGKey(3)),
                         model=model, kind="vae", steps_per_epoch=1)


def test_load_trained_reads_a_stages_checkpoint_and_refuses_another_architecture(tmp_path):
  model = image_vae.Model(DENSE)
  key = jax.random.PRNGKey(0)
  vae = model.init_vae(key)
  params, frozen = image_vae.stage_start(model, "iavae", vae, key)
  state = training.init_state(params, image_vae.stage_optimizer(DENSE, "iavae"), key, frozen)
  directory = str(tmp_path / "iavae_seed0")
  ckpt = checkpoints.Checkpointer(directory)
  ckpt.save(3, state)
  ckpt.close()
  trained = image_vae.load_trained(model, directory)
  assert trained.kind == "iavae" and trained.source == f"{directory} step 3"
  chex.assert_trees_all_close(trained.params, state.best_params)
  chex.assert_trees_all_close(trained.frozen, frozen)
  x = jnp.zeros((2, 28, 28, 1))
  chex.assert_trees_all_close(trained.encode(trained.params, trained.frozen, x),
                              image_vae.encode_fn(model, "iavae", frozen)(params, frozen, x))
  wider = image_vae.Model(dataclasses.replace(DENSE, encoder_hidden=(8,)))
  with pytest.raises(ConfigError, match=f"^{re.escape(directory)} step 3 holds parameters of "
                     "another architecture"):
    image_vae.load_trained(wider, directory)
  with pytest.raises(ConfigError, match="does not exist: no checkpoint to read"):
    image_vae.load_trained(model, str(tmp_path / "missing"))
  # A state saved without its frozen inputs (as before training states held them).
  legacy = str(tmp_path / "legacy")
  ckpt = checkpoints.Checkpointer(legacy)
  ckpt.save(1, {"best_params": state.best_params})
  ckpt.close()
  with pytest.raises(ConfigError, match="holds a iavae without its frozen inputs"):
    image_vae.load_trained(model, legacy)
  kinds = []
  restored = image_vae.load_trained(model, legacy, lambda kind: kinds.append(kind) or frozen)
  assert kinds == ["iavae"]
  chex.assert_trees_all_close(restored.frozen, frozen)
