"""A finished run of experiments.images read back from its workdir, to measure or use its models.

The layout (docs/cli.md): DIR/results.json lists the run's seeds and models, DIR/checkpoints/
{name}_seed{seed} holds each model's training state (``stages.run_stage``), DIR/data.json
describes the data the run trained on. Nothing here writes; what is missing or does not match
is a ConfigError that names the file and what to do.
"""

import functools
import glob
import math
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from iavae_jax import checkpoints, hparams, image_vae, progress, runs, training
from iavae_jax.data import images
from iavae_jax.errors import ConfigError

__all__ = ["find_results", "results_under", "read_results", "run_models", "checkpoint_dir",
           "load", "with_mean_input", "decoder_passes", "run_data", "read_gaps", "early_stopping"]


def find_results(workdir: str) -> list[str]:
  """Paths of every results.json under workdir written by experiments.images, sorted."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "**", "results.json"), recursive=True)):
    data = runs.read_json(path)
    if isinstance(data, dict) and data.get("experiment") == "images":
      found.append(path)
  return found


def results_under(workdir: str) -> list[str]:
  """find_results(workdir), refusing a missing workdir and one that holds no image results."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is not a directory.")
  paths = find_results(workdir)
  if not paths:
    raise ConfigError(f"no results.json from experiments.images under {workdir}; run python -m "
                      f"experiments.images --workdir={workdir}/<dataset> ... first.")
  return paths


def read_results(path: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
  """One results.json of experiments.images, checked: its data set, its distinct seeds, and for
  each model of ``required`` (and of ``optional`` that it holds) a finite test ELBO and a test
  KL and IWAE per seed (what the paired tests and the tables read)."""
  data = runs.read_json(path)
  for key in ("dataset", "seeds", "models"):
    if key not in data:
      raise ConfigError(f"{path} has no {key!r}; it is not a complete results.json of "
                        "experiments.images (rerun it).")
  if not isinstance(data["dataset"], str) or not isinstance(data["models"], dict):
    raise ConfigError(f"{path}: 'dataset' must be a name and 'models' a mapping of model to "
                      "per-seed metrics.")
  seeds = data["seeds"]
  if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"{path}: 'seeds' must be a non-empty list of distinct seeds, got "
                      f"{seeds!r}.")
  for model in [*required, *(m for m in optional if m in data["models"] and m not in required)]:
    entry = data["models"].get(model)
    if not isinstance(entry, dict):
      raise ConfigError(f"{path} has no results for model {model!r} under 'models'.")
    if "seeds" in entry and entry["seeds"] != seeds:
      raise ConfigError(f"{path}: model {model!r} was run with seeds {entry['seeds']}, but the "
                        f"file's seeds are {seeds}; the paired test needs the same seeds for "
                        "every model.")
    for metric in ("test_elbo", "test_kl", "test_iwae"):
      values = entry.get(metric)
      if not isinstance(values, list):
        raise ConfigError(f"{path}: models.{model}.{metric} is missing or not a list.")
      if len(values) != len(seeds):
        raise ConfigError(f"{path}: models.{model}.{metric} has {len(values)} values but the "
                          f"file has {len(seeds)} seeds {seeds}; the seeds differ between "
                          "models.")
    # The tests run on test ELBO: a missing or diverged seed there would make them meaningless.
    for seed, value in zip(seeds, entry["test_elbo"]):
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{path}: models.{model}.test_elbo is {value!r} for seed {seed}; the "
                          "tables need a finite test ELBO for every seed.")
  return data


def run_models(workdir: str) -> tuple[list, list]:
  """The seeds and model names DIR/results.json reports."""
  path = os.path.join(workdir, "results.json")
  run = runs.read_json(path)
  seeds, models = (run.get(key) if isinstance(run, dict) else None for key in ("seeds", "models"))
  if not isinstance(seeds, list) or not seeds or not isinstance(models, dict) or not models:
    raise ConfigError(f"{path} lists no seeds or no models: there are no trained models to "
                      "measure. Run experiments.images there to the end.")
  return seeds, list(models)


def checkpoint_dir(workdir: str, name: str, seed: int) -> str:
  """DIR/checkpoints/{name}_seed{seed}, which must exist."""
  directory = os.path.join(workdir, "checkpoints", f"{name}_seed{seed}")
  if not os.path.isdir(directory):
    raise ConfigError(f"{directory} is missing: results.json lists model {name!r} for seed "
                      f"{seed}, but its checkpoint is gone. Rerun experiments.images in this "
                      "workdir to restore it.")
  return directory


