"""The synthetic oracle experiment: train, evaluate, report (paper section 4.1, Tables 2-3,
Figures 6-7), plus an exact decomposition of the inference gap.

Three populations are trained, each as one vmapped, scanned computation
(``synthetic_vae.population_epoch_fn`` scans ``synthetic_vae.train_step`` over the batches):
  vae   : num_vae_seeds VAEs (encoder width ``encoder_width``; the decoder is the fixed truth);
  iavae : for each VAE, num_iavae_seeds IA-VAEs on its frozen encoder (hypernetwork and block
          embeddings trained, nothing else);
  sweep : VAEs of every width in ``sweep_widths``, num_sweep_seeds each, zero-padded to the
          widest so that they train side by side (see models.encoders.pad_hidden).
Every number reported is computed from the trained parameters in this run: ELBOs and KLs in
closed form (models.oracle.exact_elbo), log p(x), the MAP and the local Gaussian on a quadrature
grid (posterior.py), q* by per-example Newton on the exact ELBO. The VAEs and IA-VAEs are then
evaluated the same way on a held-out set from the same generator (``heldout_data``), with the
per-point tail of IA-VAE against its VAE (``iavae_jax.exact``).
"""

import dataclasses
import os
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from iavae_jax import (errors, exact, plots, runs, stages, synthetic_vae,
                       training)
from iavae_jax import parallel as parallel_lib
from iavae_jax.data import synthetic
from experiments import configs, tables
from experiments.configs import SyntheticConfig


def model_keys(config: SyntheticConfig, population: str, indices: list[tuple[int, ...]]):
  """Init and training keys [M, 2], and data-order seeds [M, K], for the population's models
  named by index tuples (``training.population_keys`` under (seed, its key id))."""
  return training.population_keys(
      indices, prefix=(config.seed, configs.SYNTHETIC_POPULATIONS[population].key_id))


def train_stage(name: str, workdir: str, config: SyntheticConfig, encode: Callable,
                params, frozen, train_keys, order_seeds, data,
                parallel: parallel_lib.Parallel | None = None,
                tensorboard: bool = False, start_as_candidate: bool = False,
                cancelled=None) -> training.TrainState:
  """Trains (or resumes, or just loads) one population; returns its final states. frozen: the
  models' frozen encoders, stacked (None for VAEs). With ``start_as_candidate``, every model's
  starting point is scored on the data and is a model-selection candidate (epoch 0)."""
  population = configs.SYNTHETIC_POPULATIONS[name]
  loop_emitters = synthetic_vae.LOOP_EMITTERS[population.kind]
  epoch_fn, optimizer = synthetic_vae.population_epoch_fn(
      config, encode, parallel, compiler_options=training.cpu_compiler_options(loop_emitters))
  schedule = training.Schedule(config.batch_size, config.max_epochs, config.patience)
  scores = (jax.jit(jax.vmap(synthetic_vae.exact_score(config, encode), in_axes=(0, 0, None)))(
      params, frozen, data.T) if start_as_candidate else None)
  states = jax.vmap(lambda p, k, f, s: training.init_state(p, optimizer, k, f, s))(
      params, train_keys, frozen, scores)
  names = [population.model_name.format(*map(int, row[2:])) for row in order_seeds]
  return stages.run_stage(name, workdir, epoch_fn, states, data, order_seeds, schedule,
                          config.checkpoint_every, config.epochs_per_call, names, parallel,
                          tensorboard, cancelled)


