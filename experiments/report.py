r"""Table 4 of the paper from the results of experiments.images.

  python -m experiments.report --workdir=runs

Finds every results.json under DIR (recursively) whose top-level "experiment" is "images" (one
per data set) and writes DIR/table4.json and DIR/table4.md (exit code 2 while another command
holds DIR; the runs under DIR may be training meanwhile). Nothing is trained or recomputed: the
numbers are the per-seed test metrics those runs recorded.

table4.json maps each data set, in the paper's order (omniglot, mnist, fashion_mnist, then
others alphabetically), to

  {"source": "<results.json, relative to DIR>", "tier": ..., "seeds": [...],
   "wall_seconds": ... or null,
   "paper_split": true, false or null,   # results.json data.paper_split (null: not recorded)
   "vae":     {"mean", "std", "per_seed",                # test ELBO
               "kl": {"mean", "std", "per_seed"},        # test KL
               "iwae": {"mean", "std", "per_seed"},      # test IWAE bound
               "diverged_seeds": [...]},                 # no finite validation ELBO
   "iavae":   {... same ...},
   "control": {... same ...},
   "iavae_vs_vae":     {"test", "p_value", "shapiro_p", "mean_difference", "n"},
   "iavae_vs_control": {... same ...},
   # and, for the ablation models a run trained (experiments.images --models), their summaries
   # under their names (ABLATIONS) and these comparisons where both models are present:
   "iavae_vs_iavae_mean_context": ...,   # what the hypernetwork's per-example input adds
   "iavae_frozen_decoder_vs_control_frozen_decoder": ...,   # inference alone improved
   "iavae_vs_vae_matched": ...}          # against a VAE with as many inference parameters

std is the sample standard deviation over seeds (ddof=1); null with a single seed. The paired
tests are iavae_jax.stats.paired_one_sided on test ELBO (H1: IA-VAE > the other model): Shapiro-
Wilk on the per-seed differences, then a one-sided paired t-test if normality is not rejected at
0.05, else a one-sided Wilcoxon signed-rank test (H1 of "a_vs_b": a > b). With a single seed no
test is possible and "test", "p_value" and "shapiro_p" are null. Non-finite KL or IWAE values are
written as null.

table4.md renders that dictionary (render_markdown is a pure function of it); a data set whose
run was not on the paper's train/test split (paper_split false: e.g. OMNIGLOT from Lake's zips or
TFDS rather than Burda et al.'s chardata.mat, or a subset of MNIST) is marked with a dagger. Bad
input (no results, two results for one data set, a malformed results file) exits with code 2.
"""

import glob
import math
import os
from typing import Callable

from absl import app, flags

from experiments import common, configs
from iavae_jax import stats

FLAGS = flags.FLAGS

EXPERIMENT = "images"
MODELS = ("vae", "iavae", "control")   # every run has these: the paper's Table 4
ABLATIONS = ("iavae_mean_context", "iavae_frozen_decoder", "control_frozen_decoder",
             "vae_matched", "iavae_frozen_decoder_mean_context", "corrector",
             "corrector_frozen_decoder")   # summarised and compared where a run trained them
METRICS = ("test_elbo", "test_kl", "test_iwae")
# (key, model, other): the paired test of H1 "model > other" on test ELBO.
COMPARISONS = (("iavae_vs_vae", "iavae", "vae"), ("iavae_vs_control", "iavae", "control"))
ABLATION_COMPARISONS = (
    ("iavae_vs_iavae_mean_context", "iavae", "iavae_mean_context"),
    ("iavae_frozen_decoder_vs_control_frozen_decoder", "iavae_frozen_decoder",
     "control_frozen_decoder"),
    ("iavae_vs_vae_matched", "iavae", "vae_matched"),
    ("iavae_vs_corrector", "iavae", "corrector"),
    ("iavae_frozen_decoder_vs_corrector_frozen_decoder", "iavae_frozen_decoder",
     "corrector_frozen_decoder"),
    ("iavae_frozen_decoder_vs_iavae_frozen_decoder_mean_context", "iavae_frozen_decoder",
     "iavae_frozen_decoder_mean_context"))
