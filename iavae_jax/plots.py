"""The paper's figures as matplotlib Figures (the caller saves them)."""

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["posterior_figure", "efficiency_figure", "reconstruction_figure",
           "learning_curves_figure", "refinement_figure", "passes_figure"]


def posterior_figure(panels: list[dict]):
  """Figure 6: one panel per observation.

  Each panel dict holds: z1, z2 ([n] grid axes), density ([n, n], indexed [i1, i2]), z_true,
  z_map, mu_vae, mu_iavae ([2] each), precision ([2, 2], the local Gaussian at z_map), title.
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
  for ax, p in zip(axes[0], panels):
    mesh = ax.pcolormesh(p["z1"], p["z2"], np.asarray(p["density"]).T, shading="auto",
                         cmap="magma")
    fig.colorbar(mesh, ax=ax, label="p(z | x)")
    zz1, zz2 = np.meshgrid(p["z1"], p["z2"], indexing="ij")
    diff = np.stack([zz1, zz2], -1) - np.asarray(p["z_map"])
    mahalanobis_sq = np.einsum("...i,ij,...j->...", diff, np.asarray(p["precision"]), diff)
    ax.contour(zz1, zz2, mahalanobis_sq, levels=[1.0, 4.0, 9.0], colors="cyan",
               linewidths=0.8, linestyles="--")
    ax.plot(*p["z_true"], "^", color="red", ms=9, label=r"$z_{true}$")
    ax.plot(*p["z_map"], "*", color="white", ms=13, mec="black", label=r"$z_{MAP}$")
    ax.plot(*p["mu_vae"], "x", color="orange", ms=10, mew=2.5, label=r"$\mu_{VAE}$")
    ax.plot(*p["mu_iavae"], "x", color="deepskyblue", ms=10, mew=2.5, label=r"$\mu_{IA-VAE}$")
    ax.set_xlabel(r"$z_1$")
    ax.set_ylabel(r"$z_2$")
    ax.set_title(p["title"], fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
  fig.suptitle("True posterior; dashed: local (Laplace) Gaussian at 1, 2, 3 sd", fontsize=10)
  fig.tight_layout()
  return fig


def efficiency_figure(params: list[int], elbo_mean: list[float], elbo_std: list[float],
                      iavae_params: int, iavae_elbo: float, iavae_elbo_std: float):
  """Figure 7: ELBO of VAEs against encoder parameter count, with the IA-VAE marked."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  ax.errorbar(params, elbo_mean, yerr=elbo_std, marker="o", capsize=3, label="VAE (width sweep)")
  ax.axhline(iavae_elbo, color="red", lw=1.2, label=f"IA-VAE ({iavae_params} parameters)")
  ax.axhspan(iavae_elbo - iavae_elbo_std, iavae_elbo + iavae_elbo_std, color="red", alpha=0.12)
  ax.plot([iavae_params], [iavae_elbo], "D", color="red")
  ax.set_xlabel("inference parameters")
  ax.set_ylabel("ELBO (mean over data)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def reconstruction_figure(originals: np.ndarray, reconstructions: dict, title: str):
  """Figure 8: originals [n, H, W] in the top row, then one row per model of reconstructions
  (reconstructions: {model name: [n, H, W]})."""
  rows = [("original", originals)] + list(reconstructions.items())
  n = originals.shape[0]
  fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.1 * len(rows) + 0.4),
                           squeeze=False)
  for r, (name, imgs) in enumerate(rows):
    for c in range(n):
      ax = axes[r, c]
      ax.imshow(np.asarray(imgs[c]), cmap="gray_r", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_ylabel(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def learning_curves_figure(curves: dict, title: str):
  """Learning curves: a row per stage kind, a column per metric against the epoch, a line per
  model (curves: {kind: {"epoch": [E], metric: [E, models]}}, NaN where a model did not train;
  the metrics drawn are train_loss, valid_elbo, train_kl and grad_norm, the last on a log
  scale)."""
  columns = (("train_loss", "training loss (mean over the epoch)"),
             ("valid_elbo", "monitored ELBO (after the epoch)"),
             ("train_kl", "KL (mean over the epoch)"),
             ("grad_norm", "gradient norm (mean over the epoch)"))
  fig, axes = plt.subplots(len(curves), len(columns), figsize=(4.2 * len(columns),
                                                               2.8 * len(curves) + 0.5),
                           squeeze=False)
  for r, (kind, curve) in enumerate(curves.items()):
    for c, (key, label) in enumerate(columns):
      ax = axes[r, c]
      values = np.asarray(curve[key])
      alpha = max(0.15, 1.0 / np.sqrt(values.shape[1]))
      ax.plot(curve["epoch"], values, color="tab:blue", alpha=alpha, lw=1.0,
              marker="o" if len(curve["epoch"]) < 5 else None, ms=3)
      if key == "grad_norm":
        ax.set_yscale("log")
      if r == 0:
        ax.set_title(label, fontsize=9)
      if c == 0:
        ax.set_ylabel(kind, fontsize=10)
      ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
      ax.set_xlabel("epoch", fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def refinement_figure(curves: dict, title: str):
  """Test-time refinement: ELBO against refinement steps K and against wall time per example.
  curves: {model name: (steps [C], seconds per example [C], elbo mean [C], elbo std [C])}."""
  fig, (by_steps, by_time) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
  for name, (steps, seconds, elbo, std) in curves.items():
    line = by_steps.errorbar(steps, elbo, yerr=std, marker="o", capsize=3, label=name)
    by_time.plot(1e3 * np.asarray(seconds), elbo, marker="o", color=line[0].get_color(),
                 label=name)
    for k, t, e in zip(steps, seconds, elbo):
      by_time.annotate(f"K={k}", (1e3 * t, e), fontsize=6, xytext=(3, -8),
                       textcoords="offset points")
  by_steps.set_xscale("symlog", linthresh=1)
  by_steps.set_xlabel("refinement steps K")
  by_steps.set_ylabel("test ELBO (mean over seeds)")
  by_time.set_xscale("log")
  by_time.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  by_time.set_xlabel("wall time per example (ms): encoder pass + K steps")
  for ax in (by_steps, by_time):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def passes_figure(curves: dict, points: dict, title: str):
  """ELBO against decoder passes per example (a forward or backward pass of one sample each):
  curves {label: (passes [C], elbo [C])} as lines (iterative inference, e.g. refinement),
  points {label: (passes, elbo)} as markers (amortized models; 0 passes for one encoder pass)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, (passes, elbo) in curves.items():
    ax.plot(passes, elbo, marker=".", label=label)
  for index, (label, (passes, elbo)) in enumerate(points.items()):
    ax.scatter([passes], [elbo], marker="os^vD<>p*hX"[index % 11], s=50, zorder=3, label=label)
  ax.set_xscale("symlog", linthresh=1)
  ax.set_xlabel("decoder passes per example")
  ax.set_ylabel("test ELBO (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig
