import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats

from iavae_jax import distributions


class DistributionsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_kl_closed_form_matches_monte_carlo(self):
    mean = jnp.array([0.7, -1.2, 0.1])
    log_var = jnp.array([-0.5, 0.8, -2.0])
    kl = self.variant(distributions.kl_to_standard_normal)(mean, log_var)
    z = distributions.diag_gaussian_sample(jax.random.PRNGKey(1), mean, log_var, 400_000)
    log_ratio = (distributions.diag_gaussian_log_prob(z, mean, log_var)
                 - distributions.standard_normal_log_prob(z))
    chex.assert_shape(kl, ())
    chex.assert_shape(z, (400_000, 3))
    stderr = float(jnp.std(log_ratio)) / np.sqrt(z.shape[0])
    self.assertAlmostEqual(float(kl), float(jnp.mean(log_ratio)), delta=5 * stderr)

  @chex.variants(with_jit=True, without_jit=True)
  def test_log_probs_match_scipy(self):
    z = jnp.array([[0.3, -0.4], [1.5, 2.0]])
    mean, log_var = jnp.array([0.1, 0.2]), jnp.array([0.3, -0.7])
    got = self.variant(distributions.diag_gaussian_log_prob)(z, mean, log_var)
    want = stats.multivariate_normal(np.asarray(mean), np.diag(np.exp(log_var))).logpdf(z)
    chex.assert_shape(got, (2,))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(distributions.standard_normal_log_prob(z),
                               stats.multivariate_normal(np.zeros(2)).logpdf(z), rtol=1e-5)
    x = jnp.array([[0.5, 0.0, -1.0]])
    got = self.variant(lambda x: distributions.gaussian_log_likelihood(x, jnp.ones(3), 0.1))(x)
    np.testing.assert_allclose(got, stats.norm(1.0, 0.1).logpdf(x).sum(-1), rtol=1e-5)

  def test_bernoulli_log_likelihood(self):
    x = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    logits = jnp.array([[2.0, -1.0, 30.0], [-40.0, 0.5, 0.0]])
    want = np.sum(np.where(x == 1, special.log_expit(np.asarray(logits, np.float64)),
                           special.log_expit(-np.asarray(logits, np.float64))), -1)
    got = distributions.bernoulli_log_likelihood(x, logits)
    chex.assert_shape(got, (2,))
    self.assertTrue(np.all(np.isfinite(got)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    images = jnp.zeros((4, 28, 28, 1))
    chex.assert_shape(distributions.bernoulli_log_likelihood(images, images, event_ndim=3), (4,))

  def test_sample_shape_and_moments(self):
    mean, log_var = jnp.array([[1.0, -2.0]]), jnp.array([[0.0, np.log(4.0)]])
    z = distributions.diag_gaussian_sample(jax.random.PRNGKey(0), mean, log_var, 100_000)
    chex.assert_shape(z, (100_000, 1, 2))
    np.testing.assert_allclose(z.mean(0)[0], [1.0, -2.0], atol=0.03)
    np.testing.assert_allclose(z.std(0)[0], [1.0, 2.0], rtol=0.02)
