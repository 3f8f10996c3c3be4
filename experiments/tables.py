"""Every Markdown table the experiments write, each a pure function of the dictionary its
command writes as JSON beside it: ``table4`` (experiments.report), ``designs``
(experiments.designs), ``image_run`` and ``synthetic`` (the results.md of experiments.images and
experiments.synthetic), ``comparison`` (experiments.compare, which prints it or its dictionary);
and the cells they share. gaps.md is ``gap_runs.markdown``'s."""

import math

from experiments import configs
from iavae_jax import runs, stats
from iavae_jax.stats import format_p, format_share, format_summary, format_test

DISPLAY_NAMES = {"omniglot": "OMNIGLOT", "mnist": "MNIST", "fashion_mnist": "Fashion MNIST"}

def _wall_time(seconds) -> str:
  if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
    return "—"
  if seconds < 60:
    return f"{seconds:.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _data_set(name: str, row: dict) -> str:
  """The data set's name, with a dagger when its run was not on the paper's split."""
  return DISPLAY_NAMES.get(name, name) + (" †" if row.get("paper_split") is False else "")


def _difference(entry: dict, key: str) -> list[str]:
  if key not in entry:
    return ["—", "—"]
  return [f"{entry[key]['mean_difference']:+.2f}", format_p(entry[key])]


def _steps(value: float | None) -> str:
  return "—" if value is None else f"{value:.1f}"


def _plus_minus(entry: dict, key: str, digits: int) -> str:
  """entry[key] +- entry[key_std], as the synthetic experiment's results hold them."""
  return f"{entry[key]:.{digits}f} +- {entry[key + '_std']:.{digits}f}"


# Table 4 (experiments.report).

def table4(table: dict) -> str:
  """table4.md, from the table4.json dictionary of experiments.report."""
  models = configs.TABLE4_MODELS
  lines = ["# Table 4: test ELBO (mean ± std over seeds, higher is better)", ""]
  lines += runs.markdown_table(
      ["Data set", "VAE", "IA-VAE", "control", "p (IA-VAE > VAE)", "test",
       "p (IA-VAE > control)", "test", "seeds", "wall time"],
      [[_data_set(name, row)] + [format_summary(row[model]) for model in models]
       + [cell for key, _, _ in configs.COMPARISONS
          for cell in (format_p(row[key]), format_test(row[key]))]
       + [len(row["seeds"]), _wall_time(row["wall_seconds"])] for name, row in table.items()])
  lines += ["", "## Test KL and IWAE bound (mean ± std over seeds)", ""]
  lines += runs.markdown_table(
      ["Data set"] + [f"KL {configs.label(m)}" for m in models]
      + [f"IWAE {configs.label(m)}" for m in models],
      [[_data_set(name, row)] + [format_summary(row[model]["kl"]) for model in models]
       + [format_summary(row[model]["iwae"]) for model in models] for name, row in table.items()])
  lines += _table4_ablations(table)
  diverged = [f"{DISPLAY_NAMES.get(name, name)} {configs.label(m)} seeds "
              f"{row[m]['diverged_seeds']}" for name, row in table.items()
              for m in models + configs.ABLATIONS if m in row and row[m].get("diverged_seeds")]
  if diverged:
    lines += ["", "**Diverged** (no finite validation ELBO in any epoch, so the selected "
              "parameters are the initial ones and the test numbers are the starting point's): "
              + "; ".join(diverged) + "."]
  if any(row.get("paper_split") is False for row in table.values()):
    lines += ["", "† Not the paper's train/test split (OMNIGLOT: Burda et al.'s chardata.mat; "
              "MNIST, Fashion-MNIST: the standard test set): see each run's results.json "
              "\"data\"; these numbers do not compare with the paper's."]
  lines += ["", "Tests on test ELBO, paired by seed, H1: IA-VAE > the other model. "
            + stats.TESTS_NOTE, ""]
  return "\n".join(lines)


def _table4_ablations(table: dict) -> list[str]:
  """The ablations' test ELBO and their paired tests, for the data sets that ran any."""
  rows = [[_data_set(name, row), configs.label(model), format_summary(row[model]),
           configs.label(other), f"{row[key]['mean_difference']:+.2f}", format_p(row[key]),
           format_test(row[key])]
          for name, row in table.items() for key, model, other in configs.ABLATION_COMPARISONS
          if key in row]
  if not rows:
    return []
  return ["", "## Ablations: test ELBO, and the paired test of H1: model > the other", ""] + (
      runs.markdown_table(["Data set", "model", "test ELBO", "other", "mean difference",
                             "p (model > other)", "test"], rows))


# The designs side by side (experiments.designs).