def _vae_frozen(workdir: str, seed: int, kind: str) -> dict:
  """What a stage-2 model of this kind trained with but a checkpoint written before training
  states held their frozen inputs lacks: the seed's VAE's encoder (phi_AVI) and batch-norm
  statistics."""
  directory = checkpoint_dir(workdir, "vae", seed)
  state = checkpoints.read_latest(directory)[0]
  vae = state.get("best_params") if isinstance(state, dict) else None
  if not isinstance(vae, dict) or not {"encoder", "batch_stats"} <= set(vae):
    raise ConfigError(f"{directory} does not hold a VAE's training state with best_params.")
  return ({"batch_stats": vae["batch_stats"]} if kind == "control"
          else {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]})


def load(model: image_vae.Model, workdir: str, name: str, seed: int) -> image_vae.Trained:
  """The run's model ``name`` of ``seed`` (``image_vae.load_trained``; a checkpoint without
  frozen inputs takes the seed's VAE's, which it trained with). ``model`` is the one it trained
  with (for a VAE matched in size, ``image_vae.matched_model``'s)."""
  return image_vae.load_trained(
      model, checkpoint_dir(workdir, name, seed), functools.partial(_vae_frozen, workdir, seed),
      f"was {workdir}/config.json edited? Restore it, or rerun experiments.images in a new "
      "workdir")


def with_mean_input(model: image_vae.Model, iavae: image_vae.Trained,
                    train: np.ndarray) -> image_vae.Trained:
  """The mean-input ablation of a loaded IA-VAE: its hypernetwork's input (or feedback)
  replaced by its mean over the training images train [N, 28, 28] (``image_vae.mean_inputs``,
  as experiments.images evaluated it)."""
  mean = image_vae.mean_inputs(model, iavae.params, iavae.frozen, jnp.asarray(train),
                               model.config.eval_batch_size)
  return iavae._replace(frozen={**iavae.frozen, **mean}, source=f"{iavae.source} (mean input)")


def decoder_passes(workdir: str, names: list) -> dict:
  """Each model's decoder passes per example, as DIR/results.json records them (0 for a run
  written before it did: no model then had feedback)."""
  recorded = runs.read_json(os.path.join(workdir, "results.json")).get(
      "decoder_passes_per_example", {})
  return {name: int(recorded.get(name, 0)) for name in names}


def run_data(workdir: str, dataset: str, split_seed: int,
             data_dir: str | None = None) -> images.ImageSplits:
  """The data the run trained on (``images.load``, not capped), read where DIR/data.json says
  (or from data_dir), refused if they are not the data the run recorded."""
  recorded = runs.read_json(os.path.join(workdir, "data.json"))
  if data_dir is None:
    files = recorded.get("files") or []
    data_dir = os.path.dirname(files[0]) if files else recorded.get("data_dir")
  try:
    data = images.load(dataset, data_dir=data_dir, source=recorded.get("source", "auto"),
                       split_seed=split_seed)
  except images.DataError as e:
    raise ConfigError(f"{e} (the run's data, as {workdir}/data.json records them; if they "
                      "moved, pass data_dir)") from e
  if data.info != recorded:
    raise ConfigError(f"the data read from {data_dir} are not those of the run in {workdir} "
                      f"(recorded {recorded}, read {data.info}); pass the run's data_dir.")
  return data


