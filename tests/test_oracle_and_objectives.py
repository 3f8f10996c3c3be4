"""The oracle model, the ELBO and IWAE bounds, against each other and against quadrature."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iavae_jax import objectives, posterior
from iavae_jax.data import synthetic
from iavae_jax.models import oracle

SIGMA = 0.1


def _data(n=6):
  return synthetic.generate(jax.random.PRNGKey(3), n, SIGMA)


class OracleTest(chex.TestCase):

  def test_decoder_is_az_plus_g(self):
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
    want = z @ oracle.A.T + jnp.stack([jnp.zeros(5), jnp.zeros(5), z[:, 0] * z[:, 1]], -1)
    chex.assert_trees_all_close(oracle.decoder(z), want, atol=1e-6)
    chex.assert_shape(oracle.decoder(jnp.zeros((7, 4, 2))), (7, 4, 3))

  def test_generate_shapes_and_noise(self):
    data = synthetic.generate(jax.random.PRNGKey(0), 4000, SIGMA)
    chex.assert_shape(data.x, (4000, 3))
    chex.assert_shape(data.z_true, (4000, 2))
    residual = data.x - oracle.decoder(data.z_true)
    np.testing.assert_allclose(residual.std(0), [SIGMA] * 3, rtol=0.05)
    with self.assertRaisesRegex(ValueError, "sigma must be positive"):
      synthetic.generate(jax.random.PRNGKey(0), 10, 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_closed_form_expected_log_likelihood_matches_monte_carlo(self):
    x = _data(3).x
    mean = jnp.array([[0.2, -0.5], [1.0, 0.3], [-1.1, -0.9]])
    log_var = jnp.array([[-1.0, -2.0], [-3.0, -0.5], [-2.0, -2.0]])
    exact = self.variant(lambda *a: oracle.expected_log_likelihood(*a, SIGMA))(x, mean, log_var)
    eps = jax.random.normal(jax.random.PRNGKey(1), (200_000,) + mean.shape)
    terms = objectives.elbo(eps, mean, log_var, lambda z: oracle.log_likelihood(x, z, SIGMA))
    chex.assert_shape(exact, (3,))
    chex.assert_shape(terms.elbo, (3,))
    np.testing.assert_allclose(terms.expected_log_likelihood, exact, rtol=2e-3)
    np.testing.assert_allclose(terms.elbo, oracle.exact_elbo(x, mean, log_var, SIGMA), rtol=2e-3)

  def test_elbo_and_iwae_below_quadrature_log_px(self):
    x = _data().x
    summary = jax.jit(lambda x: posterior.summarize(x, SIGMA))(x)
    mean, log_var = posterior.laplace_diagonal_init(summary)
    log_var = log_var + 0.5   # a deliberately imperfect q
    elbo = oracle.exact_elbo(x, mean, log_var, SIGMA)
    self.assertTrue(np.all(elbo <= summary.log_px))
    ll = lambda z: oracle.log_likelihood(x, z, SIGMA)
    iwae_small = objectives.iwae_bound(jax.random.normal(jax.random.PRNGKey(0), (2,) + mean.shape),
                                       mean, log_var, ll)
    iwae_large = objectives.iwae_bound(
        jax.random.normal(jax.random.PRNGKey(1), (20_000,) + mean.shape), mean, log_var, ll)
    chex.assert_shape(iwae_large, (x.shape[0],))
    # The IWAE bound tightens towards log p(x) with many samples (to within its Monte Carlo
    # error: one estimate of a bound may land a little above it).
    np.testing.assert_allclose(iwae_large, summary.log_px, atol=3e-2)
    self.assertGreater(float(jnp.mean(iwae_large)), float(jnp.mean(elbo)))
    self.assertTrue(np.all(np.isfinite(iwae_small)))


@pytest.mark.parametrize("eps_shape, mean_shape, log_var_shape, message", [
    ((4, 6, 2), (6, 2), (6, 3), r"elbo: mean and log_var must have the same shape \[..., k\], "
                                r"got \(6, 2\) and \(6, 3\)"),
    ((6, 2), (6, 2), (6, 2), r"elbo: eps must be \[S, ..., k\], S samples that broadcast against "
                             r"mean's \(6, 2\) to \[S, 6, 2\], got \(6, 2\)"),
    ((4, 6, 3), (6, 2), (6, 2), r"got \(4, 6, 3\)"),
    ((2,), (6, 2), (6, 2), r"got \(2,\)"),
])
def test_bad_shapes_are_named(eps_shape, mean_shape, log_var_shape, message):
  ll = lambda z: jnp.zeros(z.shape[:-1])
  with pytest.raises(ValueError, match=message):
    objectives.elbo(jnp.zeros(eps_shape), jnp.zeros(mean_shape), jnp.zeros(log_var_shape), ll)


@pytest.mark.parametrize("call, message", [
    (lambda: oracle.exact_elbo(jnp.zeros((5, 2)), jnp.zeros((5, 2)), jnp.zeros((5, 2)), SIGMA),
     r"exact_elbo: x must have shape \[..., 3\], got \(5, 2\)"),
    (lambda: oracle.exact_elbo(jnp.zeros((5, 3)), jnp.zeros((5, 3)), jnp.zeros((5, 2)), SIGMA),
     r"exact_elbo: mean must have shape \[..., 2\], got \(5, 3\)"),
    (lambda: oracle.log_likelihood(jnp.zeros((5, 3)), jnp.zeros(5), SIGMA),
     r"log_likelihood: z must have shape \[..., 2\], got \(5,\)"),
    (lambda: oracle.decoder(jnp.zeros(())), r"decoder: z must have shape \[..., 2\], got \(\)"),
])
def test_the_oracle_names_an_argument_of_the_wrong_size(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_noise_shared_across_the_batch_broadcasts():
  # eps [S, 1, k] for mean [B, k]: the same draws for every example (common random numbers).
  x = _data().x
  mean, log_var = jnp.zeros((x.shape[0], 2)), jnp.zeros((x.shape[0], 2))
  eps = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 2))
  terms = objectives.elbo(eps, mean, log_var, lambda z: oracle.log_likelihood(x, z, SIGMA))
  chex.assert_shape(terms.elbo, (x.shape[0],))
  same = objectives.elbo(jnp.broadcast_to(eps, (3, x.shape[0], 2)), mean, log_var,
                         lambda z: oracle.log_likelihood(x, z, SIGMA))
  chex.assert_trees_all_close(terms, same)