def heldout_data(config: SyntheticConfig) -> synthetic.SyntheticData:
  """The held-out set: as many new points from the same generator, under another key (the data
  key folded with 1), so every model meets them first at evaluation."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.data_seed), 1)
  return synthetic.generate(key, config.num_examples, config.sigma)


def train_vaes(config: SyntheticConfig, workdir: str, x: jax.Array,
               parallel: parallel_lib.Parallel | None, tensorboard: bool):
  """Stage 1: the population of VAEs (encoders; the decoder is the known truth)."""
  init_keys, train_keys, order_seeds = model_keys(
      config, "vae", [(v,) for v in range(config.num_vae_seeds)])
  return train_stage("vae", workdir, config, synthetic_vae.vae_train_encode,
                     synthetic_vae.init_vaes(init_keys, [config.encoder_width], x[0]), None,
                     train_keys, order_seeds, x, parallel, tensorboard)


def train_iavaes(config: SyntheticConfig, workdir: str, x: jax.Array, phi_avi,
                 parallel: parallel_lib.Parallel | None, tensorboard: bool):
  """Stage 2: num_iavae_seeds IA-VAEs on each VAE's frozen encoder phi_avi (a leading axis of
  VAEs). Returns (their states, their synthetic_vae.IAVAEs)."""
  indices = [(v, s) for v in range(config.num_vae_seeds) for s in range(config.num_iavae_seeds)]
  init_keys, train_keys, order_seeds = model_keys(config, "iavae", indices)
  iavaes = synthetic_vae.init_iavaes(config, phi_avi, init_keys, x)
  return train_stage("iavae", workdir, config, iavaes.train_encode, iavaes.params, iavaes.frozen,
                     train_keys, order_seeds, x, parallel, tensorboard,
                     config.start_as_candidate), iavaes


def train_sweep(config: SyntheticConfig, workdir: str, x: jax.Array,
                parallel: parallel_lib.Parallel | None, tensorboard: bool, cancelled):
  """Stage 3: VAEs of every width of the sweep, zero-padded to the widest."""
  indices = [(w, s) for w in config.sweep_widths for s in range(config.num_sweep_seeds)]
  init_keys, train_keys, order_seeds = model_keys(config, "sweep", indices)
  return train_stage("sweep", workdir, config, synthetic_vae.vae_train_encode,
                     synthetic_vae.init_vaes(init_keys, [w for w, _ in indices], x[0]), None,
                     train_keys, order_seeds, x, parallel, tensorboard, cancelled=cancelled)


def save_figures(config: SyntheticConfig, workdir: str, data: synthetic.SyntheticData,
                 summary, vae_means, iavae_means, efficiency_entry: dict) -> list[int]:
  """Figure 6 (two random observations: their posterior, VAE seed 0 and its first IA-VAE) and
  Figure 7; returns Figure 6's examples."""
  rng = np.random.default_rng(config.seed)
  chosen = rng.choice(config.num_examples, size=2, replace=False)
  panels = exact.posterior_panels(data, summary, vae_means, iavae_means, config.sigma, chosen)
  runs.save_figure(plots.posterior_figure(panels),
                   os.path.join(workdir, "figure6_posterior.png"))
  curve = efficiency_entry["vae_curve"]
  runs.save_figure(plots.efficiency_figure(
      [c["params"] for c in curve], [c["elbo"] for c in curve], [c["elbo_std"] for c in curve],
      efficiency_entry["iavae_params"], efficiency_entry["iavae_elbo"],
      efficiency_entry["iavae_elbo_std"]), os.path.join(workdir, "figure7_efficiency.png"))
  return [int(i) for i in chosen]


class Trained(NamedTuple):
  """The three populations after training, and what evaluating the IA-VAEs needs."""
  vae: training.TrainState       # stage 1, a leading axis of VAEs
  iavae: training.TrainState     # stage 2, VAE-major: num_iavae_seeds per VAE
  sweep: training.TrainState     # stage 3, width-major
  iavaes: synthetic_vae.IAVAEs   # stage 2's layout, frozen encoders and encode functions


def train_all(config: SyntheticConfig, workdir: str, x: jax.Array,
              parallel: parallel_lib.Parallel | None, tensorboard: bool,
              timings: dict) -> tuple[Trained, exact.Truth]:
  """Stages 1-3 and the truth on x (the seconds of each in timings)."""
  def sweep_and_posterior(cancelled):
    t0 = time.time()
    sweep_states = train_sweep(config, workdir, x, parallel, tensorboard, cancelled)
    timings["sweep"] = time.time() - t0
    if cancelled():
      raise errors.Cancelled("posterior")
    t0 = time.time()
    truth = exact.true_posterior(x, config.sigma)   # log p(x), the MAP, q*
    timings["posterior"] = time.time() - t0
    return sweep_states, truth

  # Stage 3 and the posterior need nothing from stages 1-2: with one device of one process they
  # run on a second thread meanwhile (on a CPU, a second core), else after them.
  background = (stages.Background(sweep_and_posterior) if (parallel is None or parallel.mode ==
                "none") and jax.process_count() == 1 else None)
  t0 = time.time()
  vae_states = train_vaes(config, workdir, x, parallel, tensorboard)
  timings["vae"] = time.time() - t0
  t0 = time.time()
  iavae_states, iavaes = train_iavaes(
      config, workdir, x, vae_states.best_params, parallel, tensorboard)
  timings["iavae"] = time.time() - t0
  sweep_states, truth = background.result() if background else sweep_and_posterior(
      lambda: False)
  return Trained(vae_states, iavae_states, sweep_states, iavaes), truth