def designs(table: dict) -> str:
  """designs.md, from the designs.json dictionary of experiments.designs."""
  lines = ["# Hypernetwork designs: the IA-VAE's test ELBO (mean ± std over seeds)", ""]
  lines += runs.markdown_table(
      ["Data set", "design", "IA-VAE", "validation ELBO", "vs control", "p", "vs mean input",
       "p", "vs paper", "p", "VAE gap closed", "seeds"],
      [[DISPLAY_NAMES.get(name, name), label, format_summary(entry["iavae"]),
        format_summary(entry["valid_elbo"])]
       + _difference(entry, "vs_control") + _difference(entry, "vs_mean_input")
       + _difference(entry, "vs_paper")
       + [format_share(entry["gap_closed"]), len(row["seeds"])]
       for name, row in table.items() for label, entry in row["designs"].items()])
  lines.append("")
  for name, row in table.items():
    lines.append(
        f"- {DISPLAY_NAMES.get(name, name)} (seeds {row['seeds']}): VAE "
        f"{format_summary(row['vae'])}"
        + (f", control {format_summary(row['control'])}" if "control" in row else "") + "; "
        + ("the same VAE in every run" if row["same_vae"] else
           "**the runs' VAEs differ** (other settings or machines): the paired tests compare "
           "different VAEs as well")
        + (f"; best on validation: {row['best_on_validation']}" if row["designs"] else "")
        + ".")
  lines += ["", "vs X: mean per-seed difference in test ELBO, and p of the one-sided paired "
            "test of H1: this design's IA-VAE > X (Shapiro-Wilk, then a t-test or Wilcoxon "
            f"signed-rank test; `*`: p < {stats.ALPHA}). Validation ELBO: the selected epoch's "
            "(the selection score, on held-out data). VAE gap closed: the IA-VAE's share of its "
            "VAE's amortization gap (experiments.gaps). std: sample standard deviation.", ""]
  lines += _designs_frozen(table)
  return "\n".join(lines)


def _designs_frozen(table: dict) -> list[str]:
  """designs.md's second table: the models on the VAE's frozen decoder."""
  rows = []
  for name, row in table.items():
    for label, entry in row["frozen_decoder"].items():
      for model, values in entry["models"].items():
        worth = values["worth_steps"] or {}
        tests = ([cell for key in configs.FROZEN_OTHERS for cell in _difference(entry, key)]
                 if model == configs.FROZEN_IAVAE else ["", ""] * 3)
        rows.append([DISPLAY_NAMES.get(name, name), label,
                     configs.label(model), format_summary(values["test_elbo"]),
                     values["decoder_passes"], format_share(values["gap_closed"]),
                     *(_steps(worth.get(key)) for key in ("sa_vae", "tuned")), *tests,
                     ("—" if values["longest_wait_steps"] is None else
                      f"{values['longest_wait_steps']} / {entry['patience_steps']}")
                     + (f"; {values['seeds_at_epoch_cap']} of {len(row['seeds'])} seeds at the "
                        "epoch cap" if values.get("seeds_at_epoch_cap") else ""),
                     "—" if values["lost_at_half_patience"] is None else
                     f"{values['lost_at_half_patience']:.2f}",
                     len(row["seeds"])])
  if not rows:
    return []
  return ["## With the decoder frozen (the VAE's): inference alone", "",
          *runs.markdown_table(
              ["Data set", "design", "model", "test ELBO", "decoder passes", "VAE gap closed",
               "worth SA-VAE steps", "worth tuned steps", "IA-VAE vs control", "p",
               "vs corrector", "p", "vs mean input", "p", "longest wait / patience (steps)",
               "lost at half the patience", "seeds"], rows),
          "", "Every model here has the VAE's decoder, so the gap closed and the refinement "
          "steps it is worth (the steps of the VAE's refinement, SA-VAE's or tuned, at which it "
          "reaches the model's ELBO: experiments.gaps, on its test images) measure inference "
          "alone. Decoder passes: per example, of the model's inference (the feedback's). "
          "Longest wait: the most optimiser steps any seed's training waited for a better "
          "validation ELBO, beside the patience it trained with; lost at half the patience: how "
          "much lower (mean over seeds, nats) the selected validation ELBO would have been with "
          "half that patience. A wait near the patience, or a loss far from 0, says a longer "
          "patience could still have found better epochs; a seed at the epoch cap ended its "
          "training with the patience not yet run out, its validation ELBO still rising.", ""]


