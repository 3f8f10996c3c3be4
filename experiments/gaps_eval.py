"""The gap decomposition and the refinement curve of every model of an experiments.images run.

The models are those the run's results.json lists, for each of its seeds, each the model its
stage selected (``image_vae.load_trained`` from DIR/checkpoints/{model}_seed{seed}: its kind,
and so its encoder, follows from its parameters). The examples are the first N
images of the test split (``images.load``'s, permuted by split_seed, not capped by max_test, so
its first max_test images are those results.json was evaluated on); what is measured per
example is ``iavae_jax.gap_runs``'s, each example's noise from (seed, its index). Outputs
(gaps.json, gaps.md, gaps_refinement.png, gaps_passes.png) and their schema: docs/cli.md.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import gap_runs, gaps, image_runs, image_vae, runs
from iavae_jax.data import images
from iavae_jax.image_vae import Model
from experiments import common, configs
from experiments.configs import GapsConfig, ImageConfig

GAPS_KEY = 5    # folded into the seed's key: apart from the training stages' keys (1 to 4)


def measure(image_config: ImageConfig, config: GapsConfig, workdir: str,
            data_dir: str | None = None) -> dict:
  """Measures every model and seed of the run in workdir; writes gaps.json and gaps.md."""
  start = time.time()
  model = Model(image_config)
  seeds, names = image_runs.run_models(workdir)
  train, valid, test = run_images(image_config, workdir, data_dir)
  valid, test = valid[..., None], test[..., None]   # as the decoder reads them
  loaded = {(name, seed): load_model(model, workdir, name, seed, train)
            for seed in seeds for name in names}
  num_examples = min(config.num_examples or test.shape[0], test.shape[0])
  if config.num_examples > test.shape[0]:
    print(f"note: the test split has {test.shape[0]} images; measuring all of them "
          f"(--num_examples={config.num_examples} asked for more)", flush=True)
  partial_dir = prepare_output(workdir, config, num_examples)

  functions = Functions(model, config)
  jobs = [(name, seed) for seed in seeds for name in names]
  progress = gap_runs.Progress(len(jobs) * (num_examples + 2 * min(config.convergence_examples,
                                                                   num_examples)))
  per_job = {}
  for name, seed in jobs:   # each record saved in gaps/ after every chunk: a rerun goes on
    model_seed = loaded[name, seed]
    per_job[name, seed] = gap_runs.measure_saved(
        functions.measure, functions.encoder(model_seed), model_seed.params["decoder"],
        test[:num_examples], example_root(seed), config.batch_size, config.convergence_examples,
        os.path.join(partial_dir, f"{name}_seed{seed}.json"), model_seed.source,
        f"{name} seed {seed}", progress, functools.partial(functions.compile_for, model_seed))

  results = gap_runs.summarize(per_job, names, seeds, functions.measure,
                               config.convergence_tolerance)
  results["decoder_passes_per_example"] = image_runs.decoder_passes(workdir, names)
  if "vae" in names:
    results.update(compare_with_refinement(
        model, config, functions, results, {seed: loaded["vae", seed] for seed in seeds},
        [name for name in names if name != "vae" and all(
            _same_decoder(loaded[name, seed], loaded["vae", seed]) for seed in seeds)],
        valid, test[:num_examples], partial_dir))
  results.update({
      "dataset": image_config.dataset, "tier": image_config.tier, "num_examples": num_examples,
      "settings": runs.as_json(config), "wall_seconds": time.time() - start,
      "environment": runs.environment(None)})
  runs.write_json(os.path.join(workdir, "gaps.json"), results)
  runs.write_text(os.path.join(workdir, "gaps.md"), gap_runs.markdown(results))
  description = (f"{image_config.dataset} ({image_config.tier} tier), {num_examples} test images, "
                 f"seeds {seeds}")
  runs.save_figure(gap_runs.refinement_figure(
      results, f"SA-VAE's test-time refinement from each model's encoder: {description}"),
      os.path.join(workdir, "gaps_refinement.png"))
  if "vae_refinement" in results:
    runs.save_figure(gap_runs.passes_figure(results, description),
                     os.path.join(workdir, "gaps_passes.png"))
  print(f"wrote {workdir}/gaps.json ({results['wall_seconds']:.1f} s)", flush=True)
  return results


# Reading the run (nothing is written here: bad input leaves the workdir as it was).

def load_model(model: Model, workdir: str, name: str, seed: int,
               train: np.ndarray) -> image_vae.Trained:
  """Model ``name`` of ``seed`` (``image_runs.load``); the mean-context IA-VAE is the seed's
  IA-VAE with the hypernetwork's input averaged over ``train`` (the run's training split);
  ``vae_matched`` has its widened encoder."""
  if configs.ablated(name):
    return image_runs.with_mean_input(
        model, load_model(model, workdir, configs.ablated(name), seed, train), train)
  spec = configs.MODEL_SPECS.get(name)
  return image_runs.load(image_vae.matched_model(model) if spec and spec.matched else model,
                         workdir, name, seed)


def run_images(config: ImageConfig, workdir: str, data_dir: str | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The run's training images [n, 28, 28] (grey, capped by max_train as the run used them), its
  validation images (in {0, 1}, capped by max_valid) and its test split [N, 28, 28] in {0, 1}
  (not capped), ``image_runs.run_data``."""
  data = image_runs.run_data(workdir, config.dataset, config.split_seed, data_dir)
  used = images.subset(data, config.max_train, config.max_valid, config.max_test)
  return used.train, used.valid, data.test


