"""q*, log p^ and refinement (iavae_jax.gaps) against the closed forms of a linear-Gaussian model.

p(z) = N(0, I_k), p(x | z) = N(W z + b, sigma^2 I_d). The posterior is Gaussian with precision
P = I + W^T W / sigma^2 and mean P^-1 W^T (x - b) / sigma^2; the best diagonal Gaussian q* has the
posterior's mean and variances 1 / diag(P); log p(x) = log N(x; b, W W^T + sigma^2 I); and the
ELBO of any diagonal Gaussian is known in closed form. With a dense W, P is not diagonal, so the
approximation gap log p(x) - L[q*] = (sum_j log P_jj - log det P) / 2 is positive.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iavae_jax import distributions, gaps

K, D, SIGMA, N = 3, 6, 0.5, 4


def _model():
  w_key, b_key, z_key, noise_key = jax.random.split(jax.random.PRNGKey(42), 4)
  w = jax.random.normal(w_key, (D, K))
  b = 0.5 * jax.random.normal(b_key, (D,))
  z = jax.random.normal(z_key, (N, K))
  x = z @ w.T + b + SIGMA * jax.random.normal(noise_key, (N, D))
  return w, b, x


def _log_likelihood_fn(w, b, x):
  """One example's decoder: z [S, k] -> log N(x; W z + b, sigma^2 I) [S]."""
  return lambda z: distributions.gaussian_log_likelihood(x, z @ w.T + b, SIGMA)


def _exact(w, b, x):
  """Per example [N]: the posterior mean, q*'s log-variances, L[q*] and log p(x)."""
  precision = jnp.eye(K) + w.T @ w / SIGMA**2
  post_mean = jnp.linalg.solve(precision, w.T @ (x - b).T / SIGMA**2).T          # [N, k]
  qstar_log_var = jnp.broadcast_to(-jnp.log(jnp.diag(precision)), post_mean.shape)
  cov = w @ w.T + SIGMA**2 * jnp.eye(D)
  log_px = jax.scipy.stats.multivariate_normal.logpdf(x, b, cov)
  return post_mean, qstar_log_var, _exact_elbo(w, b, x, post_mean, qstar_log_var), log_px


def _exact_elbo(w, b, x, mean, log_var):
  """The closed-form ELBO of N(mean, diag(exp(log_var))): E_q log p(x|z) - KL. [..., k] -> [...]."""
  expected_ll = (distributions.gaussian_log_likelihood(x, mean @ w.T + b, SIGMA)
                 - 0.5 * jnp.sum(jnp.exp(log_var) * jnp.sum(w**2, axis=0), -1) / SIGMA**2)
  return expected_ll - distributions.kl_to_standard_normal(mean, log_var)


def _encoder_output(post_mean, qstar_log_var):
  """A deliberately imperfect amortised q: mean and log-variance both off."""
  offset = jax.random.normal(jax.random.PRNGKey(7), post_mean.shape)
  return post_mean + 0.3 * offset, qstar_log_var + 0.5 + 0.2 * offset


def _per_example(fn, w, b, x, *args):
  """vmap fn(log_likelihood_fn, *per-example args) over the N examples."""
  return jax.vmap(lambda x_i, *a: fn(_log_likelihood_fn(w, b, x_i), *a))(x, *args)


def _keys(i):
  return jax.random.split(jax.random.PRNGKey(i), N)