def evaluate_all(config: SyntheticConfig, x: jax.Array, trained: Trained, truth: exact.Truth,
                 timings: dict) -> dict:
  """Every model on x in closed form, and the VAEs and IA-VAEs on the held-out data: NumPy
  metrics ("vae", "iavae", "sweep"), means and per-point ELBOs, and the held-out summary."""
  t0 = time.time()
  vae_fn = synthetic_vae.vae_encode(config.encoder_width)

  def evaluate_pair(x, truth):
    """The VAEs and IA-VAEs on data x: NumPy metrics, means and per-point ELBOs of each."""
    args = (x, config.sigma, truth.summary, truth.elbo_qstar)
    return (jax.tree.map(np.asarray, exact.evaluate(vae_fn, trained.vae.best_params, None,
                                                    *args)),
            jax.tree.map(np.asarray, exact.evaluate(trained.iavaes.encode,
                                                    trained.iavae.best_params,
                                                    trained.iavaes.frozen, *args)))

  (vae, vae_means, vae_points), (iavae, iavae_means, iavae_points) = evaluate_pair(x, truth)
  sweep, _, _ = jax.tree.map(np.asarray, exact.evaluate(
      synthetic_vae.vae_encode(max(config.sweep_widths)), trained.sweep.best_params, None, x,
      config.sigma, truth.summary, truth.elbo_qstar))
  timings["evaluation"] = time.time() - t0

  # Held-out: the same models on new points from the same generator, the truth computed alike.
  t0 = time.time()
  heldout_x = heldout_data(config).x
  heldout_truth = exact.true_posterior(heldout_x, config.sigma)
  (ho_vae, _, ho_vae_points), (ho_iavae, _, ho_iavae_points) = evaluate_pair(heldout_x,
                                                                             heldout_truth)
  heldout = {"vae": exact.table3_entry(ho_vae), "iavae": exact.table3_entry(ho_iavae),
             "gaps": exact.gap_decomposition(heldout_truth, ho_vae, ho_iavae,
                                             config.num_iavae_seeds),
             "tail": exact.tail_summary(heldout_x, ho_vae_points, ho_iavae_points,
                                        heldout_truth.elbo_qstar, x),
             "train_tail": exact.tail_summary(x, vae_points, iavae_points, truth.elbo_qstar)}
  timings["heldout"] = time.time() - t0
  return {"vae": vae, "iavae": iavae, "sweep": sweep, "vae_means": vae_means,
          "iavae_means": iavae_means, "heldout": heldout}


def train_and_evaluate(config: SyntheticConfig, workdir: str,
                       parallel: parallel_lib.Parallel | None = None,
                       tensorboard: bool = False) -> dict:
  """Runs the whole protocol in workdir (resuming what is there) and writes every output (with
  ``tensorboard``, TensorBoard event files too); with a ``parallel``, the populations train on
  its devices (``iavae_jax.parallel``)."""
  config.validate()
  runs.prepare_workdir(workdir, config)
  start = time.time()
  data = synthetic.generate(jax.random.PRNGKey(config.data_seed), config.num_examples,
                            config.sigma)
  print(f"config: {config}", flush=True)
  timings = {}
  trained, truth = train_all(config, workdir, data.x, parallel, tensorboard, timings)
  timings = {k: timings[k] for k in (*configs.SYNTHETIC_POPULATIONS, "posterior")}
  evaluated = evaluate_all(config, data.x, trained, truth, timings)
  vae, iavae = evaluated["vae"], evaluated["iavae"]
  efficiency_entry = {  # Figure 7's numbers
      **synthetic_vae.param_counts(config, trained.iavaes.layout),
      **exact.efficiency_curve(config.sweep_widths, evaluated["sweep"]["elbo"], iavae["elbo"],
                               lambda width: 8 * width + 4)}   # MLPEncoder's parameters
  results = {
      "config": dataclasses.asdict(config),
      "table2": exact.table2(vae, iavae, trained.vae.best_epoch, trained.iavae.best_epoch),
      "table3": {"vae": exact.table3_entry(vae), "iavae": exact.table3_entry(iavae)},
      "efficiency": efficiency_entry,
      "gaps": exact.gap_decomposition(truth, vae, iavae, config.num_iavae_seeds),
      "heldout": evaluated["heldout"],
      # Per example, the decoder passes of each model's inference (the feedback's, see
      # synthetic_vae.decoder_passes).
      "decoder_passes_per_example": {"vae": 0, "iavae": synthetic_vae.decoder_passes(config)},
      "figure6_examples": save_figures(config, workdir, data, truth.summary,
                                       evaluated["vae_means"], evaluated["iavae_means"],
                                       efficiency_entry),
      "stage_seconds": timings,
      "wall_seconds": time.time() - start,
      "environment": runs.environment(parallel),
  }
  runs.write_results(workdir, results, tables.synthetic(results), config,
                     "synthetic oracle experiment: a line per model")
  return results