def comparison(table: dict) -> str:
  """experiments.compare's table, from its dictionary."""
  first, seeds = table["rows"][0], len(table["seeds"])

  def versus(row: dict) -> list[str]:   # the first row's model against this one
    if "difference" not in row:
      return ["", "", ""]
    difference, p = _difference(row, "difference")
    return [difference, f"{row['ahead_in_seeds']} of {seeds}", p]

  lines = [f"# {first['model']} of {first['workdir']} against models on the same VAEs", "",
           f"{DISPLAY_NAMES.get(table['dataset'], table['dataset'])}, seeds "
           f"{', '.join(map(str, table['seeds']))}; "
           f"the VAE: {format_summary(table['vae'])} in every run.", ""]
  lines += runs.markdown_table(
      ["run", "model", "test ELBO", "VAE gap closed", "worth tuned steps", "difference",
       "ahead in", "p"],
      [[row["workdir"], row["model"], format_summary(row["test_elbo"]),
        format_share(row["gap_closed"]), _steps(row["worth_tuned_steps"]), *versus(row)]
       for row in table["rows"]])
  lines += ["", f"difference: the mean per-seed difference of {first['model']}'s test ELBO from "
            "the row's; ahead in: the seeds in which it is higher; p: the one-sided paired test "
            f"of H1: it is higher. {stats.TESTS_NOTE} VAE gap closed and worth tuned steps (the "
            "steps of the VAE's tuned refinement at which it reaches the model's ELBO): from the "
            "run's gaps.json (experiments.gaps); —: not measured there on these seeds, or (worth) "
            "not reached within the refinement's largest step count (its gaps.md says which)."]
  return "\n".join(lines)


# The runs' own results.md.

def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def image_run(results: dict) -> str:
  """results.md of experiments.images, from its results.json dictionary."""
  lines = [f"# {results['dataset']} ({results['tier']} tier): test metrics per seed", ""]
  lines += runs.markdown_table(
      ["seed", "model", "test ELBO", "test KL",
       f"IWAE bound (K={results['config']['iwae_samples']})", "valid ELBO (selection score)",
       "best epoch"],
      [[seed, stage] + [_number(results["models"][stage][key][i])
                        for key in ("test_elbo", "test_kl", "test_iwae", "valid_elbo")]
       + [results["models"][stage]["best_epoch"][i]]
       for i, seed in enumerate(results["seeds"]) for stage in results["models"]])
  resumed = results["resumed_stages"]
  lines += ["", f"Wall time {results['wall_seconds']:.1f} s"
            + (f" (this invocation; resumed from checkpoints: {', '.join(resumed)})"
               if resumed else "") + f". Data: {results['data']}.",
            f"Parameters: {results['parameters']}.", ""]
  return "\n".join(lines)


def synthetic(r: dict) -> str:
  """results.md of experiments.synthetic, from its results.json dictionary: the paper's tables,
  laid out as in the paper."""
  lines = ["# Synthetic oracle experiment", "",
           f"Wall time {r['wall_seconds']:.1f} s; stages (s): "
           + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items()), "",
           *([f"IA-VAE's hypernetwork sees --hypernet_input={r['config']['hypernet_input']}, "
              "not the paper's x.", ""] if r["config"].get("hypernet_input", "x") != "x" else []),
           "## Table 2: robustness to random initialisation", "",
           "ELBO (KL) per VAE seed; IA-VAE: mean +- std over "
           f"{r['config']['num_iavae_seeds']} seeds on that VAE's frozen encoder.", ""]
  lines += runs.markdown_table(["VAE seed", "VAE", "IA-VAE"], [
      [row["vae_seed"], f"{row['vae']['elbo']:.2f} ({row['vae']['kl']:.2f})",
       f"**{row['iavae']['elbo_mean']:.2f} +- {row['iavae']['elbo_std']:.2f}** "
       f"({row['iavae']['kl_mean']:.2f} +- {row['iavae']['kl_std']:.2f})"]
      for row in r["table2"]])
  t3 = r["table3"]
  lines += ["", "## Table 3: posterior accuracy", "",
            "Mean +- std over models (VAE: one per seed; IA-VAE: all seeds of all VAEs); each "
            "model's value is its average over the data. d_MAP: Mahalanobis distance of the "
            "inferred mean from z_MAP under the Laplace Gaussian; r_MAP = p(mu|x) / p(z_MAP|x).",
            ""]
  lines += runs.markdown_table(
      ["Method", "ELBO (up)", "ELBO, median over models", "KL", "d_MAP (down)", "r_MAP (up)"],
      [[name, _plus_minus(t3[key], "elbo", 2), f"{t3[key]['elbo_median']:.2f}",
        f"{t3[key]['kl']:.2f}",
        _plus_minus(t3[key], "d_map", 2), _plus_minus(t3[key], "r_map", 2)]
       for name, key in (("VAE", "vae"), ("IA-VAE", "iavae"))])
  eff = r["efficiency"]
  lines += ["", "## Figure 7: parameter efficiency", "",
            f"IA-VAE: {eff['iavae_params']} parameters (base {eff['base_params']} + hypernetwork "
            f"{eff['hypernet_params']}; plus {eff['embedding_params']} embedding values), ELBO "
            f"{eff['iavae_elbo']:.2f} +- {eff['iavae_elbo_std']:.2f}.", ""]
  lines += runs.markdown_table(["width", "parameters", "VAE ELBO"],
                                 [[c["width"], c["params"], _plus_minus(c, "elbo", 2)]
                                  for c in eff["vae_curve"]])
  match = eff["smallest_matching_width"]
  lines += ["", (f"Smallest width whose VAE matches the IA-VAE's mean ELBO: {match} "
                 f"({eff['smallest_matching_params']} parameters, "
                 f"{eff['smallest_matching_params'] / eff['iavae_params']:.2f}x the IA-VAE's)."
                 if match is not None else
                 "No width in the sweep matches the IA-VAE's mean ELBO.")]
  g = r["gaps"]
  lines += ["", "## Beyond the paper: the inference gap, exactly", "",
            f"log p(x) by quadrature: {g['log_px']:.4f}; ELBO of the per-example optimal Gaussian "
            f"q*: {g['elbo_qstar']:.4f} (KL {g['kl_qstar']:.2f}).", ""]
  lines += runs.markdown_table(
      ["Method", "total gap", "approximation gap", "amortization gap"],
      [[name, f"{g[key]['total_gap']:.3f}", f"{g[key]['approximation_gap']:.3f}",
        _plus_minus(g[key], "amortization_gap", 3)]
       for name, key in (("VAE", "vae"), ("IA-VAE", "iavae"))])
  lines += ["", f"IA-VAE closes {100 * g['fraction_of_vae_amortization_gap_closed']:.1f}% of its "
            "VAE's amortization gap (mean over VAE seeds).", ""]
  if "heldout" in r:
    lines += _synthetic_heldout(r)
  return "\n".join(lines)