class ClosedFormTest(chex.TestCase):

  def test_exact_elbo_helper_matches_the_library_estimate(self):
    # The closed form the other tests lean on, against a large Monte Carlo estimate.
    w, b, x = _model()
    mean, log_var = _encoder_output(*_exact(w, b, x)[:2])
    estimate = _per_example(lambda ll, m, v, k: gaps.elbo_estimate(ll, m, v, k, 20_000, 1000),
                            w, b, x, mean, log_var, _keys(0))
    chex.assert_trees_all_close(estimate, _exact_elbo(w, b, x, mean, log_var), atol=0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_qstar_and_log_px_match_the_closed_forms(self):
    w, b, x = _model()
    post_mean, qstar_log_var, elbo_qstar, log_px = _exact(w, b, x)
    mean, log_var = _encoder_output(post_mean, qstar_log_var)

    @self.variant
    def decompose(x, mean, log_var, keys):
      def one(ll, m, v, key):
        opt_key, final_key, iwae_key = jax.random.split(key, 3)
        q = gaps.optimize_gaussian(ll, m, v, opt_key)
        return (q, gaps.elbo_estimate(ll, m, v, final_key, 5000),
                gaps.elbo_estimate(ll, q.mean, q.log_var, final_key, 5000),
                gaps.log_px_estimate(ll, q.mean, q.log_var, iwae_key))
      return _per_example(one, w, b, x, mean, log_var, keys)

    q, elbo_hat, elbo_qstar_hat, log_px_hat = decompose(x, mean, log_var, _keys(1))
    chex.assert_shape((q.mean, q.log_var), (N, K))
    chex.assert_shape((elbo_hat, elbo_qstar_hat, log_px_hat, q.steps), (N,))
    # q* itself: near the optimum's parameters (the ELBO is flat in the log-variances: 0.15
    # off in one costs ~0.01 nats), and its exact ELBO within 0.01 nats of the best.
    chex.assert_trees_all_close(q.mean, post_mean, atol=0.03)
    chex.assert_trees_all_close(q.log_var, qstar_log_var, atol=0.2)
    chex.assert_trees_all_close(_exact_elbo(w, b, x, q.mean, q.log_var), elbo_qstar, atol=0.01)
    # The estimates: L[q*] within 0.1 nats (5,000 samples: standard error ~0.02), log p^ within
    # 0.03 (with q* as the proposal the log-weights vary by ~0.5 here: K = 5,000 leaves a
    # standard error of ~0.007 and a bias of ~1e-4).
    chex.assert_trees_all_close(elbo_qstar_hat, elbo_qstar, atol=0.1)
    chex.assert_trees_all_close(log_px_hat, log_px, atol=0.03)
    # The ordering log p^ >= L[q*] >= L[q], and a positive approximation gap on this model.
    self.assertTrue(np.all(log_px_hat > elbo_qstar_hat))
    self.assertTrue(np.all(elbo_qstar_hat > elbo_hat + 0.5))
    self.assertTrue(np.all(log_px - elbo_qstar > 0.05))
    self.assertTrue(np.all(q.steps % gaps.QStarSettings().check_every == 0))

  @pytest.mark.slow   # the rule is also checked on every run of test_gaps_cli
  def test_doubling_the_budget_moves_the_mean_by_less_than_the_tolerance(self):
    w, b, x = _model()
    mean, log_var = _encoder_output(*_exact(w, b, x)[:2])

    def value(settings):
      def one(ll, m, v, key):
        opt_key, final_key = jax.random.split(key)
        q = gaps.optimize_gaussian(ll, m, v, opt_key, settings)
        return gaps.elbo_estimate(ll, q.mean, q.log_var, final_key, 5000), q.steps
      return jax.jit(lambda *a: _per_example(one, w, b, x, *a))(mean, log_var, _keys(2))

    # The cpu tier's faster search (Adam 1e-2, checks every 50 steps, patience 5).
    settings = gaps.QStarSettings(learning_rate=1e-2, check_every=50, patience=5)
    base, base_steps = value(settings)
    longer, longer_steps = value(settings.doubled())
    self.assertTrue(np.all(longer_steps >= base_steps))
    self.assertLess(abs(float(jnp.mean(longer - base))), gaps.CONVERGENCE_TOLERANCE)

  def test_search_stops_at_max_steps_and_never_ends_worse_than_its_start_on_the_check(self):
    w, b, x = _model()
    mean, log_var = _encoder_output(*_exact(w, b, x)[:2])
    settings = gaps.QStarSettings(check_every=7, max_steps=20, patience=100)
    q = jax.jit(lambda *a: _per_example(
        lambda ll, m, v, k: gaps.optimize_gaussian(ll, m, v, k, settings), w, b, x, *a))(
            mean, log_var, _keys(3))
    np.testing.assert_array_equal(q.steps, 21)   # 20 rounded up to whole checks of 7
    start = _per_example(
        lambda ll, m, v, k: gaps.elbo_estimate(ll, m, v, jax.random.split(k)[1], 100),
        w, b, x, mean, log_var, _keys(3))
    self.assertTrue(np.all(q.check_value >= start))


  def test_python_driven_search_gives_the_jitted_search(self):
    w, b, x = _model()
    mean, log_var = _encoder_output(*_exact(w, b, x)[:2])
    settings = gaps.QStarSettings(learning_rate=1e-2, check_every=10, patience=2)
    keys = _keys(5)
    jitted = jax.jit(lambda *a: _per_example(
        lambda ll, m, v, k: gaps.optimize_gaussian(ll, m, v, k, settings), w, b, x, *a))(
            mean, log_var, keys)
    batched = lambda fn: jax.jit(lambda *a: _per_example(fn, w, b, x, *a))
    search = batched(lambda ll, m, v, k: gaps.start_search(ll, m, v, k, settings))(
        mean, log_var, keys)
    step = batched(lambda ll, s: gaps.search_step(ll, s, settings))
    check = batched(lambda ll, s: gaps.search_check(ll, s, settings))
    search = gaps.drive_search(step, check, search, settings.check_every)
    driven = gaps.search_result(search)
    self.assertGreater(len(set(np.asarray(driven.steps).tolist())), 1)   # examples stop apart
    np.testing.assert_array_equal(driven.steps, jitted.steps)
    chex.assert_trees_all_close(driven, jitted, atol=1e-5)


class RefineTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_refinement_climbs_towards_qstar_in_expectation(self):
    # A better-conditioned model (W halved: curvature ~7 rather than ~25), on which SA-VAE's
    # step size is stable; 32 independent runs per example estimate the expected ELBO.
    w, b, x = _model()
    w = 0.5 * w
    post_mean, qstar_log_var, elbo_qstar, _ = _exact(w, b, x)
    mean, log_var = _encoder_output(post_mean, qstar_log_var)
    steps = (0, 1, 5, 20, 100, 1000)

    def runs(ll, m, v, key):
      return jax.vmap(lambda k: gaps.refine(ll, m, v, k, steps))(jax.random.split(key, 32))
    refined = self.variant(lambda *a: _per_example(runs, w, b, x, *a))(mean, log_var, _keys(4))
    chex.assert_shape((refined.mean, refined.log_var), (N, 32, len(steps), K))
    chex.assert_trees_all_close((refined.mean[:, 0, 0], refined.log_var[:, 0, 0]),
                                (mean, log_var))
    curve = jnp.mean(_exact_elbo(w, b, x[:, None, None], refined.mean, refined.log_var), 1)
    gap = elbo_qstar[:, None] - curve          # [N, C]
    mean_gap = jnp.mean(gap, 0)
    # The expected ELBO rises with K until one-sample SGD at a constant step size reaches its
    # noise floor (~0.12 nats below L[q*] here), and never passes L[q*].
    self.assertTrue(np.all(np.diff(mean_gap[:5]) < 0), mean_gap)
    self.assertLess(float(mean_gap[-1]), float(mean_gap[-2]) + 0.02)
    self.assertTrue(np.all(gap >= 0))
    self.assertLess(float(mean_gap[-1]), 0.2 * float(mean_gap[0]))
    self.assertLess(float(mean_gap[-1]), 0.15)

  def test_python_driven_refinement_gives_the_jitted_refinement(self):
    w, b, x = _model()
    mean, log_var = _encoder_output(*_exact(w, b, x)[:2])
    steps, keys = (0, 3, 10), _keys(6)
    jitted = jax.jit(lambda *a: _per_example(
        lambda ll, m, v, k: gaps.refine(ll, m, v, k, steps), w, b, x, *a))(mean, log_var, keys)
    start = jax.vmap(gaps.start_refinement)(mean, log_var, keys)
    step = jax.jit(lambda r: _per_example(gaps.refinement_step, w, b, x, r))
    driven = gaps.drive_refinement(step, start, steps)
    chex.assert_shape(driven.mean, (N, len(steps), K))
    chex.assert_trees_all_close(driven, jitted, atol=1e-5)

  def test_default_settings_are_sa_vae_per_example(self):
    settings = gaps.RefineSettings()
    self.assertAlmostEqual(settings.learning_rate, 1 / 50)
    self.assertAlmostEqual(settings.max_grad_norm, 5 * 50**0.5)
    self.assertEqual((settings.momentum, settings.samples_per_step), (0.5, 1))


@pytest.mark.parametrize("call, message", [
    (lambda: gaps.QStarSettings(patience=0).validate(), "QStarSettings.patience"),
    (lambda: gaps.QStarSettings(check_samples=150, sample_chunk=100).validate(),
     "QStarSettings.check_samples=150 must be a multiple of sample_chunk=100"),
    (lambda: gaps.RefineSettings(momentum=1.0).validate(), "RefineSettings.momentum"),
    (lambda: gaps.elbo_estimate(lambda z: z[:, 0], jnp.zeros(2), jnp.zeros(2),
                                jax.random.PRNGKey(0), 250, 100), "num_samples=250"),
    (lambda: gaps.refine(lambda z: z[:, 0], jnp.zeros(2), jnp.zeros(2), jax.random.PRNGKey(0),
                         steps=(-1, 5)), "steps must be non-negative"),
])
def test_bad_arguments_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_measurements_match_the_closed_forms_and_do_not_depend_on_the_chunk():
  # gaps.Measurements on the linear-Gaussian model: q* and its ELBO and log p^ as the
  # per-example functions give them, the padding examples not searched, and each example's
  # results from its own key alone (a chunk of the last two gives their values in the four).
  w, b, x = _model()
  post_mean, qstar_log_var, elbo_qstar, log_px = _exact(w, b, x)
  mean, log_var = _encoder_output(post_mean, qstar_log_var)
  measure = gaps.Measurements(
      lambda params, x_i: _log_likelihood_fn(params["w"], params["b"], x_i),
      gaps.QStarSettings(learning_rate=1e-2, check_every=50, patience=5),
      gaps.RefineSettings(), refine_steps=(1, 10), final_samples=2000, iwae_samples=2000,
      refine_eval_samples=200, sample_chunk=500)
  decoder, keys = {"w": w, "b": b}, _keys(8)
  q = measure.optimal_gaussian(decoder, x, mean, log_var, keys, count=N - 1)
  assert int(q.steps[-1]) == 0   # the last example counts as padding: never searched
  chex.assert_trees_all_close(_exact_elbo(w, b, x, q.mean, q.log_var)[:-1], elbo_qstar[:-1],
                              atol=0.02)
  chex.assert_trees_all_close(measure.log_px(decoder, x, q.mean, q.log_var, keys)[:-1],
                              log_px[:-1], atol=0.05)
  chex.assert_trees_all_close(measure.elbo(decoder, x, mean, log_var, keys),
                              _exact_elbo(w, b, x, mean, log_var), atol=0.2)
  refined = measure.refine(decoder, x, mean, log_var, keys)
  chex.assert_shape(refined.mean, (N, 3, K))
  curve = measure.refine_eval(decoder, x, refined.mean, refined.log_var, keys)
  chex.assert_shape(curve, (N, 3))
  tail = measure.refine_eval(decoder, x[2:], refined.mean[2:], refined.log_var[2:], keys[2:])
  chex.assert_trees_all_close(tail, curve[2:], atol=1e-4)


def _summary(per_seed):
  return {"mean": None if None in per_seed else sum(per_seed) / len(per_seed),
          "std": None, "per_seed": per_seed}


def test_steps_to_reach_interpolates_between_the_recorded_steps():
  steps = [0, 1, 5, 20]
  curve = [_summary(v) for v in ([-10.0, -12.0], [-9.0, None], [-5.0, -8.0], [-4.0, -7.0])]
  target = _summary([-7.0, -7.5])
  exact = gaps.steps_to_reach(steps, curve, target)
  assert exact == {"per_seed": [5, 20], "of_the_means": 5}   # the means skip K = 1 (None)
  interpolated = gaps.steps_to_reach(steps, curve, target, interpolate=True)
  assert interpolated["per_seed"] == [pytest.approx(1 + 4 * 2 / 4), pytest.approx(5 + 15 * 0.5)]
  assert gaps.steps_to_reach(steps, curve, _summary([-10.0, -20.0]),
                             interpolate=True)["per_seed"] == [0.0, 0.0]
  assert gaps.steps_to_reach(steps, curve, _summary([-1.0, None]))["per_seed"] == [None, None]


def test_tune_refinement_runs_every_candidate_within_the_budget_and_picks_the_best_finite():
  candidates = gaps.refinement_candidates(200)
  assert len(candidates) == (len(gaps.TUNE_SGD_FACTORS) + len(gaps.TUNE_ADAM_RATES)) * 3
  assert all(steps == max(1, 200 // (2 * s.samples_per_step)) for s, steps in candidates)
  assert {s.optimizer for s, _ in candidates} == {"sgd", "adam"}
  sa_vae = gaps.RefineSettings()
  assert all(s.momentum == sa_vae.momentum and s.max_grad_norm == sa_vae.max_grad_norm
             for s, _ in candidates)
  # A fake score: Adam at 1e-2 with 4 samples is best; SGD at 3x SA-VAE's step diverges.
  def elbo_after(settings, steps):
    if settings.optimizer == "sgd" and settings.learning_rate > sa_vae.learning_rate:
      return -100.0, float("nan")
    score = -90.0 + (5.0 if settings.optimizer == "adam" and settings.learning_rate == 1e-2
                     else 0.0)
    return -100.0, score + (1.0 if settings.samples_per_step == 4 else 0.0)
  seen = []
  tuning = gaps.tune_refinement(elbo_after, 200, on_candidate=seen.append)
  assert seen == tuning["candidates"] and len(seen) == len(candidates)
  assert tuning["chosen"]["optimizer"] == "adam" and tuning["chosen"]["learning_rate"] == 1e-2
  assert tuning["chosen"]["samples_per_step"] == 4 and tuning["chosen"]["steps"] == 25
  assert gaps.tune_refinement(lambda s, k: (-1.0, float("nan")), 200)["chosen"] is None
  with pytest.raises(ValueError, match="budget must be at least 2 decoder passes"):
    gaps.refinement_candidates(1)