def read_gaps(workdir: str) -> dict | None:
  """DIR/gaps.json, experiments.gaps' measurements of the run, or None where there is none;
  checked where the tables read it: its seeds, each model's share of the VAE's amortization gap
  closed, and for each model it says refinement steps are worth, that model's ELBO and the
  VAE's refinement curves, every summary with a value per seed."""
  path = os.path.join(workdir, "gaps.json")
  if not os.path.exists(path):
    return None
  remedy = "rerun experiments.gaps on that run or remove the file"
  gaps = runs.read_json(path, remedy)
  seeds = gaps.get("seeds") if isinstance(gaps, dict) else None
  if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds):
    raise ConfigError(f"{path} lists no distinct seeds under 'seeds'; {remedy}.")

  def per_seed(summary, where: str) -> None:
    values = summary.get("per_seed") if isinstance(summary, dict) else None
    if (not isinstance(values, list) or len(values) != len(seeds)
        or not all(isinstance(v, (int, float)) for v in values)):
      raise ConfigError(f"{path}: {where} is not a summary with a number for each of its "
                        f"{len(seeds)} seeds under 'per_seed'; {remedy}.")

  for key, value in gaps.items():
    if isinstance(value, dict) and "share_of_vae_amortization_gap_closed" in value:
      per_seed(value["share_of_vae_amortization_gap_closed"],
               f"{key}.share_of_vae_amortization_gap_closed")
  worth = gaps.get("refinement_steps_worth", {})
  if not isinstance(worth, dict):
    raise ConfigError(f"{path}: refinement_steps_worth is not a mapping of model; {remedy}.")
  for model in worth:
    elbo = gaps.get(model)
    for name in ("refinement", "elbo"):
      elbo = elbo.get(name) if isinstance(elbo, dict) else None
    if elbo is None:
      raise ConfigError(f"{path} has no {model}.refinement.elbo; {remedy}.")
    if not isinstance(elbo, list) or not elbo:
      raise ConfigError(f"{path}: {model}.refinement.elbo is not a non-empty list; {remedy}.")
    per_seed(elbo[0], f"{model}.refinement.elbo[0]")
  curves = gaps.get("vae_refinement") if worth else {}
  if not isinstance(curves, dict):
    raise ConfigError(f"{path} has no vae_refinement mapping of the VAE's refinement curves, "
                      f"which its refinement_steps_worth needs; {remedy}.")
  for label, curve in curves.items():
    steps, elbo = (curve.get(key) if isinstance(curve, dict) else None for key in ("steps", "elbo"))
    if not isinstance(steps, list) or not isinstance(elbo, list) or len(steps) != len(elbo):
      raise ConfigError(f"{path}: vae_refinement.{label} does not hold lists 'steps' and 'elbo' "
                        f"of the same length; {remedy}.")
    for i, summary in enumerate(elbo):
      per_seed(summary, f"vae_refinement.{label}.elbo[{i}]")
  return gaps


def early_stopping(workdir: str, run: dict, seeds: Sequence[int], models: Sequence[str]) -> dict:
  """How early stopping went for each of the run's stage-2 ``models`` (run: its results.json),
  from DIR/metrics.jsonl: {"patience_steps": their patience in optimiser steps
  (``image_vae.stage_schedule``), "models": {model: {"longest_wait_steps": the longest wait for
  an improvement of the validation ELBO, in steps, over every seed, and "lost_at_half_patience":
  how much lower, in mean over seeds, the selected validation ELBO would have been had training
  stopped after half the patience (``training.patience_check``; both None without
  metrics.jsonl), "seeds_at_epoch_cap": how many of ``seeds`` selected an epoch within the
  patience of --iavae_epochs, their validation ELBO still rising when the cap ended them}}}."""
  recorded = run["config"]
  known = {field: recorded[field] for field in ("batch_size", "vae_epochs", "iavae_epochs",
                                                "patience", "stage2_patience_steps")
           if field in recorded}
  steps_per_epoch = run["data"]["train"] // recorded["batch_size"]
  schedule = image_vae.stage_schedule(hparams.ImageVAEConfig(**known), "iavae", steps_per_epoch)
  metrics = os.path.join(workdir, "metrics.jsonl")
  curves = progress.read_learning_curves(metrics) if os.path.exists(metrics) else {}
  index = {seed: i for i, seed in enumerate(run["seeds"])}
  checks = {}
  for model in models:
    entry = run["models"][model]
    checks[model] = {"longest_wait_steps": None, "lost_at_half_patience": None,
                     "seeds_at_epoch_cap": sum(
                         entry["best_epoch"][index[seed]] > schedule.max_epochs - schedule.patience
                         for seed in seeds)}
    if model in curves:
      starts = ((recorded.get("start_as_candidate", True) and entry.get("valid_elbo_at_start"))
                or [None] * len(run["seeds"]))
      waits, lost = zip(*(training.patience_check(curves[model]["epoch"], column,
                                                  schedule.patience, start)
                          for column, start in zip(curves[model]["valid_elbo"].T, starts)))
      checks[model].update(longest_wait_steps=max(waits) * steps_per_epoch,
                           lost_at_half_patience=float(sum(lost) / len(lost)))
  return {"patience_steps": schedule.patience * steps_per_epoch, "models": checks}
