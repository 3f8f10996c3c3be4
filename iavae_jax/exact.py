"""Exact evaluation on the synthetic oracle model, whose posterior is known (paper section 4.1).

``true_posterior`` gives the truth on a data set: log p(x), the MAP and the local Gaussian by
quadrature (``posterior``), and q*, the best Gaussian, by per-example Newton on the exact ELBO.
``evaluate`` measures a population of encoders in closed form (ELBO, KL, d_MAP, r_MAP, the
amortization gap); ``table3_entry`` is a row of the paper's Table 3, ``table2`` its Table 2,
``efficiency_curve`` its Figure 7 and ``posterior_panels`` its Figure 6; ``gap_decomposition``
splits log p(x) into the ELBO, the approximation gap and the amortization gap, with the share of
each VAE's amortization gap its IA-VAEs close; ``tail_summary`` compares IA-VAEs with their VAE
point by point (quantiles, and bins by |x| and by the distance to the training data).
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import distributions, posterior, training
from iavae_jax.models import oracle

__all__ = ["Truth", "true_posterior", "evaluate", "over_models", "table3_entry", "table2",
           "efficiency_curve", "posterior_panels", "gap_decomposition", "TAIL_QUANTILES",
           "TAIL_BINS", "nearest_distance", "tail_summary"]


class Truth(NamedTuple):
  """The oracle's answers on one data set x [N, 3]: the true posterior and q*, per point."""
  summary: posterior.PosteriorSummary   # log p(x), z_MAP, Laplace precision (posterior.py)
  qstar_mean: jax.Array                  # [N, 2]
  qstar_log_var: jax.Array               # [N, 2]
  elbo_qstar: jax.Array                  # [N]  the ELBO of q*


def true_posterior(x, sigma: float) -> Truth:
  """log p(x), the MAP and the local Gaussian by quadrature, and q* by per-example Newton on
  the exact ELBO from the Laplace diagonal: for the training data and the held-out data alike."""
  summary = jax.jit(lambda x: posterior.summarize(x, sigma),
                    compiler_options=training.cpu_compiler_options())(x)
  init_mean, init_log_var = posterior.laplace_diagonal_init(summary)
  qstar_mean, qstar_log_var = jax.jit(jax.vmap(
      lambda xi, m, lv: posterior.optimal_gaussian(xi, sigma, m, lv)))(
          x, init_mean, init_log_var)
  return Truth(summary, qstar_mean, qstar_log_var,
               oracle.exact_elbo(x, qstar_mean, qstar_log_var, sigma))


@functools.partial(jax.jit, static_argnums=(0,))
def evaluate(encode: Callable, params, frozen, x: jax.Array, sigma: float,
             summary: posterior.PosteriorSummary, elbo_qstar: jax.Array):
  """A population of M encoders on the oracle's data x [N, 3], in closed form.

  Args:
    encode: encode(params, frozen, x [N, 3]) -> (mean [N, 2], log_var [N, 2]) for one model.
    params: the models' parameters, a leading axis M on every leaf; frozen: their frozen inputs
      (None, or a leading axis M), as encode takes them.
    x, sigma: the data and the oracle's noise scale.
    summary, elbo_qstar: the truth on x (``true_posterior``).

  Returns:
    ({"elbo", "kl", "d_map", "r_map", "amortization_gap", "max_excess_over_qstar"}, each [M]
    averaged over the data (the last its maximum), means [M, N, 2], per-point ELBOs [M, N]).
  """
  mean, log_var = jax.vmap(encode, in_axes=(0, 0, None))(params, frozen, x)
  elbo = oracle.exact_elbo(x, mean, log_var, sigma)
  return {
      "elbo": elbo.mean(-1),
      "kl": distributions.kl_to_standard_normal(mean, log_var).mean(-1),
      "d_map": posterior.d_map(mean, summary.z_map, summary.precision).mean(-1),
      "r_map": posterior.r_map(oracle.log_joint(mean, x, sigma), summary.log_joint_map).mean(-1),
      "amortization_gap": (elbo_qstar - elbo).mean(-1),
      "max_excess_over_qstar": (elbo - elbo_qstar).max(-1),
  }, mean, elbo


def over_models(values) -> dict:
  """{"mean", "std"} of per-model values (std with ddof=1; 0.0 for one model)."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1
          else 0.0}


_TABLE_METRICS = ("elbo", "kl", "d_map", "r_map")


def table3_entry(evaluation: dict) -> dict:
  """A Table 3 row: mean and std over models of each model's mean over the data."""
  entry = {}
  for k in _TABLE_METRICS:
    stats = over_models(evaluation[k])
    entry[k], entry[f"{k}_std"] = stats["mean"], stats["std"]
  entry["elbo_median"] = float(np.median(np.asarray(evaluation["elbo"], np.float64)))
  entry["num_models"] = int(evaluation["elbo"].size)
  return entry