def _synthetic_heldout(r: dict) -> list[str]:
  """Table 3 and the gaps on the training and the held-out data side by side, and the tail."""
  h, g, t3 = r["heldout"], r["gaps"], r["table3"]
  lines = ["## Beyond the paper: held-out data", "",
           f"{r['config']['num_examples']} new points from the same generator (another key), "
           "never trained on; the truth on them computed as on the training data.", ""]
  rows = []
  for name, key in (("VAE", "vae"), ("IA-VAE", "iavae")):
    for split, table, gaps in (("train", t3, g), ("held-out", h, h["gaps"])):
      rows.append([name, split, _plus_minus(table[key], "elbo", 2), f"{table[key]['kl']:.2f}",
                   _plus_minus(table[key], "d_map", 2), _plus_minus(table[key], "r_map", 2),
                   f"{gaps['log_px']:.3f}", f"{gaps[key]['approximation_gap']:.3f}",
                   _plus_minus(gaps[key], "amortization_gap", 3)])
  lines += runs.markdown_table(
      ["Method", "data", "ELBO (up)", "KL", "d_MAP (down)", "r_MAP (up)", "log p(x)",
       "approximation gap", "amortization gap"], rows)
  lines += ["", f"IA-VAE closes {100 * h['gaps']['fraction_of_vae_amortization_gap_closed']:.1f}%"
            f" of its VAE's amortization gap on held-out data "
            f"({100 * g['fraction_of_vae_amortization_gap_closed']:.1f}% on the training data).",
            "", "Per point: diff = IA-VAE's ELBO minus its own VAE's at that point (pooled over "
            "every IA-VAE and point); points binned by quantiles of |x|, and held-out points by "
            "distance to the nearest training point.", ""]
  quantiles = list(h["tail"]["diff_quantiles"])
  lines += runs.markdown_table(
      ["data", *[f"q{float(q) * 100:g}%" for q in quantiles], "min", "share worse"],
      [[split, *[f"{tail['diff_quantiles'][q]:.3f}" for q in quantiles],
        f"{tail['diff_min']:.3f}", f"{100 * tail['fraction_worse']:.2f}%"]
       for split, tail in (("train", h["train_tail"]), ("held-out", h["tail"]))])
  lines += [""]
  rows = []
  for split, tail, kind, measure in (("train", h["train_tail"], "by_norm", "norm"),
                                     ("held-out", h["tail"], "by_norm", "norm"),
                                     ("held-out", h["tail"], "by_distance_to_train", "distance")):
    for b in tail.get(kind, []):
      lo, hi = b["quantiles"]
      rows.append([split, f"{measure} q{100 * lo:g}-{100 * hi:g}%",
                   f"{b[measure][0]:.2f}-{b[measure][1]:.2f}", b["num_points"],
                   f"{b['vae_elbo']:.2f}", f"{b['iavae_elbo']:.2f}", f"{b['diff_mean']:.3f}",
                   f"{b['diff_min']:.3f}", f"{100 * b['fraction_worse']:.2f}%"])
  lines += runs.markdown_table(
      ["data", "bin", "range", "points", "VAE ELBO", "IA-VAE ELBO", "mean diff", "min diff",
       "share worse"], rows)
  return lines + [""]