PAPER_ORDER = ("omniglot", "mnist", "fashion_mnist")
DISPLAY_NAMES = {"omniglot": "OMNIGLOT", "mnist": "MNIST", "fashion_mnist": "Fashion MNIST"}
MODEL_NAMES = {"vae": "VAE", "iavae": "IA-VAE", "control": "control",
               "iavae_mean_context": "IA-VAE, mean input", "iavae_frozen_decoder":
               "IA-VAE, decoder frozen", "control_frozen_decoder": "control, decoder frozen",
               "vae_matched": "VAE, matched encoder", "corrector": "corrector",
               "corrector_frozen_decoder": "corrector, decoder frozen",
               "iavae_frozen_decoder_mean_context": "IA-VAE, decoder frozen, mean input"}


def find_results(workdir: str) -> list[str]:
  """Paths of every results.json under workdir written by experiments.images, sorted."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "**", "results.json"), recursive=True)):
    data = common.read_json(path)
    if isinstance(data, dict) and data.get("experiment") == EXPERIMENT:
      found.append(path)
  return found


def results_under(workdir: str) -> list[str]:
  """find_results(workdir), refusing a missing workdir and one that holds no image results."""
  if not workdir:
    raise common.ConfigError("--workdir is required: the directory holding the results of "
                             "experiments.images.")
  if not os.path.isdir(workdir):
    raise common.ConfigError(f"--workdir={workdir} is not a directory.")
  paths = find_results(workdir)
  if not paths:
    raise common.ConfigError(f"no results.json from experiments.images under {workdir}; run "
                             f"python -m experiments.images --workdir={workdir}/<dataset> ... "
                             "first.")
  return paths


def load_results(path: str, required: tuple[str, ...] = MODELS) -> dict:
  """Reads one images results.json and checks the fields Table 4 needs (of the ``required``
  models, and of the ablations it holds)."""
  data = common.read_json(path)
  for key in ("dataset", "seeds", "models"):
    if key not in data:
      raise common.ConfigError(f"{path} has no {key!r}; it is not a complete results.json of "
                               "experiments.images (rerun it).")
  if not isinstance(data["dataset"], str) or not isinstance(data["models"], dict):
    raise common.ConfigError(f"{path}: 'dataset' must be a name and 'models' a mapping of model "
                             "to per-seed metrics.")
  seeds = data["seeds"]
  if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
    raise common.ConfigError(f"{path}: 'seeds' must be a non-empty list of distinct seeds, got "
                             f"{seeds!r}.")
  for model in present_models(data, required):
    entry = data["models"].get(model)
    if not isinstance(entry, dict):
      raise common.ConfigError(f"{path} has no results for model {model!r} under 'models'.")
    if "seeds" in entry and entry["seeds"] != seeds:
      raise common.ConfigError(f"{path}: model {model!r} was run with seeds {entry['seeds']}, "
                               f"but the file's seeds are {seeds}; the paired test needs the "
                               "same seeds for every model.")
    for metric in METRICS:
      values = entry.get(metric)
      if not isinstance(values, list):
        raise common.ConfigError(f"{path}: models.{model}.{metric} is missing or not a list.")
      if len(values) != len(seeds):
        raise common.ConfigError(f"{path}: models.{model}.{metric} has {len(values)} values "
                                 f"but the file has {len(seeds)} seeds {seeds}; the seeds "
                                 "differ between models.")
    # The tests run on test ELBO: a missing or diverged seed there would make them meaningless.
    for seed, value in zip(seeds, entry["test_elbo"]):
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise common.ConfigError(f"{path}: models.{model}.test_elbo is {value!r} for seed "
                                 f"{seed}; Table 4 needs a finite test ELBO for every seed.")
  return data


def present_models(data: dict, required: tuple[str, ...] = MODELS) -> tuple[str, ...]:
  """The models a results file must hold (``required``) and the ablations it holds."""
  return required + tuple(m for m in ABLATIONS if m in data["models"] and m not in required)


def dataset_order(names) -> list[str]:
  """The paper's order (omniglot, mnist, fashion_mnist), then any others alphabetically."""
  known = [name for name in PAPER_ORDER if name in names]
  return known + sorted(name for name in names if name not in PAPER_ORDER)


