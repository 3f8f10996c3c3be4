"""The decoder's feedback as an input of amortized inference (iavae_jax.feedback): the ELBO's
gradient against its closed form on a linear-Gaussian decoder, the gradient's preprocessing, the
decoder passes it costs, the passes of the IA-VAE form (modulated.iterative_encode) against the
reference path, the direct corrector, and the image model's feedback inputs and their ablation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, configs
from iavae_jax import adaptive, blocks, feedback, hypernets, image_vae, modulated
from iavae_jax.models import encoders

SIGMA = 0.5


def _linear_gaussian(x, w):
  """log p(x | z) of x [B, d] under N(W z, SIGMA^2 I), up to its constant: z [S, B, k] -> [S, B]."""
  return lambda z: -0.5 * jnp.sum((x - z @ w.T) ** 2, axis=-1) / SIGMA**2


def test_elbo_gradient_matches_its_closed_form():
  # For log p(x|z) = -|x - W z|^2 / (2 s^2) + c, E_q[log p] = -(|x - W m|^2 + sum_j |W_j|^2 v_j)
  # / (2 s^2) + c, and KL = (v + m^2 - 1 - log v) / 2 summed: the gradient in closed form.
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  w = jax.random.normal(keys[0], (6, 3))
  x = jax.random.normal(keys[1], (4, 6))
  mean = jax.random.normal(keys[2], (4, 3))
  log_var = -1.0 + 0.3 * jax.random.normal(keys[3], (4, 3))
  var = jnp.exp(log_var)
  want_mean = (x - mean @ w.T) @ w / SIGMA**2 - mean
  want_log_var = -0.5 * jnp.sum(w**2, axis=0) * var / SIGMA**2 - 0.5 * (var - 1)
  eps = jax.random.normal(jax.random.PRNGKey(1), (40_000, 3))
  got_mean, got_log_var = jax.jit(feedback.elbo_gradient, static_argnums=0)(
      _linear_gaussian(x, w), mean, log_var, eps)
  chex.assert_shape((got_mean, got_log_var), (4, 3))
  chex.assert_trees_all_close((got_mean, got_log_var), (want_mean, want_log_var), atol=0.15)
  # The examples are independent: each row is its own example's gradient.
  one_mean, _ = feedback.elbo_gradient(_linear_gaussian(x[1:2], w), mean[1:2], log_var[1:2], eps)
  chex.assert_trees_all_close(one_mean[0], got_mean[1], atol=1e-3)


def test_no_gradient_flows_through_the_feedback():
  w = jnp.ones((6, 3))
  x, mean = jnp.ones((2, 6)), jnp.zeros((2, 3))
  eps = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  through = jax.grad(lambda w, m: jnp.sum(feedback.elbo_gradient(
      _linear_gaussian(x, w), m, m, eps)[0]), argnums=(0, 1))(w, mean)
  chex.assert_trees_all_equal(through, (jnp.zeros_like(w), jnp.zeros_like(mean)))
  chex.assert_trees_all_equal(jax.grad(lambda x: jnp.sum(feedback.residual(x, 0.5 * x)))(x),
                              jnp.zeros_like(x))


def test_preprocess_gradient():
  g = jnp.array([[1.0, -jnp.exp(-5.0), 1e-6, 0.0]])
  got = feedback.preprocess_gradient(g, p=10.0)
  chex.assert_shape(got, (1, 8))
  np.testing.assert_allclose(got[0, :4], [0.0, -0.5, -1.0, -1.0], atol=1e-6)
  np.testing.assert_allclose(got[0, 4:], [1.0, -1.0, np.exp(10.0) * 1e-6, 0.0], rtol=1e-5)
  # The scale of a gradient changes its magnitude feature, not its sign.
  scaled = feedback.preprocess_gradient(100.0 * g[:, :2])
  np.testing.assert_allclose(scaled[0, :2] - got[0, :2], np.log(100.0) / 10.0, rtol=1e-5)
  np.testing.assert_allclose(scaled[0, 2:], got[0, 4:6])


def test_decoder_passes():
  assert feedback.decoder_passes("gradient", 3, 8) == 48
  assert feedback.decoder_passes("residual", 3, 8) == 3
  assert feedback.decoder_passes(None, 3, 8) == 0
  with pytest.raises(ValueError, match="feedback='grad' is not one of gradient, residual"):
    feedback.decoder_passes("grad", 1, 1)


def _dense_setup():
  encoder = encoders.MLPImageEncoder((8,), 3)
  x = jax.random.bernoulli(jax.random.PRNGKey(0), 0.3, (4, 5, 5, 1)).astype(jnp.float32)
  phi = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)["params"]
  hypernet = hypernets.make_hypernet("mlp", blocks.BlockLayout.from_tree(phi), init_std=0.05)
  apply = lambda params, x: encoder.apply({"params": params}, x)
  return encoder, x, phi, hypernet, apply


def _context_fn(x):
  """A context that depends on the current guess, as a feedback context does."""
  return lambda t, mean, log_var: feedback.context(adaptive.normalized_context(x), mean,
                                                   log_var, jnp.tanh(t * mean))


def test_passes_of_the_ia_vae_form_match_the_reference_path():
  encoder, x, phi, hypernet, apply = _dense_setup()
  context_fn = _context_fn(x)
  contexts = context_fn(1, *apply(phi, x))
  psi = jax.jit(hypernet.init)(jax.random.PRNGKey(2), contexts[0])["params"]

  def reference(num_passes):   # every pass's deltas formed and added, the encoder vmapped
    mean, log_var = apply(phi, x)
    deltas = jax.tree.map(jnp.zeros_like, jax.vmap(lambda _: phi)(x))
    for t in range(1, num_passes + 1):
      factors = hypernet.apply({"params": psi}, context_fn(t, mean, log_var), method="factors")
      deltas = jax.tree.map(jnp.add, deltas,
                            modulated.materialize(factors, hypernet.cuts, hypernet.layout))
      mean, log_var = jax.vmap(lambda d, x_i: jax.tree.map(
          lambda a: a[0], apply(adaptive.modulate(phi, d), x_i[None])))(deltas, x)
    return mean, log_var

  for num_passes in (1, 3):
    got = jax.jit(lambda psi: modulated.iterative_encode(
        apply, hypernet, phi, psi, x, context_fn, num_passes))(psi)
    chex.assert_trees_all_close(got, reference(num_passes), rtol=1e-4, atol=1e-5)
  # A context that ignores the guess: one pass is the single-pass modulated encoder.
  fixed = lambda t, mean, log_var: contexts
  chex.assert_trees_all_close(
      modulated.iterative_encode(apply, hypernet, phi, psi, x, fixed, 1),
      modulated.modulated_encode(apply, hypernet, phi, psi, x, contexts), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_passes must be at least 1, got 0"):
    modulated.iterative_encode(apply, hypernet, phi, psi, x, context_fn, 0)


def test_the_corrector_starts_at_the_encoders_output_and_adds_a_correction_per_pass():
  _, x, phi, _, apply = _dense_setup()
  mean, log_var = apply(phi, x)
  context_fn = _context_fn(x)
  corrector = feedback.Corrector(3, (16, 16))
  omega = corrector.init(jax.random.PRNGKey(0), context_fn(1, mean, log_var))["params"]
  correct = lambda omega, t: feedback.iterative_correct(
      lambda c: corrector.apply({"params": omega}, c), mean, log_var, context_fn, t)
  chex.assert_trees_all_equal(correct(omega, 2), (mean, log_var))   # zero output layer
  omega = jax.tree.map(lambda a: a + 0.1, omega)
  step = lambda m, v, t: jax.tree.map(jnp.add, (m, v),
                                      corrector.apply({"params": omega}, context_fn(t, m, v)))
  chex.assert_trees_all_close(correct(omega, 2), step(*step(mean, log_var, 1), 2), atol=1e-6)


def _image_model(hypernet_input: str, **overrides) -> image_vae.Model:
  config = dataclasses.replace(
      configs.image_config("mnist", "smoke"), encoder="mlp", encoder_hidden=(8,),
      decoder="mlp", decoder_hidden=(8,), hypernet_input=hypernet_input,
      **{"feedback_samples": 2, **overrides})
  return image_vae.Model(config.validate())


@pytest.mark.parametrize("kind, feedback_size", [("gradient", 16), ("residual", 784)])
def test_image_feedback_inputs_and_their_mean_ablation(kind, feedback_size):
  model = _image_model(kind, passes=2)
  assert model.feedback_size == feedback_size
  assert model.context_size == 784 + 8 + feedback_size
  assert model.decoder_passes("iavae") == (8 if kind == "gradient" else 2)
  assert model.decoder_passes("control") == 0
  vae = model.init_vae(jax.random.PRNGKey(0))
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  params = {"hypernet": model.init_hypernet(jax.random.PRNGKey(1), layout),
            "decoder": vae["decoder"]}
  train = jax.random.uniform(jax.random.PRNGKey(2), (30, 28, 28))
  mean_feedback = image_vae.mean_inputs(model, params, frozen, train, 20)["mean_feedback"]
  chex.assert_shape(mean_feedback, (2, feedback_size))
  encode = jax.jit(image_vae.encode_fn(model, "iavae", frozen))
  x = jax.random.bernoulli(jax.random.PRNGKey(3), 0.3, (3, 28, 28, 1)).astype(jnp.float32)
  ablation = {**frozen, "mean_feedback": mean_feedback}
  other_decoder = {**params, "decoder": jax.tree.map(lambda a: a + 1.0, vae["decoder"])}
  # The feedback comes from the decoder; its mean replaces it, so the decoder no longer matters.
  assert float(jnp.abs(encode(params, frozen, x)[0] - encode(other_decoder, frozen, x)[0]).max()
               ) > 0
  chex.assert_trees_all_close(encode(params, ablation, x), encode(other_decoder, ablation, x))


def test_feedback_settings_are_checked():
  with pytest.raises(common.ConfigError, match="--passes=2: later passes differ"):
    _image_model("image_l2", passes=2)
  with pytest.raises(common.ConfigError, match="--feedback_samples must be a positive"):
    _image_model("gradient", feedback_samples=0)
  with pytest.raises(common.ConfigError, match="--corrector_hidden must be a non-negative"):
    _image_model("gradient", corrector_hidden=-1)


def test_the_corrector_has_about_the_hypernetworks_parameters():
  counts = image_vae.param_counts(_image_model("gradient"))
  assert abs(counts["corrector"] - counts["hypernetwork"]) < 0.02 * counts["hypernetwork"]
