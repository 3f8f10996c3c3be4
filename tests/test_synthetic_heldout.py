"""The synthetic experiment's held-out evaluation: the held-out set (new points, same generator),
the bounds log p(x) >= L[q*] >= ELBO on it through the same code as on the training data, the
tail summary on differences known in advance, and the bounded hypernetwork inputs."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments import common, configs, synthetic_train
from iavae_jax import blocks, exact, hypernets, synthetic_vae
from iavae_jax.data import synthetic
from iavae_jax.models import encoders, oracle


def test_heldout_set_is_new_points_from_the_same_generator():
  config = dataclasses.replace(configs.synthetic_plumbing_check(), num_examples=2000)
  train = synthetic.generate(jax.random.PRNGKey(config.data_seed), config.num_examples,
                             config.sigma)
  heldout = synthetic_train.heldout_data(config)
  chex.assert_equal_shape([train.x, heldout.x])
  chex.assert_equal_shape([train.z_true, heldout.z_true])
  # Distinct: no held-out point coincides with a training point.
  assert exact.nearest_distance(heldout.x, train.x).min() > 1e-4
  # The same generator: z ~ N(0, I) and x - f(z) ~ N(0, sigma^2 I) on the held-out set, and each
  # coordinate of x is distributed as on the training set (two-sample Kolmogorov-Smirnov).
  z = np.asarray(heldout.z_true, np.float64)
  n = len(z)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=5 / np.sqrt(n))
  np.testing.assert_allclose(np.cov(z.T), np.eye(2), atol=6 * np.sqrt(2 / n))
  noise = np.asarray(heldout.x - oracle.decoder(heldout.z_true), np.float64)
  np.testing.assert_allclose(noise.std(0), config.sigma, rtol=6 / np.sqrt(2 * n))
  for j in range(3):
    assert stats.ks_2samp(np.asarray(train.x[:, j]), np.asarray(heldout.x[:, j])).pvalue > 1e-3
  # Another data seed, another held-out set.
  other = synthetic_train.heldout_data(dataclasses.replace(config, data_seed=1))
  assert not np.allclose(other.x, heldout.x)


@pytest.fixture(scope="module")
def small_models():
  """A config of 48 points, 2 random VAEs and 2 IA-VAEs on each (hypernetworks of random,
  not small, weights), and the training data."""
  config = dataclasses.replace(configs.synthetic_plumbing_check(), num_examples=48, num_vae_seeds=2,
                               num_iavae_seeds=2)
  x = synthetic.generate(jax.random.PRNGKey(config.data_seed), config.num_examples,
                         config.sigma).x
  keys = jax.random.split(jax.random.PRNGKey(7), 6)
  encoder = encoders.MLPEncoder(config.encoder_width)
  phi = jax.vmap(lambda k: encoder.init(k, x[0])["params"])(keys[:2])
  layout = blocks.BlockLayout.from_tree(jax.tree.map(lambda a: a[0], phi))
  hypernet = hypernets.LinearHypernet(layout, config.embed_dim, init_std=0.3)
  psi = jax.vmap(lambda k: hypernet.init(k, x[0])["params"])(keys[2:])
  frozen = jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), phi)
  return config, x, layout, phi, psi, frozen


@pytest.fixture(scope="module")
def heldout_truth(small_models):
  config = small_models[0]
  heldout_x = synthetic_train.heldout_data(config).x
  return heldout_x, exact.true_posterior(heldout_x, config.sigma)


@pytest.mark.parametrize("hypernet_input", ["x", "softclip"])
def test_bounds_and_decomposition_on_heldout_data(small_models, heldout_truth, hypernet_input):
  config, x, layout, phi, psi, frozen = small_models
  config = dataclasses.replace(config, hypernet_input=hypernet_input)
  heldout_x, truth = heldout_truth
  iavae_fn = synthetic_vae.iavae_encode(config, layout,
                                          synthetic_vae.hypernet_context(config, x))
  args = (heldout_x, config.sigma, truth.summary, truth.elbo_qstar)
  vae_eval, vae_means, vae_points = jax.tree.map(np.asarray, exact.evaluate(
      synthetic_vae.vae_encode(config.encoder_width), phi, None, *args))
  iavae_eval, _, iavae_points = jax.tree.map(np.asarray, exact.evaluate(
      iavae_fn, psi, frozen, *args))
  chex.assert_shape(vae_means, (2, 48, 2))
  chex.assert_shape([vae_points, iavae_points], (None, 48))
  log_px, elbo_qstar = np.asarray(truth.summary.log_px), np.asarray(truth.elbo_qstar)
  # log p(x) >= L[q*] >= the ELBO of every encoder, point by point (float32 slack).
  assert np.all(log_px >= elbo_qstar - 1e-3)
  for points in (vae_points, iavae_points):
    assert np.all(elbo_qstar >= points - 1e-3)
  gaps = exact.gap_decomposition(truth, vae_eval, iavae_eval, config.num_iavae_seeds)
  for model, points in (("vae", vae_points), ("iavae", iavae_points)):
    g = gaps[model]
    assert g["approximation_gap"] >= 0 and g["amortization_gap"] >= 0
    assert g["total_gap"] == pytest.approx(g["approximation_gap"] + g["amortization_gap"],
                                           rel=1e-6, abs=1e-4)
    assert g["total_gap"] == pytest.approx(log_px.mean() - points.mean(), rel=1e-5)
  entry = exact.table3_entry(vae_eval)
  assert entry["elbo"] == pytest.approx(vae_points.mean(), rel=1e-5)
  assert entry["num_models"] == 2


@pytest.mark.parametrize("hypernet_input", ["tanh", "softclip"])
def test_bounded_inputs_are_bounded_and_start_at_the_vae(small_models, hypernet_input):
  config, x, layout, phi, psi, frozen = small_models
  config = dataclasses.replace(config, hypernet_input=hypernet_input)
  assert synthetic_vae.hypernet_context(dataclasses.replace(config, hypernet_input="x"),
                                          x) is None
  context = synthetic_vae.hypernet_context(config, x)
  far = jnp.array([[1e3, -1e3, 1e6], [0.0, 0.0, 0.0], [-1e9, 1e9, -1e9]])
  m, s = np.asarray(x, np.float64).mean(0), np.asarray(x, np.float64).std(0)
  if hypernet_input == "tanh":
    lo, hi = -1.0, 1.0
  else:
    lo, hi = m - 3 * s, m + 3 * s
    near = m + 0.5 * s * np.array([[1.0, -1.0, 0.5], [-1.0, 0.3, 1.0]])
    np.testing.assert_allclose(context(jnp.asarray(near, jnp.float32)) - m, near - m,
                               rtol=0.01)    # x itself near the bulk: 1% off at 0.5 std
  c = np.asarray(context(far), np.float64)
  assert np.all((c >= lo - 1e-5) & (c <= hi + 1e-5))
  # Proposition 1 with the new input: a zero hypernetwork gives its VAE's encoder (up to
  # float32 rounding: the two are compiled differently).
  zero = jax.tree.map(jnp.zeros_like, psi)
  iavae_fn = synthetic_vae.iavae_encode(config, layout, context)
  points = jnp.concatenate([x, far])
  mean, log_var = jax.vmap(iavae_fn, in_axes=(0, 0, None))(zero, frozen, points)
  vae_mean, vae_log_var = jax.vmap(synthetic_vae.vae_encode(config.encoder_width),
                                   in_axes=(0, None, None))(frozen, None, points)
  np.testing.assert_allclose(mean, vae_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(log_var, vae_log_var, rtol=1e-6, atol=1e-6)
  # Bounded: at any x, a delta is at most |W| max(|c|, |e_l|) + |b| away from zero.
  psi0 = jax.tree.map(lambda a: a[0], psi)
  hypernet = hypernets.LinearHypernet(layout, config.embed_dim)
  deltas = [jax.tree.leaves(hypernet.apply({"params": psi0}, c_i)) for c_i in context(far)]
  largest_input = max(np.abs(lo).max(), np.abs(hi).max(),
                      float(np.abs(psi0["block_embeddings"]).max()))
  bound = (np.abs(np.asarray(psi0["W"])).sum(1).max() * largest_input
           + np.abs(np.asarray(psi0["b"])).max())
  assert max(float(np.abs(leaf).max()) for d in deltas for leaf in d) <= bound


def test_unknown_hypernet_input_is_refused():
  with pytest.raises(common.ConfigError, match=re.escape(
      "--hypernet_input=image is not known; choose one of x, tanh, softclip, gradient, residual.")):
    dataclasses.replace(configs.synthetic_plumbing_check(), hypernet_input="image").validate()


def test_tail_summary_on_known_differences():
  rng = np.random.default_rng(0)
  n = 400
  x = rng.normal(size=(n, 3))
  norm = np.linalg.norm(x, axis=1)
  vae = np.stack([-norm, -2 * norm])                        # [V = 2, N]
  # IA-VAE s of VAE v: better by 1 everywhere except the 4 points of largest |x|, worse by 5.
  far = np.argsort(norm)[-4:]
  gain = np.ones(n)
  gain[far] = -5.0
  iavae = np.repeat(vae, 3, axis=0) + gain                   # [V * S = 6, N]
  qstar = np.zeros(n)
  train_x = x[:200] + 1e-3
  tail = exact.tail_summary(x, vae, iavae, qstar, train_x)
  assert tail["fraction_worse"] == pytest.approx(4 / n)
  assert tail["diff_min"] == pytest.approx(-5.0)
  assert tail["diff_quantiles"]["0.5"] == pytest.approx(1.0)
  assert tail["diff_quantiles"]["0.001"] == pytest.approx(-5.0)
  assert tail["diff_norm_rank_correlation"] < 0
  bins = tail["by_norm"]
  assert sum(b["num_points"] for b in bins) == n
  assert [b["quantiles"] for b in bins] == [[0.0, 0.5], [0.5, 0.9], [0.9, 0.99], [0.99, 1.0]]
  assert bins[-1]["num_points"] == 4 and bins[-1]["fraction_worse"] == 1.0
  assert bins[0]["fraction_worse"] == 0.0 and bins[0]["diff_mean"] == pytest.approx(1.0)
  assert bins[-1]["iavae_amortization_gap"] - bins[-1]["vae_amortization_gap"] == pytest.approx(5)
  assert sum(b["num_points"] for b in tail["by_distance_to_train"]) == n
  assert "by_distance_to_train" not in exact.tail_summary(x, vae, iavae, qstar)
  # The nearest-neighbour distance against brute force, across chunk boundaries.
  brute = np.sqrt(((x[:, None] - train_x[None]) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(exact.nearest_distance(x, train_x, chunk=7), brute,
                             rtol=1e-12)
