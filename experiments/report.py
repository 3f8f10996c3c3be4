r"""Table 4 of the paper from the results of experiments.images.

  python -m experiments.report --workdir=runs

Finds every results.json under DIR (recursively) whose top-level "experiment" is "images" (one
per data set) and writes DIR/table4.json and DIR/table4.md (exit code 2 while another command
holds DIR; the runs under DIR may be training meanwhile). Nothing is trained or recomputed: the
numbers are the per-seed test metrics those runs recorded. The schema of table4.json, its
paired tests, and how table4.md marks runs off the paper's split: docs/cli.md. Bad input (no
results, two results for one data set, a malformed results file) exits with code 2.
"""

import math
import os
from typing import Callable

from absl import app, flags

from experiments import common, configs, tables
from iavae_jax import image_runs, runs, stats

FLAGS = flags.FLAGS

PAPER_ORDER = ("omniglot", "mnist", "fashion_mnist")


def present_models(data: dict) -> tuple[str, ...]:
  """The models of Table 4 and the ablations a results file holds."""
  return configs.TABLE4_MODELS + tuple(m for m in configs.ABLATIONS if m in data["models"])


def dataset_order(names) -> list[str]:
  """The paper's order (omniglot, mnist, fashion_mnist), then any others alphabetically."""
  known = [name for name in PAPER_ORDER if name in names]
  return known + sorted(name for name in names if name not in PAPER_ORDER)


def build_table4(workdir: str, paths: list[str]) -> dict:
  """The table4.json dictionary from the given results files (see the module docstring)."""
  by_dataset = {}
  for path in paths:
    data = image_runs.read_results(path, configs.TABLE4_MODELS, configs.ABLATIONS)
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
    for key, model, other in configs.COMPARISONS + configs.ABLATION_COMPARISONS:
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


def write_summary(workdir: str, table: dict, stem: str, render: Callable[[dict], str]) -> dict:
  """Writes table as workdir/{stem}.json and render(table) as workdir/{stem}.md; returns it.
  Only workdir itself is locked: the runs under it may still be training, as their results.json
  is replaced whole, never half-written."""
  with runs.workdir_lock(workdir):
    runs.write_json(os.path.join(workdir, f"{stem}.json"), table)
    runs.write_text(os.path.join(workdir, f"{stem}.md"), render(table))
  return table


def write_report(workdir: str) -> dict:
  """Writes workdir/table4.json and workdir/table4.md; returns the table."""
  return write_summary(workdir, build_table4(workdir, image_runs.results_under(workdir)), "table4",
                       tables.table4)


def summary_main(write: Callable[[str], dict], render: Callable[[dict], str], stem: str,
                 workdir_help: str) -> Callable[[list[str]], None]:
  """The absl main of a command that summarises the runs under --workdir: defines --workdir
  (only when run as a program: other experiment modules define it too, and importing them
  together, as the tests do, would be a duplicate-flag error), then prints render(write(DIR))
  and the files written there (DIR/{stem}.json and .md)."""
  flags.DEFINE_string("workdir", None, workdir_help)

  def main(argv: list[str]) -> None:
    def body():
      print(render(write(FLAGS.workdir)), end="")
      path = os.path.join(FLAGS.workdir, stem)
      print(f"wrote {path}.json and {path}.md")
    common.run_command(argv, body)
  return main


if __name__ == "__main__":
  app.run(summary_main(
      write_report, tables.table4, "table4",
      workdir_help="Directory searched recursively for results.json of experiments.images; "
      "table4.json and table4.md are written there."))
