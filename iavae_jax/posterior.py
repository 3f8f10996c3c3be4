"""The true posterior of the synthetic model, known up to a constant, and measures against it.

For one observation x (3-d) the posterior p(z | x) over the 2-d latent is evaluated on a square
grid centred on (x1, x2): the first two coordinates observe z1 and z2 directly with noise sigma,
so outside a box of half-width 7.5 sigma the integrand is below exp(-28) of its peak. On that
grid (the machinery takes any 2-d log p(x, z), which the tests use on a linear-Gaussian model):

- log p(x) by quadrature (a Riemann sum: for a smooth integrand that decays inside the box its
  error falls like exp(-2 pi^2 (s / h)^2), s the posterior's smallest scale, h the spacing);
- z_MAP: the best grid point (robust to bimodal posteriors), refined by safeguarded Newton;
- the local Gaussian: Laplace at z_MAP, precision = -Hessian of log p(x, z) there.

d_MAP is the Mahalanobis distance of a mean mu from z_MAP under that precision, and
r_MAP = p(mu | x) / p(z_MAP | x) = exp(log p(x, mu) - log p(x, z_MAP)) under the true posterior.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from iavae_jax.models import oracle

__all__ = ["PosteriorSummary", "newton_maximize", "latent_grid", "summarize_one", "summarize",
           "d_map", "r_map", "optimal_gaussian", "laplace_diagonal_init"]


class PosteriorSummary(NamedTuple):
  log_px: jax.Array         # [...]        log p(x) by quadrature
  z_map: jax.Array          # [..., 2]     the MAP of p(z | x)
  log_joint_map: jax.Array  # [...]        log p(x, z_MAP)
  precision: jax.Array      # [..., 2, 2]  -Hessian of log p(x, z) at z_MAP (Laplace)


def newton_maximize(f: Callable[[jax.Array], jax.Array], theta0: jax.Array,
                    num_steps: int = 20) -> jax.Array:
  """Maximises a smooth f: [n] -> scalar from theta0 by damped Newton with a step-size search.

  The Hessian is shifted to be negative definite (Levenberg style), so each direction ascends;
  of the steps {1, 1/2, ..., 1/32, 0} the best is taken, so f never decreases.
  """
  steps = jnp.array([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0])

  def newton_step(theta, _):
    g = jax.grad(f)(theta)
    neg_h = -jax.hessian(f)(theta)
    shift = jnp.maximum(0.0, 1e-6 - jnp.linalg.eigvalsh(neg_h)[0])
    direction = jnp.linalg.solve(neg_h + shift * jnp.eye(theta.shape[0]), g)
    candidates = theta + steps[:, None] * direction
    values = jax.vmap(f)(candidates)
    values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
    return candidates[jnp.argmax(values)], None

  theta, _ = jax.lax.scan(newton_step, theta0, None, length=num_steps)
  return theta


def latent_grid(center: jax.Array, scale: float, half_width: float = 7.5,
                spacing: float = 0.1) -> tuple[jax.Array, float]:
  """A square quadrature grid: [n*n, 2] points around center, and the cell area.

  half_width and spacing are in units of scale (for the oracle: sigma).
  """
  n = 2 * round(half_width / spacing) + 1
  offsets = jnp.linspace(-half_width * scale, half_width * scale, n)
  u, v = jnp.meshgrid(offsets, offsets, indexing="ij")
  points = center + jnp.stack([u.ravel(), v.ravel()], axis=-1)
  return points, (spacing * scale) ** 2


def summarize_one(log_joint: Callable[[jax.Array], jax.Array], center: jax.Array, scale: float,
                  half_width: float = 7.5, spacing: float = 0.1) -> PosteriorSummary:
  """Quadrature log p(x), MAP and Laplace precision of a 2-d posterior given log p(x, z).

  log_joint: z [..., 2] -> [...]; the posterior's mass must lie inside the grid.
  """
  points, cell_area = latent_grid(center, scale, half_width, spacing)
  values = log_joint(points)
  log_px = jax.nn.logsumexp(values) + jnp.log(cell_area)
  z_map = newton_maximize(log_joint, points[jnp.argmax(values)])
  precision = -jax.hessian(log_joint)(z_map)
  return PosteriorSummary(log_px, z_map, log_joint(z_map), precision)


def summarize(x: jax.Array, sigma: float, half_width: float = 7.5, spacing: float = 0.1,
              chunk_size: int = 64) -> PosteriorSummary:
  """The oracle posterior of every x: [N, 3], on grids centred at (x1, x2) with scale sigma,
  in chunks to bound memory ([chunk, n*n] grid values)."""
  def one(xi):
    return summarize_one(lambda z: oracle.log_joint(z, xi, sigma), xi[:2], sigma, half_width,
                         spacing)
  return jax.lax.map(one, x, batch_size=chunk_size)


def d_map(mean: jax.Array, z_map: jax.Array, precision: jax.Array) -> jax.Array:
  """Mahalanobis distance sqrt((mu - z_MAP)^T P (mu - z_MAP)). [..., 2] -> [...]."""
  diff = mean - z_map
  return jnp.sqrt(jnp.maximum(jnp.einsum("...i,...ij,...j->...", diff, precision, diff), 0.0))


def r_map(log_joint_mean: jax.Array, log_joint_map: jax.Array) -> jax.Array:
  """p(mu | x) / p(z_MAP | x) = exp(log p(x, mu) - log p(x, z_MAP)): the normaliser cancels."""
  return jnp.exp(log_joint_mean - log_joint_map)


def optimal_gaussian(x: jax.Array, sigma: float, init_mean: jax.Array, init_log_var: jax.Array,
                     num_steps: int = 30) -> tuple[jax.Array, jax.Array]:
  """q*: the diagonal Gaussian maximising the exact ELBO for one x, by Newton from an init.

  Returns (mean [2], log_var [2]). Its ELBO bounds every amortised encoder's from above; the
  difference is the amortization gap, and log p(x) - ELBO(q*) the approximation gap.
  """
  elbo = lambda theta: oracle.exact_elbo(x, theta[:2], theta[2:], sigma)
  theta = newton_maximize(elbo, jnp.concatenate([init_mean, init_log_var]), num_steps)
  return theta[:2], theta[2:]


def laplace_diagonal_init(summary: PosteriorSummary) -> tuple[jax.Array, jax.Array]:
  """A mean-field start for q*: mean z_MAP, variances 1 / diag(precision). [..., 2] each."""
  diag = jnp.diagonal(summary.precision, axis1=-2, axis2=-1)
  return summary.z_map, -jnp.log(jnp.maximum(diag, 1e-12))
