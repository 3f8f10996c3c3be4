r"""One model of a run against models of other runs on the same VAEs, paired over the seeds the
runs share (experiments.designs compares within a run; this, across runs).

  python -m experiments.compare \
      --model=runs/feedback/residual_T1_output_layers/fashion_mnist:iavae_frozen_decoder \
      --against=runs/feedback/residual_T1/fashion_mnist:iavae_frozen_decoder,corrector_frozen_decoder

--model is WORKDIR:MODEL and each --against (repeatable) WORKDIR:MODEL[,MODEL...]: a directory
of experiments.images (the one holding its results.json) and the names of models in it. Prints
a Markdown table (or, with --json, its dictionary): on the seeds every named run has, each
model's test ELBO, the share of the VAE's amortization gap it closes and the tuned refinement
steps it is worth (from the gaps.json of experiments.gaps beside it, where that covers the
seeds), and --model's mean per-seed difference from it, the seeds --model is ahead in, and the
one-sided paired test of H1: --model's test ELBO is higher (stats.paired_comparison). A paired
test needs the same VAE under every seed's pair, so runs whose VAE test ELBOs differ on a shared
seed are refused. Nothing is written. Bad input exits with code 2.
"""

import dataclasses
import json
import os

from absl import app, flags

from experiments import common, designs, tables
from iavae_jax import image_runs, stats

FLAGS = flags.FLAGS
EXAMPLE = "runs/feedback/residual_T1/fashion_mnist:iavae_frozen_decoder"

flags.DEFINE_string("model", None, "WORKDIR:MODEL, the model under test: a directory of "
                    "experiments.images and a model of its results.json.")
flags.DEFINE_multi_string("against", [], "WORKDIR:MODEL[,MODEL...], models to compare --model "
                          "with (repeatable); their runs must share --model's VAEs.")
flags.DEFINE_bool("json", False, "Print the table's dictionary as JSON instead of Markdown.")


@dataclasses.dataclass(frozen=True)
class Named:
  """A model of a run: its workdir, name, results.json and gaps.json (None if absent)."""
  workdir: str
  model: str
  results: dict
  gaps: dict | None

  def on(self, seeds: list, model: str | None = None) -> list:
    """The test ELBO of this model (or of ``model``, e.g. "vae", of the same run) on seeds."""
    return designs.on_seeds(self.results["models"][model or self.model]["test_elbo"],
                            self.results["seeds"], seeds)


def parse(spec: str, flag: str) -> list[Named]:
  """The models WORKDIR:MODEL[,MODEL...] names (one only for --model; WORKDIR ends at the last
  ':'), their run checked."""
  workdir, sep, names = spec.rpartition(":")
  models = names.split(",")
  malformed = not all(models) or any(os.sep in model or "/" in model for model in models)
  if not sep or not workdir or malformed or (flag == "model" and len(models) != 1):
    form = "WORKDIR:MODEL" + ("" if flag == "model" else "[,MODEL...]")
    raise common.ConfigError(f"--{flag}={spec!r} is not {form}; e.g. --{flag}={EXAMPLE}.")
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    raise common.ConfigError(f"--{flag}={spec!r}: there is no {path}; WORKDIR is the --workdir "
                             "of a finished experiments.images run.")
  results = image_runs.read_results(path, ("vae",), models)
  for model in models:
    if model not in results["models"]:
      raise common.ConfigError(f"--{flag}={spec!r}: {path} has no model {model!r}; it has "
                               f"{', '.join(results['models'])}.")
  gaps = image_runs.read_gaps(workdir)
  return [Named(workdir, model, results, gaps) for model in models]


def compare(model: str, against: list[str]) -> dict:
  """The table's dictionary: data set, shared seeds, the VAE, and a row per model, --model's
  first (see the module docstring)."""
  subject = parse(model, "model")[0]
  if not against:
    raise common.ConfigError(f"--against is required: the models to compare --model with, e.g. "
                             f"--against={EXAMPLE}.")
  named = [subject, *(other for spec in against for other in parse(spec, "against"))]
  seen = set()
  for entry in named:
    key = (os.path.realpath(entry.workdir), entry.model)
    if key in seen:
      raise common.ConfigError(f"{entry.model} of {entry.workdir} is named twice; name each model "
                               "once (--model is not compared with itself).")
    seen.add(key)
  datasets = sorted({entry.results["dataset"] for entry in named})
  if len(datasets) > 1:
    raise common.ConfigError(f"the runs are on different data sets ({', '.join(datasets)}); a "
                             "paired test compares models on the same images.")
  seeds = sorted(set.intersection(*(set(entry.results["seeds"]) for entry in named)))
  if not seeds:
    raise common.ConfigError("the runs share no seed; train them with the same --seed and "
                             "--num_seeds.")
  vae = subject.on(seeds, "vae")
  for entry in named:
    if entry.on(seeds, "vae") != vae:
      raise common.ConfigError(
          f"the VAEs differ: {entry.workdir}'s VAE has test ELBO {entry.on(seeds, 'vae')} on "
          f"seeds {seeds}, {subject.workdir}'s {vae}; a paired test needs the same VAE under each "
          "seed (the same data set, split, seed and VAE settings, on the same kind of machine).")
  ours = subject.on(seeds)
  rows = []
  for entry in named:
    theirs = entry.on(seeds)
    row = {"workdir": entry.workdir, "model": entry.model,
           "test_elbo": stats.summarize_seeds(theirs),
           "gap_closed": designs.gap_closed(entry.gaps, seeds, entry.model),
           "worth_tuned_steps": (designs.worth_steps(entry.gaps, entry.model, seeds)
                                 or {}).get("tuned")}
    if entry is not subject:
      row["ahead_in_seeds"] = sum(a > b for a, b in zip(ours, theirs))
      row["difference"] = stats.paired_comparison(ours, theirs)
    rows.append(row)
  return {"dataset": datasets[0], "seeds": seeds, "vae": stats.summarize_seeds(vae),
          "rows": rows}


def main(argv: list[str]) -> None:
  def body():
    if not FLAGS.model:
      raise common.ConfigError(f"--model is required, e.g. --model={EXAMPLE}.")
    table = compare(FLAGS.model, FLAGS.against)
    print(json.dumps(table, indent=1) if FLAGS.json else tables.comparison(table))
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
