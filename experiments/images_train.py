"""The image experiments: stage 1 VAE, stage 2 IA-VAE, the epoch-matched control, ablations,
evaluation.

The models, their optimisers and their train steps are iavae_jax.image_vae's; this module trains
the models of ``config.models`` (``MODEL_SPECS``) for each seed, one after the other, each alone:
``image_vae.stage_epoch_fn`` loops ``image_vae.train_step`` over an epoch's batches in Python
(XLA:CPU is slow on convolution gradients inside lax.scan), and ``training`` and ``stages``
add early stopping, Orbax checkpoints, resume and the learning curves:
  vae     : the VAE (``image_vae.Model``), KL warm-up;
  iavae   : the VAE's encoder frozen as phi_AVI, batch-norm statistics frozen; the
            hypernetwork, its embeddings and the decoder trained (paper section 4.2);
  control : the VAE trained on from its best parameters with stage 2's schedule, optimiser,
            learning rates, weight decay and frozen batch-norm statistics, the encoder itself in
            the hypernetwork's place: so a gain of IA-VAE over the control is not just extra
            training. (Matched in epochs, not FLOPs: an IA-VAE step costs more. Weight decay
            pulls the control's encoder toward 0 and the IA-VAE's hypernetwork toward phi_AVI.)
and the ablations that isolate what instance adaptation buys:
  iavae_frozen_decoder, control_frozen_decoder : stage 2 with the VAE's decoder frozen, so that
            only inference can improve: any gain is amortization gap closed. They share the
            keys (initialisation, data order, noise) of iavae and control, for paired tests;
  vae_matched : a VAE whose encoder is widened (``image_vae.matched_model``) to at least as
            many parameters as the VAE's encoder plus the hypernetwork, trained as the VAE is;
  corrector, corrector_frozen_decoder : the hypernetwork's input into a network that corrects
            the frozen encoder's mean and log-variance directly (about as many parameters as
            the hypernetwork): does writing the encoder's parameters add anything over
            correcting its outputs?
  iavae_mean_context, iavae_frozen_decoder_mean_context (evaluated, not trained): the trained
            IA-VAE with the hypernetwork's input (with a feedback input, the feedback) replaced
            by its mean over the training split (``image_vae.mean_inputs``). What it keeps of
            its gain this way is not instance-specific.
Every model is selected on the validation ELBO and evaluated on the test split: ELBO and KL with
``test_samples`` samples per example, and an importance-weighted estimate of log p(x) with
``iwae_samples`` samples.
"""

import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import image_vae, plots, runs, stages, training
from iavae_jax import parallel as parallel_lib
from iavae_jax.data import images
from iavae_jax.image_vae import Model
from experiments import common, tables
from experiments.configs import EVAL_KEY_ID, MODEL_SPECS, ImageConfig, ablated, evaluated_models


class Selected(NamedTuple):
  """A trained model as selected on the validation ELBO."""
  params: dict          # its best parameters
  frozen: dict | None   # what it uses but did not train (TrainState.frozen)
  best_epoch: int       # 0: its starting point (config.start_as_candidate)
  valid_elbo: float     # its validation ELBO (the selection score)
  valid_elbo_at_start: float | None   # of its starting point (stages 2 and 3; None in stage 1)