def prepare_output(workdir: str, config: GapsConfig, num_examples: int) -> str:
  """The first write into the workdir (experiments.gaps holds its lock): DIR/gaps/ with the
  settings of these measurements, or a check that they are those of the partial results already
  there. Returns DIR/gaps."""
  partial_dir = os.path.join(workdir, "gaps")
  os.makedirs(partial_dir, exist_ok=True)
  details = runs.record_or_compare(os.path.join(partial_dir, "settings.json"),
                                   {**runs.as_json(config), "num_examples": num_examples},
                                   f"delete {partial_dir} to start over")
  if details:
    raise common.ConfigError(
        f"{partial_dir} holds measurements with other settings ({details}). Use the same flags "
        f"to resume them, or delete {partial_dir} to start over with these.")
  return partial_dir


# The measurements (iavae_jax.gap_runs), each chunk saved as it is done.

def example_root(seed: int) -> jax.Array:
  """The root of the seed's example keys (``gap_runs.example_keys``)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), GAPS_KEY)


class Functions:
  """The run's measurements on the model's decoder (``image_vae.gap_measurements`` with the
  GapsConfig's settings, or the refinement ``refine`` for ``refine_steps``), and the compiled
  encoder of each loaded model."""

  def __init__(self, model: Model, config: GapsConfig,
               refine: gaps.RefineSettings | None = None, refine_steps: tuple | None = None):
    self.config, self.encoders = config, {}
    self.measure = image_vae.gap_measurements(
        model, *gap_runs.measurement_args(config, refine, refine_steps))

  def _compiled(self, loaded: image_vae.Trained) -> gaps.Compiled:
    """Shared by the models of one encoder function and frozen-input structure (the seeds of a
    model; the mean-context IA-VAE has its own)."""
    key = (loaded.encode, jax.tree.structure(loaded.frozen))
    if key not in self.encoders:
      self.encoders[key] = gaps.Compiled(loaded.encode)
    return self.encoders[key]

  def encoder(self, loaded: image_vae.Trained) -> gap_runs.EncodeChunk:
    """The loaded model's compiled encoder on a chunk x [B, 28, 28, 1]."""
    return functools.partial(self._compiled(loaded), loaded.params, loaded.frozen)

  def compile_for(self, loaded: image_vae.Trained) -> None:
    """Compiles the loaded model's encoder and every measurement of a chunk, running none."""
    size = self.config.batch_size
    x, keys = jnp.zeros((size, 28, 28, 1)), gap_runs.example_keys(example_root(0), 0, size)
    mean, log_var = self._compiled(loaded).compile(loaded.params, loaded.frozen, x)
    self.measure.compile(loaded.params["decoder"], x, mean, log_var, keys)


# Refinement from the VAE's encoder on the VAE's decoder: SA-VAE's settings and a tuned variant,
# and what each amortized model on that decoder is worth in its steps.

_TUNE = 7   # folded into a validation image's key: apart from the test images' purposes


def _same_decoder(loaded: image_vae.Trained, other: image_vae.Trained) -> bool:
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params["decoder"]),
                                                   jax.tree.leaves(other.params["decoder"])))


def refinement_curve(functions: Functions, loaded: image_vae.Trained, x: np.ndarray, seed: int,
                     purpose: int | None = None) -> np.ndarray:
  """``gap_runs.refinement_curve`` from the model's encoder on images x [n, 28, 28, 1], with
  the seed's example keys: [n, 1 + len(steps)]."""
  return gap_runs.refinement_curve(functions.measure, functions.encoder(loaded),
                                   loaded.params["decoder"], x, example_root(seed),
                                   functions.config.batch_size, purpose)


def tune_refinement(model: Model, config: GapsConfig, functions: Functions, vae: image_vae.Trained,
                    valid: np.ndarray, seed: int) -> dict:
  """The VAE's refinement tuned on validation images valid [n, 28, 28, 1]
  (``gap_runs.tune_refinement``, every candidate within tune_budget decoder passes per image,
  with SA-VAE's first step as a diagnostic)."""
  tuning = gap_runs.tune_refinement(
      lambda settings, steps: Functions(model, config, settings, (steps,)).measure,
      functions.encoder(vae), vae.params["decoder"], valid, example_root(seed),
      config.batch_size, config.tune_budget, _TUNE,
      on_candidate=lambda c: print(f"[gaps] tuning the VAE's refinement: {c}", flush=True))
  if tuning["chosen"] is None:
    raise common.ConfigError(
        f"every refinement candidate diverged on the {valid.shape[0]} validation images of "
        f"seed {seed}'s VAE: no tuned variant to measure; rerun with --tune_examples=0.")
  return {"examples": int(valid.shape[0]), "seed": seed, "budget": config.tune_budget,
          **tuning}


def compare_with_refinement(model: Model, config: GapsConfig, functions: Functions,
                            results: dict, vaes: dict, shared: list, valid: np.ndarray,
                            test: np.ndarray, partial_dir: str) -> dict:
  """gaps.json's refinement from the VAE's encoder on its decoder, SA-VAE's and, with
  tune_examples, the tuned variant's (resumed from DIR/gaps/tuned_refinement.json), against the
  models on that decoder (``gap_runs.refinement_comparison``)."""
  configured, tuned = functions.measure.refine_settings, None
  if config.tune_examples:
    seed = min(vaes)
    refine_with = functools.cache(lambda settings: Functions(model, config, settings))
    tuned = gap_runs.tuned_curves(
        os.path.join(partial_dir, "tuned_refinement.json"), list(vaes), configured,
        lambda: tune_refinement(model, config, functions, vaes[seed],
                                valid[:config.tune_examples], seed),
        lambda s, settings: np.mean(refinement_curve(refine_with(settings), vaes[s], test, s),
                                    axis=0).tolist())
  return gap_runs.refinement_comparison(results, shared, configured, tuned)
