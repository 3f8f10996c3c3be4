"""The image runs' ablation models and dense architectures, in-process: the frozen-decoder stage 2,
the parameter-matched VAE, the mean-context IA-VAE, the dense encoder and decoder, and the
configuration's refusals."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iavae_jax import adaptive, blocks, image_vae, training
from iavae_jax.models import decoders, encoders
from experiments import common, configs

X_GREY = jax.random.uniform(jax.random.PRNGKey(3), (20, 28, 28))


def _model(**overrides):
  config = dataclasses.replace(configs.image_config("mnist", "smoke"), **overrides)
  return image_vae.Model(config.validate())


def _stage_2(model, kind, freeze_decoder):
  """A stage-2 state on a fresh VAE, and its jitted step."""
  vae = model.init_vae(jax.random.PRNGKey(0))
  if kind == "iavae":
    layout = blocks.BlockLayout.from_tree(vae["encoder"])
    params = {"hypernet": model.init_hypernet(jax.random.PRNGKey(1), layout),
              "decoder": vae["decoder"]}
    frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  else:
    params = {"encoder": vae["encoder"], "decoder": vae["decoder"]}
    frozen = {"batch_stats": vae["batch_stats"]}
  optimizer = image_vae.stage_optimizer(model.config, kind, freeze_decoder)
  state = training.init_state(params, optimizer, jax.random.PRNGKey(2), frozen)
  step = jax.jit(functools.partial(image_vae.train_step, model=model, kind=kind,
                                   steps_per_epoch=1, freeze_decoder=freeze_decoder))
  return state, step


@pytest.mark.parametrize("kind", ["iavae", "control"])
@pytest.mark.parametrize("encoder", [
    "mlp", pytest.param("resnet", marks=pytest.mark.slow)])   # the same freezing for both
def test_frozen_decoder_stays_put_while_inference_trains(kind, encoder):
  model = _model(encoder=encoder, encoder_hidden=(16,), decoder="mlp", decoder_hidden=(16,))
  state, step = _stage_2(model, kind, freeze_decoder=True)
  new = state
  for i in range(3):
    new, metrics = step(new, image_vae.Batch(X_GREY, jax.random.PRNGKey(10 + i)))
  assert np.isfinite(float(metrics.loss))
  chex.assert_trees_all_equal(new.params["decoder"], state.params["decoder"])
  inference = "hypernet" if kind == "iavae" else "encoder"
  assert _moved(new.params[inference], state.params[inference])
  # Without freezing, the same step moves the decoder.
  state, step = _stage_2(model, kind, freeze_decoder=False)
  new, _ = step(state, image_vae.Batch(X_GREY, jax.random.PRNGKey(10)))
  assert _moved(new.params["decoder"], state.params["decoder"])


def _moved(a, b) -> bool:
  return any(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.any(u != v)), a, b)))


@pytest.mark.parametrize("encoder, field", [("resnet", "encoder_channels"),
                                            ("mlp", "encoder_hidden")])
def test_matched_vae_has_the_smallest_widening_that_reaches_vae_plus_hypernetwork(encoder, field):
  model = _model(encoder=encoder, encoder_hidden=(16,))
  counts = image_vae.param_counts(model)
  target = counts["encoder"] + counts["hypernetwork"]
  wider = image_vae.matched_model(model)
  widths, base = getattr(wider.config, field), getattr(model.config, field)
  assert image_vae.param_counts(wider)["encoder"] >= target
  assert len(set(widths)) == 1 and widths[0] > base[0]   # equal widths stay equal, and grow
  # One unit narrower falls short: it is the smallest such widening.
  smaller = image_vae.Model(dataclasses.replace(
      model.config, **{field: tuple(w - 1 for w in widths)}))
  assert image_vae.param_counts(smaller)["encoder"] < target


def _dense_model():
  """The smoke tier with small dense models: what the ablations do does not depend on them."""
  return _model(encoder="mlp", encoder_hidden=(16,), decoder="mlp", decoder_hidden=(16,))


def test_mean_context_gives_every_example_the_training_mean_input():
  model = _dense_model()
  vae = model.init_vae(jax.random.PRNGKey(0))
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  train = jax.random.uniform(jax.random.PRNGKey(4), (70, 28, 28))
  mean_context = image_vae.mean_inputs(model, {}, frozen, train, 20)["mean_context"]
  binary = jax.random.bernoulli(jax.random.PRNGKey(0), train).astype(jnp.float32)
  expected = jnp.mean(adaptive.normalized_context(binary[..., None]), axis=0)
  chex.assert_shape(mean_context, (model.context_size,))
  chex.assert_trees_all_close(mean_context, expected, atol=1e-6)
  x = (jax.random.uniform(jax.random.PRNGKey(5), (4, 28, 28, 1)) < 0.3).astype(jnp.float32)
  contexts = model.hypernet_context({**frozen, "mean_context": mean_context}, x)
  chex.assert_trees_all_close(contexts, jnp.broadcast_to(mean_context, contexts.shape))


def test_mean_context_iavae_is_one_encoder_for_all_examples():
  # With the mean context every example gets the same deltas: the IA-VAE encodes as the plain
  # encoder with parameters phi_AVI + h(mean context).
  model = _dense_model()
  vae = model.init_vae(jax.random.PRNGKey(0))
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  hypernet = model.hypernet(layout)
  psi = jax.tree.map(lambda w: w * 1e3, model.init_hypernet(jax.random.PRNGKey(1), layout))
  c = jax.random.uniform(jax.random.PRNGKey(2), (model.context_size,))
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"], "mean_context": c}
  x = (jax.random.uniform(jax.random.PRNGKey(5), (4, 28, 28, 1)) < 0.3).astype(jnp.float32)
  mean, log_var = image_vae.encode_fn(model, "iavae", frozen)({"hypernet": psi}, frozen, x)
  phi = adaptive.modulate(vae["encoder"], hypernet.apply({"params": psi}, c))
  expected = model.encoder.apply({"params": phi, "batch_stats": vae["batch_stats"]}, x,
                                 train=False)
  chex.assert_trees_all_close((mean, log_var), expected, atol=1e-4, rtol=1e-4)


def test_dense_encoder_and_decoder_shapes():
  x = jnp.zeros((3, 28, 28, 1))
  encoder = encoders.MLPImageEncoder((16, 8), latent_dim=4)
  variables = encoder.init(jax.random.PRNGKey(0), x)
  assert set(variables) == {"params"}   # no batch norm
  mean, log_var = encoder.apply(variables, x)
  chex.assert_shape([mean, log_var], (3, 4))
  decoder = decoders.MLPDecoder((16,))
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  params = decoder.init(jax.random.PRNGKey(2), x, z)
  logits = decoder.apply(params, x, z)
  chex.assert_shape(logits, (3, 28, 28, 1))
  # The pixels are independent given z: the image only gives the shape.
  chex.assert_trees_all_close(decoder.apply(params, jnp.ones_like(x), z), logits)


@pytest.mark.parametrize("overrides, message", [
    ({"models": ("iavae",)}, "--models=iavae: name each model once"),
    ({"models": ("vae", "iavae", "iavae")}, "name each model once"),
    ({"models": ("vae", "sa_vae")}, "among vae, iavae, control"),
    ({"encoder": "vit"}, "--encoder=vit is not known; choose one of resnet, mlp"),
    ({"decoder": "flow"}, "--decoder=flow is not known"),
    ({"encoder_hidden": (16, 0)}, "--encoder_hidden must be positive integers"),
])
def test_bad_model_settings_are_refused(overrides, message):
  with pytest.raises(common.ConfigError, match=message):
    dataclasses.replace(configs.image_config("mnist", "smoke"), **overrides).validate()


def test_converged_tier_trains_every_model_to_early_stopping():
  config = configs.image_config("mnist", "converged")
  assert config.models == configs.IMAGE_MODELS[:6]
  assert min(config.vae_epochs, config.iavae_epochs) >= 50 * config.patience
  assert configs.evaluated_models(config.models)[-2:] == (
      "iavae" + configs.MEAN_SUFFIX, "iavae_frozen_decoder" + configs.MEAN_SUFFIX)


def test_dense_models_train_an_epoch_with_their_compiler_options():
  # Dense encoders and decoders compile with XLA:CPU options of their own; the epoch's jitted
  # pieces (steps and the validation ELBO inside the epoch's end) must accept them.
  model = _dense_model()
  assert model.compiler_options == training.cpu_compiler_options(loop_emitters=True)
  assert _model().compiler_options == {}   # the convolutional models keep XLA's defaults
  state, _ = _stage_2(model, "iavae", freeze_decoder=False)
  valid = (X_GREY[:8] > 0.5).astype(jnp.float32)
  epoch = image_vae.stage_epoch_fn(model, "iavae", "test", valid, X_GREY.shape[0])
  new, _ = epoch(state, X_GREY, jnp.arange(X_GREY.shape[0]))
  assert int(new.epoch) == 1 and np.isfinite(float(new.best_score))
  score = image_vae.validation_score(model, "iavae")(new.params, new.frozen, valid)
  assert float(score) == pytest.approx(float(image_vae.validation_elbo(
      model, "iavae", new.params, new.frozen, valid)), abs=1e-3)