def train_seed(model: Model, workdir: str, seed: int, data: images.ImageSplits,
               timings: dict, resumed: list, parallel: parallel_lib.Parallel | None = None,
               tensorboard: bool = False) -> dict:
  """Trains the models ``config.models`` of one seed (resuming what is in workdir); returns
  them, {name: Selected}. Each model is trained alone (``image_vae.stage_epoch_fn``). The
  stage-2 models (IA-VAEs and controls) start from the VAE, scored before their first step
  (``image_vae.validation_score``): with config.start_as_candidate that start is selected
  unless an epoch scores higher. Stages that start from a checkpoint are appended to
  ``resumed``."""
  config = model.config
  train = jnp.asarray(data.train)
  valid = jnp.asarray(data.valid)
  if parallel is not None:
    valid = parallel.shared(valid)   # every device scores on the whole validation split
  selected = {}

  def run(name, spec, run_model, params, frozen):
    stage_name = f"{name}_seed{seed}"
    init_key, train_key = training.model_keys(seed, spec.key_id)
    t0 = time.time()
    if os.path.isdir(os.path.join(workdir, "checkpoints", stage_name)):
      resumed.append(stage_name)
    if params is None:
      params = run_model.init_vae(init_key)
    # Stage-2 models start from the VAE (Proposition 1 for the IA-VAE): their starting score.
    start = (None if spec.kind == "vae"
             else float(image_vae.validation_score(run_model, spec.kind)(params, frozen, valid)))
    state = stages.run_stage(
        stage_name, workdir,
        image_vae.stage_epoch_fn(run_model, spec.kind, stage_name, valid, train.shape[0],
                                 parallel, spec.freeze_decoder),
        training.init_state(params,
                            image_vae.stage_optimizer(config, spec.kind, spec.freeze_decoder),
                            train_key, frozen, start if config.start_as_candidate else None),
        train, np.array([seed, spec.key_id]),
        image_vae.stage_schedule(config, spec.kind, train.shape[0] // config.batch_size),
        config.checkpoint_every, parallel=parallel, tensorboard=tensorboard)
    timings[stage_name] = time.time() - t0
    selected[name] = Selected(state.best_params, state.frozen, int(state.best_epoch),
                              float(state.best_score), start)

  for name in ("vae",) + tuple(name for name in config.models if name != "vae"):
    vae = selected["vae"].params if name != "vae" else None
    run(name, MODEL_SPECS[name], *starting_point(model, name, seed, vae))
  return selected


def starting_point(model: Model, name: str, seed: int, vae: dict | None
                   ) -> tuple[Model, dict | None, dict | None]:
  """The model ``name``'s architecture, initial parameters (None: a fresh VAE's, drawn by the
  caller) and frozen inputs; the models of stage 2 start from the seed's trained VAE ``vae``."""
  spec = MODEL_SPECS[name]
  if spec.kind == "vae":
    return image_vae.matched_model(model) if spec.matched else model, None, None
  init_key = training.model_keys(seed, spec.key_id)[0]
  return model, *image_vae.stage_start(model, spec.kind, vae, init_key)


def evaluation_inputs(model: Model, name: str, selected: dict, train: jax.Array
                      ) -> tuple[Model, image_vae.EncodeFn, dict, dict | None]:
  """(model, encode, params, frozen) to evaluate the model ``name`` of ``evaluated_models``
  from a seed's trained models {name: Selected} (``train``: the training split, for the
  mean context)."""
  if ablated(name):
    iavae = selected[ablated(name)]
    frozen = {**iavae.frozen, **image_vae.mean_inputs(model, iavae.params, iavae.frozen, train,
                                                      model.config.eval_batch_size)}
    return model, image_vae.encode_fn(model, "iavae", frozen), iavae.params, frozen
  spec = MODEL_SPECS[name]
  run_model = image_vae.matched_model(model) if spec.matched else model
  params, frozen = selected[name].params, selected[name].frozen
  return run_model, image_vae.encode_fn(run_model, spec.kind, frozen), params, frozen


def load_data(config: ImageConfig, data_dir: str | None, source: str) -> images.ImageSplits:
  """The run's splits (``subset`` to the tier's sizes); bad data or sizes are a ConfigError."""
  try:
    data = images.load(config.dataset, data_dir=data_dir, source=source,
                       split_seed=config.split_seed)
  except images.DataError as e:
    raise common.ConfigError(str(e)) from e
  data = images.subset(data, config.max_train, config.max_valid, config.max_test)
  if data.train.shape[0] < config.batch_size:
    raise common.ConfigError(f"--batch_size={config.batch_size} exceeds the {data.train.shape[0]}"
                             " training examples (after --max_train): no full batch can be "
                             "formed.")
  return data


def evaluate_seed(model: Model, seed: int, selected: dict, train: jax.Array, test: jax.Array,
                  num_reconstructions: int) -> tuple[dict, dict]:
  """Every reported model of one seed on the test split: ({name: its results row}, {name: its
  reconstructions of the first num_reconstructions test images})."""
  config, rows, recon = model.config, {}, {}
  eval_key = training.derive_key(seed, EVAL_KEY_ID)
  for name in evaluated_models(config.models):
    run_model, encode, params, frozen = evaluation_inputs(model, name, selected, train)
    metrics = jax.device_get(image_vae.evaluate(
        run_model, encode, params, frozen, test, eval_key, test_samples=config.test_samples,
        iwae_samples=config.iwae_samples, iwae_chunk=config.iwae_chunk,
        chunk_size=config.eval_batch_size))
    # A mean-input ablation is its selected IA-VAE, not selected on its own score.
    source = selected[ablated(name) or name]
    rows[name] = {
        "test_elbo": float(np.mean(metrics["elbo"])), "test_kl": float(np.mean(metrics["kl"])),
        "test_iwae": float(np.mean(metrics["iwae"])),
        "valid_elbo": None if ablated(name) else source.valid_elbo,   # never scored
        "best_epoch": source.best_epoch}
    if not ablated(name) and source.valid_elbo_at_start is not None:
      rows[name]["valid_elbo_at_start"] = source.valid_elbo_at_start
    if num_reconstructions:
      recon[name] = np.asarray(image_vae.reconstruct(run_model, encode, params, frozen,
                                                     test[:num_reconstructions],
                                                     jax.random.fold_in(eval_key, 1)))
  return rows, recon


def collect_results(model: Model, data: images.ImageSplits, seeds: list, per_seed: dict,
                    timings: dict, resumed: list, wall_seconds: float,
                    parallel: parallel_lib.Parallel | None) -> dict:
  """results.json's contents: per model, its rows of every seed as lists."""
  config, names = model.config, list(per_seed)
  return {
      "experiment": "images",
      "dataset": config.dataset,
      "tier": config.tier,
      "seeds": seeds,
      "wall_seconds": wall_seconds,   # this invocation (see resumed_stages)
      "stage_seconds": timings,
      "resumed_stages": resumed,
      "models": {name: {key: [row[key] for row in per_seed[name]]
                        for key in per_seed[name][0]} for name in names},
      "data": {**data.info, "train": int(data.train.shape[0]), "valid": int(data.valid.shape[0]),
               "test": int(data.test.shape[0])},
      # Per example, the decoder passes (one sample's forward or backward pass each) that the
      # model's inference costs: its feedback's; 0 for a mean-input ablation (no feedback).
      "decoder_passes_per_example": {
          name: 0 if ablated(name) else model.decoder_passes(MODEL_SPECS[name].kind)
          for name in names},
      "parameters": {**image_vae.param_counts(model),
                     **({"matched_encoder": image_vae.param_counts(
                         image_vae.matched_model(model))["encoder"]}
                        if "vae_matched" in config.models else {})},
      "config": runs.as_json(config),
      "environment": runs.environment(parallel),
  }


def train_and_evaluate(config: ImageConfig, workdir: str, data_dir: str | None = None,
                       source: str = "auto", parallel: parallel_lib.Parallel | None = None,
                       tensorboard: bool = False) -> dict:
  """Runs the whole protocol for one data set in workdir and writes results.json, results.md,
  figure8_reconstructions.png, metrics.jsonl and learning_curves.png (and TensorBoard event
  files with ``tensorboard``). With a ``parallel`` in ``data`` mode, every training batch is
  split over its devices (the image seeds train one after another, so ``seeds`` mode does not
  apply: ``training.train_model`` refuses it)."""
  config.validate()
  model = Model(config)
  try:
    model.adapted_layout()
  except ValueError as e:
    raise common.ConfigError(f"--{e}") from None
  data = load_data(config, data_dir, source)
  runs.prepare_workdir(workdir, config, may_change=("num_seeds",))   # seeds added or left
  check_data(workdir, data.info)
  start = time.time()
  print(f"config: {config}", flush=True)
  print(f"data: {data.info}; train {data.train.shape[0]}, valid {data.valid.shape[0]}, "
        f"test {data.test.shape[0]}", flush=True)
  if config.tier == "paper" and data.info["paper_split"] is False:
    print(f"WARNING: this is not the paper's train/test split of {config.dataset} (for OMNIGLOT: "
          "Burda et al.'s chardata.mat in --data_dir); results.json and Table 4 say so.",
          flush=True)
  names = evaluated_models(config.models)
  timings, per_seed, recon, resumed = {}, {name: [] for name in names}, {}, []
  train, test = jnp.asarray(data.train), jnp.asarray(data.test)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  for seed in seeds:
    selected = train_seed(model, workdir, seed, data, timings, resumed, parallel, tensorboard)
    t0 = time.time()
    rows, seed_recon = evaluate_seed(model, seed, selected, train, test,
                                     config.num_reconstructions if seed == seeds[0] else 0)
    recon.update(seed_recon)
    for name in names:
      per_seed[name].append(rows[name])
    timings[f"eval_seed{seed}"] = time.time() - t0
    line = "  ".join(f"{name} {rows[name]['test_elbo']:.2f}" for name in names)
    print(f"[seed {seed}] test ELBO: {line}", flush=True)
    for name in config.models:
      if not np.isfinite(rows[name]["valid_elbo"]):
        print(f"[seed {seed}] WARNING: {name} never reached a finite validation ELBO (its "
              "training diverged); its test numbers are those of its initial parameters.",
              flush=True)

  results = collect_results(model, data, seeds, per_seed, timings, resumed,
                            time.time() - start, parallel)
  if recon:
    fig8 = plots.reconstruction_figure(
        np.asarray(data.test[:config.num_reconstructions]), recon,
        f"{config.dataset} ({config.tier} tier, seed {seeds[0]}): test images and x' ~ p(x | z = "
        "mean of q(z | x)), drawn pixel by pixel")
    runs.save_figure(fig8, os.path.join(workdir, "figure8_reconstructions.png"))
  runs.write_results(workdir, results, tables.image_run(results), config,
                     f"{config.dataset} ({config.tier} tier): a line per seed")
  return results


def check_data(workdir: str, info: dict) -> None:
  """Records the data's description in workdir/data.json, or refuses data other than the
  recorded (another --data_dir or --source would resume checkpoints trained on other data)."""
  details = runs.record_or_compare(os.path.join(workdir, "data.json"),
                                   json.loads(json.dumps(info)), "use a new --workdir")
  if details:
    raise common.ConfigError(f"--workdir={workdir} holds a run on other data ({details}); use "
                             "the same --data_dir and --source to resume, or a new --workdir.")