def table2(vae_eval: dict, iavae_eval: dict, vae_best_epoch, iavae_best_epoch) -> list:
  """Table 2: a row per VAE, its metrics and best epoch, and the mean and std over its IA-VAEs
  (``evaluate``'s NumPy metrics and the best epochs [V] and [V * S], VAE-major)."""
  num_vaes = len(vae_eval["elbo"])
  grid = {k: np.asarray(iavae_eval[k]).reshape(num_vaes, -1) for k in _TABLE_METRICS}
  epochs = np.asarray(iavae_best_epoch).reshape(num_vaes, -1)
  rows = []
  for v in range(num_vaes):
    row = {"vae_seed": v, "vae": {k: float(vae_eval[k][v]) for k in _TABLE_METRICS},
           "iavae": {}}
    row["vae"]["best_epoch"] = int(np.asarray(vae_best_epoch)[v])
    for k in _TABLE_METRICS:
      stats = over_models(grid[k][v])
      row["iavae"][f"{k}_mean"], row["iavae"][f"{k}_std"] = stats["mean"], stats["std"]
    row["iavae"]["elbo_per_seed"] = grid["elbo"][v].tolist()
    row["iavae"]["best_epoch_per_seed"] = epochs[v].tolist()
    rows.append(row)
  return rows


def efficiency_curve(widths, sweep_elbo, iavae_elbo,
                     params_of_width: Callable[[int], int]) -> dict:
  """Figure 7: the mean ELBO of the VAEs of each width (``sweep_elbo`` [W * S], width-major)
  against their parameters, the IA-VAEs' (``iavae_elbo`` [M]), and the smallest width whose
  VAEs reach it on average."""
  per_width = np.asarray(sweep_elbo).reshape(len(widths), -1)
  curve = []
  for w, elbo in zip(widths, per_width):
    stats = over_models(elbo)
    curve.append({"width": w, "params": params_of_width(w), "elbo": stats["mean"],
                  "elbo_std": stats["std"], "elbo_per_seed": elbo.tolist()})
  iavae = over_models(iavae_elbo)
  matching = [c for c in curve if c["elbo"] >= iavae["mean"]]
  return {"iavae_elbo": iavae["mean"], "iavae_elbo_std": iavae["std"], "vae_curve": curve,
          "smallest_matching_width": matching[0]["width"] if matching else None,
          "smallest_matching_params": matching[0]["params"] if matching else None}


def posterior_panels(data, summary: posterior.PosteriorSummary, vae_means, iavae_means,
                     sigma: float, examples) -> list[dict]:
  """Figure 6's panels (``plots.posterior_figure``): for each of ``examples`` of the synthetic
  data, the true posterior's density on a grid around its MAP, the latent that drew x, the MAP
  and the means of the first VAE and IA-VAE (``vae_means``, ``iavae_means`` [M, N, 2])."""
  panels = []
  for i in examples:
    center = np.asarray(summary.z_map[i])
    points = np.stack([np.asarray(data.z_true[i]), np.asarray(vae_means[0, i]),
                       np.asarray(iavae_means[0, i])])
    half = max(0.4, 1.25 * float(np.abs(points - center).max()))
    z1 = np.linspace(center[0] - half, center[0] + half, 241)
    z2 = np.linspace(center[1] - half, center[1] + half, 241)
    grid = jnp.stack(jnp.meshgrid(z1, z2, indexing="ij"), -1)
    density = np.exp(np.asarray(oracle.log_joint(grid, data.x[i], sigma) - summary.log_px[i]))
    panels.append({
        "z1": z1, "z2": z2, "density": density, "z_true": np.asarray(data.z_true[i]),
        "z_map": center, "mu_vae": np.asarray(vae_means[0, i]),
        "mu_iavae": np.asarray(iavae_means[0, i]), "precision": np.asarray(summary.precision[i]),
        "title": f"example {i}: x = ({', '.join(f'{v:.2f}' for v in np.asarray(data.x[i]))})"})
  return panels


def gap_decomposition(truth: Truth, vae_eval: dict, iavae_eval: dict,
                      num_iavae_seeds: int) -> dict:
  """log p(x) = ELBO + approximation gap (log p(x) - L[q*]) + amortization gap (L[q*] - ELBO),
  per model averaged over the data, and the share of each VAE's amortization gap its IA-VAEs
  close. The evaluations are NumPy copies of ``evaluate``'s metrics on the data of ``truth``:
  V VAEs, and num_iavae_seeds IA-VAEs on each (V * num_iavae_seeds, VAE-major)."""
  log_px = np.asarray(truth.summary.log_px)
  elbo_qstar = np.asarray(truth.elbo_qstar)
  approximation_gap = float((log_px - elbo_qstar).mean())

  def gap_entry(evaluation):
    amortization = over_models(evaluation["amortization_gap"])
    total = over_models(log_px.mean() - evaluation["elbo"])
    return {"amortization_gap": amortization["mean"], "amortization_gap_std": amortization["std"],
            "approximation_gap": approximation_gap,
            "total_gap": total["mean"], "total_gap_std": total["std"],
            "max_excess_over_qstar": float(evaluation["max_excess_over_qstar"].max())}

  # Per VAE seed: the share of that VAE's amortization gap its IA-VAEs close, then averaged.
  closed = 1.0 - (iavae_eval["amortization_gap"].reshape(-1, num_iavae_seeds).mean(1)
                  / vae_eval["amortization_gap"])
  return {
      "log_px": float(log_px.mean()),
      "elbo_qstar": float(elbo_qstar.mean()),
      "kl_qstar": float(np.asarray(distributions.kl_to_standard_normal(
          truth.qstar_mean, truth.qstar_log_var)).mean()),
      "elbo_qstar_minus_log_px_max": float((elbo_qstar - log_px).max()),
      "vae": gap_entry(vae_eval),
      "iavae": gap_entry(iavae_eval),
      "fraction_of_vae_amortization_gap_closed": over_models(closed)["mean"],
      "fraction_closed_per_vae_seed": closed.tolist(),
  }


# The tail analysis: quantiles of the per-point difference IA-VAE minus VAE, and bins of points
# by |x| (and, for held-out points, by distance to the nearest training point), as quantiles of
# that measure on the data at hand.
TAIL_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95)
TAIL_BINS = (0.0, 0.5, 0.9, 0.99, 1.0)


def nearest_distance(x, reference, chunk: int = 1024) -> np.ndarray:
  """Euclidean distance of each row of x [N, d] to its nearest row of reference [R, d]."""
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  return np.concatenate([
      np.sqrt(((part[:, None, :] - reference[None]) ** 2).sum(-1).min(1))
      for part in np.array_split(x, max(1, -(-len(x) // chunk)))])


def tail_summary(x, vae_elbo, iavae_elbo, elbo_qstar, train_x=None) -> dict:
  """How IA-VAE compares with its own VAE point by point, not only on average.

  vae_elbo [V, N] and iavae_elbo [V * S, N] (S IA-VAEs per VAE, row-major) are per-point
  ELBOs on x [N, 3]; diff[v, s, i] = IA-VAE (v, s) minus VAE v at point i, which is also the
  VAE's amortization gap at that point minus the IA-VAE's. Quantiles are pooled over the V * S
  pairs and the N points; "fraction_worse" is the share of (pair, point) with diff < 0. Bins
  group the points by |x| (``TAIL_BINS`` quantiles of |x| on x); with ``train_x``, also by the
  distance to the nearest training point.
  """
  x = np.asarray(x, np.float64)
  vae_elbo = np.asarray(vae_elbo, np.float64)
  iavae_elbo = np.asarray(iavae_elbo, np.float64).reshape(vae_elbo.shape[0], -1, x.shape[0])
  diff = iavae_elbo - vae_elbo[:, None, :]                       # [V, S, N]
  qstar = np.asarray(elbo_qstar, np.float64)

  def group(mask):
    d = diff[..., mask]
    return {"num_points": int(mask.sum()),
            "vae_elbo": float(vae_elbo[:, mask].mean()),
            "iavae_elbo": float(iavae_elbo[..., mask].mean()),
            "vae_amortization_gap": float((qstar[mask] - vae_elbo[:, mask]).mean()),
            "iavae_amortization_gap": float((qstar[mask] - iavae_elbo[..., mask]).mean()),
            "diff_mean": float(d.mean()), "diff_min": float(d.min()),
            "fraction_worse": float((d < 0).mean())}

  def bins(measure, name):
    edges = np.quantile(measure, TAIL_BINS)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
      mask = (measure >= lo) & ((measure < hi) if i < len(edges) - 2 else (measure <= hi))
      rows.append({"quantiles": [TAIL_BINS[i], TAIL_BINS[i + 1]],
                   name: [float(lo), float(hi)], **group(mask)})
    return rows

  norm = np.linalg.norm(x, axis=1)
  point_diff = diff.mean((0, 1))                                   # [N], over the pairs
  summary = {
      "diff_quantiles": {str(q): float(np.quantile(diff, q)) for q in TAIL_QUANTILES},
      "diff_min": float(diff.min()),
      "fraction_worse": float((diff < 0).mean()),
      "points_worse_on_average": float((point_diff < 0).mean()),
      # Spearman's rank correlation of each point's mean diff with |x|.
      "diff_norm_rank_correlation": float(np.corrcoef(
          np.argsort(np.argsort(point_diff)), np.argsort(np.argsort(norm)))[0, 1]),
      "by_norm": bins(norm, "norm"),
  }
  if train_x is not None:
    summary["by_distance_to_train"] = bins(nearest_distance(x, train_x), "distance")
  return summary
