"""The posterior machinery on a linear-Gaussian model, where every answer is known exactly,
then on the oracle model (MAP, q*)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from iavae_jax import distributions, posterior
from iavae_jax.data import synthetic
from iavae_jax.models import oracle

SIGMA = 0.1
B = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]], np.float32)


def linear_gaussian(x):
  """z ~ N(0, I), x = B z + N(0, SIGMA^2 I): the exact posterior and evidence."""
  precision = np.eye(2) + B.T @ B / SIGMA**2
  cov = np.linalg.inv(precision)
  post_mean = cov @ B.T @ np.asarray(x) / SIGMA**2
  log_px = stats.multivariate_normal(np.zeros(3), B @ B.T + SIGMA**2 * np.eye(3)).logpdf(x)
  log_joint = lambda z: (distributions.standard_normal_log_prob(z)
                         + distributions.gaussian_log_likelihood(x, z @ B.T, SIGMA))
  return log_joint, post_mean, precision, log_px


class PosteriorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_gaussian_known_answers(self):
    x = jnp.array([0.8, -0.3, 0.5])
    log_joint, post_mean, precision, log_px = linear_gaussian(x)
    summary = self.variant(lambda c: posterior.summarize_one(log_joint, c, SIGMA))(x[:2])
    np.testing.assert_allclose(summary.log_px, log_px, atol=1e-4)
    np.testing.assert_allclose(summary.z_map, post_mean, atol=1e-5)
    np.testing.assert_allclose(summary.precision, precision, rtol=1e-4)
    # A mean displaced by L^{-T} u (P = L L^T) is at Mahalanobis distance |u|, and for a Gaussian
    # posterior the density ratio to the mode is exp(-|u|^2 / 2).
    u = np.array([0.6, -0.8]) * 1.5
    chol = np.linalg.cholesky(precision)
    mu = post_mean + np.linalg.solve(chol.T, u)
    np.testing.assert_allclose(posterior.d_map(mu, summary.z_map, summary.precision), 1.5,
                               rtol=1e-4)
    np.testing.assert_allclose(
        posterior.r_map(log_joint(jnp.asarray(mu, jnp.float32)), summary.log_joint_map),
        np.exp(-1.5**2 / 2), rtol=1e-3)

  def test_oracle_quadrature_converged_and_map_is_a_maximum(self):
    x = synthetic.generate(jax.random.PRNGKey(5), 16, SIGMA).x
    summary = jax.jit(lambda x: posterior.summarize(x, SIGMA))(x)
    finer = jax.jit(lambda x: posterior.summarize(x, SIGMA, half_width=10.0, spacing=0.05))(x)
    chex.assert_shape(summary.log_px, (16,))
    chex.assert_shape(summary.z_map, (16, 2))
    chex.assert_shape(summary.precision, (16, 2, 2))
    np.testing.assert_allclose(summary.log_px, finer.log_px, atol=1e-5)
    grads = jax.vmap(jax.grad(lambda z, xi: oracle.log_joint(z, xi, SIGMA)))(summary.z_map, x)
    self.assertLess(float(jnp.abs(grads).max()), 1e-2)
    self.assertTrue(np.all(np.linalg.eigvalsh(np.asarray(summary.precision)) > 0))

  def test_optimal_gaussian_beats_its_start_and_stays_below_log_px(self):
    x = synthetic.generate(jax.random.PRNGKey(6), 32, SIGMA).x
    summary = jax.jit(lambda x: posterior.summarize(x, SIGMA))(x)
    m0, lv0 = posterior.laplace_diagonal_init(summary)
    m, lv = jax.vmap(lambda xi, a, b: posterior.optimal_gaussian(xi, SIGMA, a, b))(x, m0, lv0)
    chex.assert_shape((m, lv), ((32, 2), (32, 2)))
    elbo_star = oracle.exact_elbo(x, m, lv, SIGMA)
    self.assertTrue(np.all(elbo_star >= oracle.exact_elbo(x, m0, lv0, SIGMA)))
    self.assertTrue(np.all(elbo_star <= summary.log_px))
    grad = jax.vmap(jax.grad(lambda t, xi: oracle.exact_elbo(xi, t[:2], t[2:], SIGMA)))(
        jnp.concatenate([m, lv], -1), x)
    self.assertLess(float(jnp.abs(grad).max()), 1e-2)

  def test_newton_maximize_never_decreases(self):
    f = lambda t: -jnp.sum((t - 3.0) ** 4) + jnp.sum(jnp.cos(t))
    start = jnp.array([-2.0, 0.5])
    result = posterior.newton_maximize(f, start, num_steps=40)
    self.assertGreaterEqual(float(f(result)), float(f(start)))
    self.assertLess(float(jnp.abs(jax.grad(f)(result)).max()), 1e-3)