def build_table4(workdir: str, paths: list[str]) -> dict:
  """The table4.json dictionary from the given results files (see the module docstring)."""
  by_dataset = {}
  for path in paths:
    data = load_results(path)
    name = data["dataset"]
    if name in by_dataset:
      raise common.ConfigError(f"two results for data set {name!r}: {by_dataset[name][0]} and "
                               f"{path}; move one of them out of --workdir={workdir}.")
    by_dataset[name] = (path, data)

  table = {}
  for name in dataset_order(by_dataset):
    path, data = by_dataset[name]
    models = data["models"]
    row = {"source": os.path.relpath(path, workdir), "tier": data.get("tier"),
           "seeds": data["seeds"], "wall_seconds": data.get("wall_seconds"),
           "paper_split": (data.get("data") or {}).get("paper_split")}
    for model in present_models(data):
      summary = stats.summarize_seeds(models[model]["test_elbo"])
      summary["kl"] = stats.summarize_seeds(models[model]["test_kl"])
      summary["iwae"] = stats.summarize_seeds(models[model]["test_iwae"])
      # A mean-input ablation is evaluated, not trained: it has no validation ELBO of its own.
      summary["diverged_seeds"] = ([] if configs.ablated(model)
                                   else _diverged_seeds(data["seeds"], models[model]))
      row[model] = summary
    for key, model, other in COMPARISONS + ABLATION_COMPARISONS:
      if model in row and other in row:
        row[key] = stats.paired_comparison(models[model]["test_elbo"], models[other]["test_elbo"])
    table[name] = row
  return table


def _diverged_seeds(seeds: list, model: dict) -> list:
  """Seeds whose training never reached a finite validation ELBO (NaN or inf from the first
  epoch on): their selected parameters are the initial ones, so their test numbers measure the
  starting point, not a trained model."""
  valid = model.get("valid_elbo", [0.0] * len(seeds))
  return [seed for seed, v in zip(seeds, valid)
          if v is None or not math.isfinite(float(v))]


def mean_std(summary: dict) -> str:
  mean, std = summary["mean"], summary["std"]
  if mean is None:
    return "n/a"
  return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def p_value_cell(comparison: dict) -> str:
  p = comparison["p_value"]
  if p is None:
    return "—"
  text = "<0.0001" if p < 1e-4 else f"{p:.4f}"
  return text + ("*" if p < stats.ALPHA else "")


def test_name_cell(comparison: dict) -> str:
  if comparison["test"] is None:
    return f"none ({comparison['n']} seed)"
  if comparison["shapiro_p"] is None:
    return f"{comparison['test']} (SW n/a)"
  return f"{comparison['test']} (SW p={comparison['shapiro_p']:.2g})"


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


