"""The paper's figures as matplotlib Figures (the caller saves them)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
