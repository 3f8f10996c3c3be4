r"""The image hypernetwork designs side by side, from runs of experiments.images that differ in
--hypernet (or its flags) and share everything else.

  python -m experiments.designs --workdir=runs/designs

Finds every results.json of experiments.images under DIR (recursively) and the gaps.json of
experiments.gaps beside it where there is one, groups the runs by data set and design (the
--hypernet name, then the design flags that differ from their defaults, e.g. "mlp
input=penultimate"), and writes DIR/designs.json and DIR/designs.md (exit code 2 while another
command holds DIR). Nothing is trained or recomputed. Per data set, on the seeds every design's
run has, each design's test and validation ELBO, its mean-input ablation, the share of the VAE's
amortization gap it closes and its paired tests; and the runs with the decoder frozen, every
model on it. Summaries and tests as in experiments.report. designs.json's schema: docs/cli.md.
Bad input exits with code 2.
"""

import dataclasses
import math
import os

from absl import app

from experiments import common, configs, report, tables
from iavae_jax import gap_runs, image_runs, stats

PAPER = "paper"
MEAN_CONTEXT = "iavae" + configs.MEAN_SUFFIX
# The flags that change a design, shown in its label where they differ from their defaults.
DESIGN_FLAGS = {"hypernet_input": "input", "hypernet_hidden": "hidden",
                "ha_block_gains": "block_gains", "hypernet_projection": "projection",
                "passes": "passes", "feedback_samples": "samples", "adapted_blocks": "blocks"}
DEFAULTS = {field.name: field.default for field in dataclasses.fields(configs.ImageConfig)}


def design_label(config: dict) -> str:
  """The design a run trained, from its results.json "config": e.g. "paper", "mlp hidden=32"."""
  changed = [f"{short}={config[name]}" for name, short in DESIGN_FLAGS.items()
             if name in config and config[name] != DEFAULTS[name]]
  return " ".join([config.get("hypernet", PAPER)] + changed)


def load_runs(workdir: str) -> dict[str, dict[str, tuple[str, dict, dict | None]]]:
  """data set -> design label -> (results.json path, its contents, the gaps.json beside it or
  None); designs in order: "paper" first, then alphabetically."""
  found = {}
  for path in image_runs.results_under(workdir):   # a run on the frozen decoder alone too
    data = image_runs.read_results(path, ("vae",), configs.ABLATIONS)
    label = design_label(data.get("config") or {})
    by_design = found.setdefault(data["dataset"], {})
    if label in by_design:
      raise common.ConfigError(
          f"two runs of design {label!r} on {data['dataset']}: {by_design[label][0]} and {path}; "
          f"move one of them out of --workdir={workdir}.")
    by_design[label] = (path, data, image_runs.read_gaps(os.path.dirname(path)))
  return {name: dict(sorted(by_design.items(), key=lambda item: (item[0] != PAPER, item[0])))
          for name, by_design in found.items()}


def on_seeds(values: list, run_seeds: list, seeds: list) -> list:
  """A run's per-seed values (in the order of its run_seeds) on seeds, a subset of them."""
  index = {seed: i for i, seed in enumerate(run_seeds)}
  return [values[index[seed]] for seed in seeds]


def gap_closed(gaps: dict | None, seeds: list, model: str = "iavae") -> dict | None:
  """The model's share of its VAE's amortization gap closed on the seeds, if gaps.json has it."""
  entry = (gaps or {}).get(model, {}).get("share_of_vae_amortization_gap_closed")
  if entry is None or not set(seeds) <= set(gaps.get("seeds", [])):
    return None
  return stats.summarize_seeds(on_seeds(entry["per_seed"], gaps["seeds"], seeds))


def compare_dataset(workdir: str, name: str, by_design: dict) -> dict:
  """One data set's entry of designs.json (see the module docstring)."""
  seeds = sorted(set.intersection(*(set(data["seeds"]) for _, data, _ in by_design.values())))
  if not seeds:
    raise common.ConfigError(f"the runs on {name} share no seed ({', '.join(by_design)}); run "
                             "every design with the same --seed and --num_seeds.")

  def per_seed(data: dict, model: str, key: str = "test_elbo") -> list:
    return on_seeds(data["models"][model][key], data["seeds"], seeds)

  first = next(iter(by_design.values()))[1]
  vae = per_seed(first, "vae")
  row = {"seeds": seeds,
         "same_vae": all(per_seed(data, "vae") == vae for _, data, _ in by_design.values()),
         "vae": stats.summarize_seeds(vae), "designs": {},
         "frozen_decoder": {label: frozen_entry(path, data, gaps, seeds)
                            for label, (path, data, gaps) in by_design.items()
                            if configs.FROZEN_IAVAE in data["models"]}}
  with_iavae = {label: run for label, run in by_design.items()
                if {"iavae", "control"} <= set(run[1]["models"])}
  if with_iavae:
    row["control"] = stats.summarize_seeds(per_seed(next(iter(with_iavae.values()))[1],
                                                     "control"))
  for label, (path, data, gaps) in with_iavae.items():
    iavae = per_seed(data, "iavae")
    entry = {"source": os.path.relpath(path, workdir), "iavae": stats.summarize_seeds(iavae),
             "valid_elbo": stats.summarize_seeds(per_seed(data, "iavae", "valid_elbo")),
             "gap_closed": gap_closed(gaps, seeds),
             "vs_control": stats.paired_comparison(iavae, per_seed(data, "control"))}
    if MEAN_CONTEXT in data["models"]:
      mean_context = per_seed(data, MEAN_CONTEXT)
      entry[MEAN_CONTEXT] = stats.summarize_seeds(mean_context)
      entry["vs_mean_input"] = stats.paired_comparison(iavae, mean_context)
    if PAPER in with_iavae and label != PAPER:
      entry["vs_paper"] = stats.paired_comparison(iavae, per_seed(with_iavae[PAPER][1], "iavae"))
    row["designs"][label] = entry
  score = lambda label: row["designs"][label]["valid_elbo"]["mean"]
  if row["designs"]:
    row["best_on_validation"] = max(row["designs"], key=lambda label: (
        -math.inf if score(label) is None else score(label)))
  return row


def worth_steps(gaps: dict | None, model: str, seeds: list) -> dict | None:
  """The refinement steps from the VAE at which each refinement curve of gaps.json reaches the
  model's ELBO, from the means over ``seeds`` (gaps.json's own are over all its seeds); None
  where gaps.json does not cover the model on those seeds."""
  if (gaps is None or not set(seeds) <= set(gaps.get("seeds", []))
      or model not in gaps.get("refinement_steps_worth", {})):
    return None
  over_seeds = lambda summary: stats.summarize_seeds(
      on_seeds(summary["per_seed"], gaps["seeds"], seeds))
  curves = {label: {"steps": curve["steps"], "elbo": [over_seeds(e) for e in curve["elbo"]]}
            for label, curve in gaps["vae_refinement"].items()}
  worth = gap_runs.steps_worth(curves, over_seeds(gaps[model]["refinement"]["elbo"][0]))  # K = 0
  return {label: steps["of_the_means"] for label, steps in worth.items()}


def frozen_entry(path: str, data: dict, gaps: dict | None, seeds: list) -> dict:
  """One design's models on the VAE's frozen decoder: each one's test ELBO, decoder passes per
  example, share of the VAE's amortization gap closed and the refinement steps from the VAE it
  is worth (from gaps.json, where it covers the seeds), whether its patience was long enough
  and how many seeds ended at the epoch cap (``image_runs.early_stopping``), and the paired
  tests of the IA-VAE against the others (configs.FROZEN_OTHERS)."""
  per_seed = lambda model: on_seeds(data["models"][model]["test_elbo"], data["seeds"], seeds)
  passes = data.get("decoder_passes_per_example", {})
  present = [model for model in [configs.FROZEN_IAVAE, *configs.FROZEN_OTHERS.values()]
             if model in data["models"]]
  stopping = image_runs.early_stopping(os.path.dirname(path), data, seeds,
                                       [model for model in present if not configs.ablated(model)])
  models = {}
  for model in present:   # an evaluated ablation has no training of its own
    models[model] = {
        "test_elbo": stats.summarize_seeds(per_seed(model)),
        "decoder_passes": passes.get(model, 0), "gap_closed": gap_closed(gaps, seeds, model),
        "worth_steps": worth_steps(gaps, model, seeds),
        **stopping["models"].get(model, dict.fromkeys(
            ("longest_wait_steps", "lost_at_half_patience", "seeds_at_epoch_cap")))}
  iavae = per_seed(configs.FROZEN_IAVAE)
  tests = {key: stats.paired_comparison(iavae, per_seed(other))
           for key, other in configs.FROZEN_OTHERS.items() if other in data["models"]}
  return {"models": models, "patience_steps": stopping["patience_steps"], **tests}


def build(workdir: str) -> dict:
  runs = load_runs(workdir)
  return {name: compare_dataset(workdir, name, runs[name]) for name in report.dataset_order(runs)}


def write_designs(workdir: str) -> dict:
  """Writes workdir/designs.json and workdir/designs.md; returns the table."""
  return report.write_summary(workdir, build(workdir), "designs", tables.designs)


if __name__ == "__main__":
  app.run(report.summary_main(
      write_designs, tables.designs, "designs",
      workdir_help="Directory searched recursively for the runs of experiments.images (and "
      "their gaps.json) to compare; designs.json and designs.md are written there."))