def render_markdown(table: dict) -> str:
  """table4.md from the table4.json dictionary; a pure function, so it can be tested alone."""
  lines = ["# Table 4: test ELBO (mean ± std over seeds, higher is better)", ""]
  lines += common.markdown_table(
      ["Data set", "VAE", "IA-VAE", "control", "p (IA-VAE > VAE)", "test",
       "p (IA-VAE > control)", "test", "seeds", "wall time"],
      [[_data_set(name, row)] + [mean_std(row[model]) for model in MODELS]
       + [cell for key, _, _ in COMPARISONS
          for cell in (p_value_cell(row[key]), test_name_cell(row[key]))]
       + [len(row["seeds"]), _wall_time(row["wall_seconds"])] for name, row in table.items()])
  lines += ["", "## Test KL and IWAE bound (mean ± std over seeds)", ""]
  lines += common.markdown_table(
      ["Data set"] + [f"KL {MODEL_NAMES[m]}" for m in MODELS]
      + [f"IWAE {MODEL_NAMES[m]}" for m in MODELS],
      [[_data_set(name, row)] + [mean_std(row[model]["kl"]) for model in MODELS]
       + [mean_std(row[model]["iwae"]) for model in MODELS] for name, row in table.items()])
  lines += _ablations_markdown(table)
  diverged = [f"{DISPLAY_NAMES.get(name, name)} {MODEL_NAMES[m]} seeds "
              f"{row[m]['diverged_seeds']}" for name, row in table.items()
              for m in MODELS + ABLATIONS if m in row and row[m].get("diverged_seeds")]
  if diverged:
    lines += ["", "**Diverged** (no finite validation ELBO in any epoch, so the selected "
              "parameters are the initial ones and the test numbers are the starting point's): "
              + "; ".join(diverged) + "."]
  if any(row.get("paper_split") is False for row in table.values()):
    lines += ["", "† Not the paper's train/test split (OMNIGLOT: Burda et al.'s chardata.mat; "
              "MNIST, Fashion-MNIST: the standard test set): see each run's results.json "
              "\"data\"; these numbers do not compare with the paper's."]
  lines += ["",
            "Tests on test ELBO, paired by seed, H1: IA-VAE > the other model. Shapiro-Wilk "
            f"(SW) on the per-seed differences; if normality is not rejected at {stats.ALPHA} a "
            "one-sided paired Student t-test, otherwise (or with fewer than 3 seeds, or "
            "identical differences, where SW is undefined) a one-sided Wilcoxon signed-rank "
            f"test. `*`: p < {stats.ALPHA}. std: sample standard deviation (ddof = 1).", ""]
  return "\n".join(lines)


def _ablations_markdown(table: dict) -> list[str]:
  """The ablations' test ELBO and their paired tests, for the data sets that ran any."""
  rows = [[_data_set(name, row), MODEL_NAMES[model], mean_std(row[model]),
           MODEL_NAMES[other], f"{row[key]['mean_difference']:+.2f}", p_value_cell(row[key]),
           test_name_cell(row[key])]
          for name, row in table.items() for key, model, other in ABLATION_COMPARISONS
          if key in row]
  if not rows:
    return []
  return ["", "## Ablations: test ELBO, and the paired test of H1: model > the other", ""] + (
      common.markdown_table(["Data set", "model", "test ELBO", "other", "mean difference",
                             "p (model > other)", "test"], rows))


def write_report(workdir: str) -> dict:
  """Writes workdir/table4.json and workdir/table4.md; returns the table."""
  table = build_table4(workdir, results_under(workdir))
  # Only workdir itself is locked: the runs under it may still be training, as their
  # results.json is replaced whole, never half-written.
  with common.workdir_lock(workdir):
    common.write_json(os.path.join(workdir, "table4.json"), table)
    common.write_text(os.path.join(workdir, "table4.md"), render_markdown(table))
  return table


def summary_main(write: Callable[[str], dict], render: Callable[[dict], str], *outputs: str,
                 workdir_help: str) -> Callable[[list[str]], None]:
  """The absl main of a command that summarises the runs under --workdir: defines --workdir
  (only when run as a program: other experiment modules define it too, and importing them
  together, as the tests do, would be a duplicate-flag error), then prints render(write(DIR))
  and the files written there (``outputs``)."""
  flags.DEFINE_string("workdir", None, workdir_help)

  def main(argv: list[str]) -> None:
    def body():
      print(render(write(FLAGS.workdir)), end="")
      print("wrote " + " and ".join(os.path.join(FLAGS.workdir, name) for name in outputs))
    common.run_command(argv, body)
  return main


if __name__ == "__main__":
  app.run(summary_main(
      write_report, render_markdown, "table4.json", "table4.md",
      workdir_help="Directory searched recursively for results.json of experiments.images; "
      "table4.json and table4.md are written there."))
