"""The gap decomposition of an amortized encoder over a data set, and its summary over seeds.

``measure_examples`` runs ``gaps.Measurements`` on a data set chunk by chunk and keeps each
example's results in a record (a dictionary of lists that reads back from JSON), so a caller
that saves the record after every chunk can resume where it stopped; ``check_convergence`` adds
q* with the doubled budget on the first examples, ``refinement_curve`` gives the refinement
curve alone, and ``summarize`` turns the records of several models and seeds into means,
standard deviations and the share of the VAE's amortization gap each model closes.
``measure_saved`` runs both on one model with its record in a JSON file, saved after every chunk
and resumed from it, and a line of ``Progress`` per chunk.

Each example's noise comes from its own key, ``example_keys(root, i)`` for example i, so the
results do not depend on the chunk size, on interruptions (up to rounding) or on which model is
measured: models measured from one root are compared on the same noise.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import gaps, hparams, runs, stats
from iavae_jax.errors import ConfigError

__all__ = ["PHASES", "EncodeChunk", "OnChunk", "measurement_args", "example_keys", "pad",
           "new_record", "measure_examples", "check_convergence", "Progress", "measure_saved",
           "refinement_curve", "FIRST_STEP_SAMPLES", "tune_refinement", "tuned_settings",
           "tuned_curves", "steps_worth", "refinement_comparison", "summarize_model", "summarize",
           "markdown", "refinement_figure", "passes_figure"]

# The timed phases of a record's "seconds".
PHASES = ("encode", "qstar", "elbo", "log_px", "refine", "refine_eval", "qstar_doubled")

# encode(x [B, ...]) -> (mean, log_var) [B, k]: the measured model's encoder on a chunk.
EncodeChunk = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
# on_chunk(record, units): called after every chunk (e.g. to save the record and say so).
OnChunk = Callable[[dict, int], None]


def measurement_args(settings: hparams.GapSettings, refine: gaps.RefineSettings | None = None,
                     refine_steps: tuple[int, ...] | None = None) -> tuple:
  """The arguments of ``gaps.Measurements`` after its log-likelihood that ``settings`` give
  (q*, the refinement, its step counts, the sample counts), the refinement and its step counts
  replaced by ``refine`` and ``refine_steps`` if given."""
  qstar = gaps.QStarSettings(
      learning_rate=settings.qstar_learning_rate, samples_per_step=settings.qstar_samples,
      check_every=settings.qstar_check_every, check_samples=settings.qstar_check_samples,
      patience=settings.qstar_patience, max_steps=settings.qstar_max_steps,
      sample_chunk=settings.sample_chunk)
  refine = refine or gaps.RefineSettings(
      learning_rate=settings.refine_learning_rate, momentum=settings.refine_momentum,
      max_grad_norm=settings.refine_max_grad_norm, samples_per_step=settings.refine_samples,
      optimizer=settings.refine_optimizer)
  return (qstar, refine, refine_steps or settings.refine_steps, settings.final_samples,
          settings.iwae_samples, settings.refine_eval_samples, settings.sample_chunk)


def example_keys(root: jax.Array, start: int, size: int) -> jax.Array:
  """The keys of examples start, ..., start + size - 1: fold_in(root, i). [size, 2]"""
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(start, start + size))


def pad(x: np.ndarray, size: int) -> jax.Array:
  """x [n <= size, ...] as float32 [size, ...], zero examples after the n."""
  padded = np.zeros((size, *x.shape[1:]), np.float32)
  padded[:x.shape[0]] = x
  return jnp.asarray(padded)


def new_record(source: str) -> dict:
  """An empty record of ``measure_examples`` for the model described by ``source`` (e.g. its
  checkpoint: a record of another source should not be resumed)."""
  return {"checkpoint": source, "examples_done": 0, "elbo": [], "elbo_qstar": [],
          "log_px": [], "qstar_steps": [], "refinement_elbo": [],
          "qstar_steps_computed": 0, "seconds": {phase: 0.0 for phase in PHASES},
          "convergence_done": 0, "elbo_qstar_doubled": [], "qstar_steps_doubled": []}


def _timed(seconds: dict, phase: str, fn, *args, **kwargs):
  """fn(*args, **kwargs), its wall seconds added to seconds[phase]."""
  begin = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  seconds[phase] += time.perf_counter() - begin
  return out


def _chunks(start: int, stop: int, size: int, x: np.ndarray, root: jax.Array):
  """(begin, count, padded chunk [size, ...], its keys) from example start to stop."""
  for begin in range(start, stop, size):
    count = min(size, stop - begin)
    yield begin, count, pad(x[begin:begin + count], size), example_keys(root, begin, size)


def measure_examples(measurements: gaps.Measurements, encode: EncodeChunk, decoder,
                     x: np.ndarray, root: jax.Array, batch_size: int, record: dict,
                     on_chunk: OnChunk | None = None) -> dict:
  """Per example of x [n, ...] (as the decoder reads them), with the decoder's parameters fixed:
  the encoder's ELBO L[q] (``final_samples``), q* found from the encoder's output and L[q*] on
  the same noise, log p^ with q* as the proposal, and the ELBO after each refinement step count
  (0 first); each phase's wall seconds. Chunks of batch_size examples from
  record["examples_done"] on (``new_record`` to start), each appended to ``record`` and then
  reported to on_chunk(record, its examples). Returns the record."""
  timed = functools.partial(_timed, record["seconds"])
  for begin, count, chunk, keys in _chunks(record["examples_done"], x.shape[0], batch_size, x,
                                           root):
    mean, log_var = timed("encode", encode, chunk)
    q = timed("qstar", measurements.optimal_gaussian, decoder, chunk, mean, log_var, keys,
              count)
    elbo = timed("elbo", measurements.elbo, decoder, chunk, mean, log_var, keys)
    elbo_qstar = timed("elbo", measurements.elbo, decoder, chunk, q.mean, q.log_var, keys)
    log_px = timed("log_px", measurements.log_px, decoder, chunk, q.mean, q.log_var, keys)
    refined = timed("refine", measurements.refine, decoder, chunk, mean, log_var, keys)
    curve = timed("refine_eval", measurements.refine_eval, decoder, chunk, refined.mean,
                  refined.log_var, keys)
    for field, values in (("elbo", elbo), ("elbo_qstar", elbo_qstar), ("log_px", log_px),
                          ("qstar_steps", q.steps), ("refinement_elbo", curve)):
      record[field] += np.asarray(values)[:count].tolist()
    record["qstar_steps_computed"] += batch_size * int(np.max(q.steps))  # the chunk's slowest
    record["examples_done"] = begin + count
    if on_chunk is not None:
      on_chunk(record, count)
  return record


def check_convergence(measurements: gaps.Measurements, encode: EncodeChunk, decoder,
                      x: np.ndarray, root: jax.Array, batch_size: int, num_examples: int,
                      record: dict, on_chunk: OnChunk | None = None) -> dict:
  """q* with the doubled budget (``QStarSettings.doubled``) on the first num_examples examples
  of x and the same noise, its L[q*] and steps appended to ``record`` ("elbo_qstar_doubled",
  "qstar_steps_doubled") chunk by chunk from record["convergence_done"] on, each chunk then
  reported to on_chunk(record, its examples). Returns the record."""
  for begin, count, chunk, keys in _chunks(record["convergence_done"], num_examples, batch_size,
                                           x, root):
    mean, log_var = encode(chunk)
    q = _timed(record["seconds"], "qstar_doubled", measurements.optimal_gaussian, decoder, chunk,
               mean, log_var, keys, count, doubled=True)
    elbo_qstar = measurements.elbo(decoder, chunk, q.mean, q.log_var, keys)
    record["elbo_qstar_doubled"] += np.asarray(elbo_qstar)[:count].tolist()
    record["qstar_steps_doubled"] += np.asarray(q.steps)[:count].tolist()
    record["convergence_done"] = begin + count
    if on_chunk is not None:
      on_chunk(record, count)
  return record


class Progress:
  """A line per chunk of a run of ``measure_saved`` jobs: where the job is, the run's share done
  and a rough ETA from this invocation's rate. Units: a measured example counts one, an example
  of the convergence check two (its q* runs at least twice as long)."""

  def __init__(self, total_units: int, prefix: str = "[gaps]"):
    self.total, self.prefix, self.done, self.done_here = total_units, prefix, 0, 0
    self.start = time.time()

  def skip(self, units: int) -> None:
    """Counts units done by an earlier invocation (not in the rate)."""
    self.done += units

  def update(self, units: int, line: str) -> None:
    self.done += units
    self.done_here += units
    eta = (self.total - self.done) * max(time.time() - self.start, 1e-9) / self.done_here
    print(f"{self.prefix} {line}  run {100 * self.done / self.total:.0f}% done, ETA "
          f"{_duration(eta)}", flush=True)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else
          f"{seconds // 60}m{seconds % 60:02d}s")


def measure_saved(measurements: gaps.Measurements, encode: EncodeChunk, decoder,
                  x: np.ndarray, root: jax.Array, batch_size: int, convergence_examples: int,
                  path: str, source: str, name: str, progress: Progress,
                  compile_fn: Callable[[], Any] | None = None) -> dict:
  """``measure_examples`` on x [n, ...], then ``check_convergence`` on its first
  convergence_examples, for the model described by ``source`` (e.g. its checkpoint), its record
  written to the JSON file ``path`` after every chunk (primary process only) and resumed from
  it: a record there of another source is a ConfigError, nothing run. ``compile_fn()``, if
  given, is called once before the first chunk (so the records' seconds leave compilation out).
  A line of ``progress`` per chunk, headed by ``name``. Returns the record."""
  record = runs.read_json(path) if os.path.exists(path) else new_record(source)
  if record["checkpoint"] != source:
    raise ConfigError(f"{path} measured {record['checkpoint']}, but the model is now {source}. "
                      f"Delete {path} to measure the model as it is now.")
  n, num_convergence = x.shape[0], min(convergence_examples, x.shape[0])
  progress.skip(record["examples_done"] + 2 * record["convergence_done"])
  if compile_fn is not None and (record["examples_done"] < n
                                 or record["convergence_done"] < num_convergence):
    compile_fn()

  def measured(record, count):
    runs.write_json(path, record)
    progress.update(count, f"{name}: {record['examples_done']}/{n} examples, L[q] "
                    f"{np.mean(record['elbo']):.2f}, L[q*] {np.mean(record['elbo_qstar']):.2f}"
                    f", log p^ {np.mean(record['log_px']):.2f}, q* steps "
                    f"{np.mean(record['qstar_steps']):.0f}")

  def checked(record, count):
    runs.write_json(path, record)
    done = record["convergence_done"]
    moved = np.mean(record["elbo_qstar_doubled"]) - np.mean(record["elbo_qstar"][:done])
    progress.update(2 * count, f"{name}: convergence check {done}/{num_convergence} examples, "
                    f"twice the budget moves L[q*] by {moved:+.4f}")

  args = (measurements, encode, decoder, x, root, batch_size)
  measure_examples(*args, record, measured)
  return check_convergence(*args, num_convergence, record, checked)


def refinement_curve(measurements: gaps.Measurements, encode: EncodeChunk, decoder,
                     x: np.ndarray, root: jax.Array, batch_size: int,
                     purpose: int | None = None) -> np.ndarray:
  """The ELBO after each of the measurements' refinement step counts (0 first), from the encoder
  on x [n, ...], example i's noise from example_keys(root, i) (with ``purpose`` folded into
  each key, for examples apart from the measured ones): [n, 1 + len(refine steps)]."""
  rows = []
  for _, count, chunk, keys in _chunks(0, x.shape[0], batch_size, x, root):
    if purpose is not None:
      keys = jax.vmap(lambda k: jax.random.fold_in(k, purpose))(keys)
    mean, log_var = encode(chunk)
    refined = measurements.refine(decoder, chunk, mean, log_var, keys)
    rows.append(np.asarray(measurements.refine_eval(decoder, chunk, refined.mean,
                                                    refined.log_var, keys))[:count])
  return np.concatenate(rows)


# SA-VAE's first refinement step with this many samples per step (tune_refinement's diagnostic).
FIRST_STEP_SAMPLES = (1, 10, 100)


def tune_refinement(measurements_for: Callable[[gaps.RefineSettings, int], gaps.Measurements],
                    encode: EncodeChunk, decoder, x: np.ndarray, root: jax.Array,
                    batch_size: int, budget: int, purpose: int | None = None,
                    on_candidate: Callable[[dict], Any] | None = None) -> dict:
  """The refinement from the encoder tuned on examples x (held out from those it is then
  measured on): ``gaps.tune_refinement``'s candidates within ``budget`` decoder passes per
  example, each scored by the mean ELBO after its steps (``refinement_curve`` with
  measurements_for(settings, steps), whose only refinement step count is ``steps``); then, as a
  diagnostic, SA-VAE's first step with FIRST_STEP_SAMPLES samples. Returns
  gaps.tune_refinement's dictionary and "sa_vae_first_step": [{"samples_per_step",
  "elbo_at_start", "elbo"}]."""
  def elbo_after(settings, steps):   # the mean ELBO at the start and after the steps
    curve = refinement_curve(measurements_for(settings, steps), encode, decoder, x, root,
                             batch_size, purpose)
    return tuple(map(float, np.mean(curve, axis=0)))
  tuning = gaps.tune_refinement(elbo_after, budget, on_candidate=on_candidate)
  first_step = [{"samples_per_step": samples, **dict(zip(
      ("elbo_at_start", "elbo"),
      elbo_after(dataclasses.replace(gaps.RefineSettings(), samples_per_step=samples), 1)))}
                for samples in FIRST_STEP_SAMPLES]
  return {**tuning, "sa_vae_first_step": first_step}


def tuned_settings(configured: gaps.RefineSettings, chosen: dict) -> gaps.RefineSettings:
  """The configured refinement with the optimiser, learning rate and samples per step of
  ``chosen`` (a candidate of ``tune_refinement``)."""
  return dataclasses.replace(configured, optimizer=chosen["optimizer"],
                             learning_rate=chosen["learning_rate"],
                             samples_per_step=chosen["samples_per_step"])


def tuned_curves(path: str, seeds: list, configured: gaps.RefineSettings,
                 tune: Callable[[], dict],
                 curve: Callable[[int, gaps.RefineSettings], list[float]]) -> dict:
  """The tuned refinement and its curve for each seed, kept in the JSON file ``path``, saved after
  each and resumed from it: {"tuning": tune() (``tune_refinement``'s dictionary, made once),
  str(seed): curve(seed, the configured refinement tuned as it chose) (the mean ELBO after each
  step count), ...}."""
  recorded = runs.read_json(path) if os.path.exists(path) else {}
  if "tuning" not in recorded:
    recorded["tuning"] = tune()
    runs.write_json(path, recorded)
  settings = tuned_settings(configured, recorded["tuning"]["chosen"])
  for seed in seeds:
    if str(seed) not in recorded:
      recorded[str(seed)] = curve(seed, settings)
      runs.write_json(path, recorded)
  return recorded


def steps_worth(curves: dict, target: dict) -> dict:
  """{label: the steps at which the refinement curve ``curves[label]`` (its "steps" and its
  "elbo" summaries over seeds) reaches ``target`` (a model's ELBO summary), interpolated
  (``gaps.steps_to_reach``)}."""
  return {label: gaps.steps_to_reach(curve["steps"], curve["elbo"], target, interpolate=True)
          for label, curve in curves.items()}


def refinement_comparison(results: dict, shared: list, configured: gaps.RefineSettings,
                          tuned: dict | None = None) -> dict:
  """What refinement from the VAE's encoder on its decoder is worth against the amortized models
  on that decoder: {"vae_refinement": {"sa_vae": the configured refinement's curve (``summarize``
  results' "vae"), "tuned": ``tuned_curves``' (if given)}, each with its "settings", "steps",
  "elbo" (summaries over the seeds) and "decoder_passes" (per example, forward and backward
  counted); "same_decoder_as_vae": shared; "refinement_steps_worth": {model: ``steps_worth``
  of the curves, the steps at which the refined VAE reaches the model's ELBO} for each model of
  ``shared``}."""
  vae = results["vae"]["refinement"]
  steps, seeds = vae["steps"], results["seeds"]
  curves = {"sa_vae": {"settings": dataclasses.asdict(configured), "steps": steps,
                       "elbo": vae["elbo"]}}
  if tuned is not None:
    curves["tuned"] = {
        "settings": dataclasses.asdict(tuned_settings(configured, tuned["tuning"]["chosen"])),
        "steps": steps,
        "elbo": [stats.summarize_seeds([tuned[str(s)][i] for s in seeds])
                 for i in range(len(steps))],
        "tuning": tuned["tuning"]}
  for curve in curves.values():
    curve["decoder_passes"] = [2 * curve["settings"]["samples_per_step"] * k for k in steps]
  worth = {name: steps_worth(curves, results[name]["refinement"]["elbo"][0])   # its K = 0
           for name in shared}
  return {"vae_refinement": curves, "same_decoder_as_vae": shared,
          "refinement_steps_worth": worth}


def summarize_model(records: list[dict], measurements: gaps.Measurements,
                    tolerance: float = gaps.CONVERGENCE_TOLERANCE) -> tuple[dict, list]:
  """One model's summary over its seeds' records (each seed's value the mean over its examples;
  ``stats.summarize_seeds``), and its amortization gap per seed. The convergence entry (with
  ``tolerance`` on the mean of L[q*]) is there if the records hold a convergence check."""
  steps = list(measurements.refine_steps)
  values = lambda fn: [fn(record) for record in records]
  mean = lambda field: lambda record: float(np.mean(record[field]))
  elbo, elbo_qstar, log_px = values(mean("elbo")), values(mean("elbo_qstar")), values(
      mean("log_px"))
  amortization = [a - b for a, b in zip(elbo_qstar, elbo)]
  per_example = lambda record, phase: record["seconds"][phase] / max(
      record["convergence_done" if phase == "qstar_doubled" else "examples_done"], 1)
  encode = values(lambda record: per_example(record, "encode"))
  refine_step = values(lambda record: per_example(record, "refine") / max(steps))
  curve = values(lambda record: np.mean(record["refinement_elbo"], axis=0).tolist())
  qstar_samples = measurements.qstar_settings.samples_per_step
  entry = {
      "log_px": stats.summarize_seeds(log_px),
      "elbo_qstar": stats.summarize_seeds(elbo_qstar),
      "elbo": stats.summarize_seeds(elbo),
      "approximation_gap": stats.summarize_seeds([a - b for a, b in zip(log_px, elbo_qstar)]),
      "amortization_gap": stats.summarize_seeds(amortization),
      "qstar_steps": stats.summarize_seeds(values(mean("qstar_steps"))),
      "seconds_per_example": {phase: stats.summarize_seeds(
          values(lambda record, p=phase: per_example(record, p))) for phase in PHASES},
      "decoder_passes_per_second": {
          "qstar": stats.summarize_seeds(values(
              lambda record: record["qstar_steps_computed"] * qstar_samples
              / max(record["seconds"]["qstar"], 1e-9))),
          "log_px": stats.summarize_seeds(values(
              lambda record: record["examples_done"] * measurements.iwae_samples
              / max(record["seconds"]["log_px"], 1e-9)))},
      "refinement": {
          "steps": steps,
          "elbo": [stats.summarize_seeds([c[i] for c in curve]) for i in range(len(steps))],
          "seconds_per_example": [stats.summarize_seeds(
              [e + k * r for e, r in zip(encode, refine_step)]) for k in steps]},
  }
  num_convergence = len(records[0]["elbo_qstar_doubled"])
  if num_convergence:
    delta = values(lambda record: float(np.mean(record["elbo_qstar_doubled"])
                                        - np.mean(record["elbo_qstar"][:len(
                                            record["elbo_qstar_doubled"])])))
    entry["convergence"] = {
        "examples": num_convergence, "tolerance": tolerance,
        "delta": stats.summarize_seeds(delta),
        "converged": bool(all(abs(d) < tolerance for d in delta))}
  return entry, amortization


def summarize(records: dict, names: list, seeds: list, measurements: gaps.Measurements,
              tolerance: float = gaps.CONVERGENCE_TOLERANCE) -> dict:
  """{"models": names, "seeds": seeds, name: ``summarize_model`` of records[name, seed] over the
  seeds, ...}; with a "vae", every other model's "share_of_vae_amortization_gap_closed" (1 - its
  gap / the seed's VAE gap); with an "iavae", "refinement_steps_to_match_iavae": for every other
  model, the first recorded step count at which its refined ELBO reaches the IA-VAE's unrefined
  one (``gaps.steps_to_reach``)."""
  results = {"models": names, "seeds": seeds}
  amortization = {}
  for name in names:
    results[name], amortization[name] = summarize_model(
        [records[name, seed] for seed in seeds], measurements, tolerance)
  if "vae" in names:
    for name in names:
      if name != "vae":
        results[name]["share_of_vae_amortization_gap_closed"] = stats.summarize_seeds(
            [1 - g / v for g, v in zip(amortization[name], amortization["vae"])])
  if "iavae" in names:
    single_pass = results["iavae"]["refinement"]["elbo"][0]   # K = 0
    results["refinement_steps_to_match_iavae"] = {
        name: gaps.steps_to_reach(list(measurements.refine_steps),
                                  results[name]["refinement"]["elbo"], single_pass)
        for name in names if name != "iavae"}
  return results


def refinement_figure(results: dict, title: str):
  """``plots.refinement_figure`` of ``summarize``'s results: each model's refinement curve
  against steps and wall time."""
  from iavae_jax import plots  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  return plots.refinement_figure(
      {name: (results[name]["refinement"]["steps"],
              [t["mean"] for t in results[name]["refinement"]["seconds_per_example"]],
              [e["mean"] for e in results[name]["refinement"]["elbo"]],
              [e["std"] or 0.0 for e in results[name]["refinement"]["elbo"]])
       for name in results["models"]}, title)


def passes_figure(results: dict, title: str):
  """``plots.passes_figure`` of ``summarize``'s results with ``refinement_comparison``'s: the
  VAE's refinement curves on its decoder (lines) and every model on that decoder (points),
  against decoder passes per example (``results["decoder_passes_per_example"]``)."""
  from iavae_jax import plots  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  curves = {f"VAE + {'SA-VAE' if label == 'sa_vae' else 'tuned'} refinement":
            (curve["decoder_passes"], [e["mean"] for e in curve["elbo"]])
            for label, curve in results["vae_refinement"].items()}
  points = {name: (results["decoder_passes_per_example"][name],
                   results[name]["refinement"]["elbo"][0]["mean"])
            for name in ["vae", *results["same_decoder_as_vae"]]}
  return plots.passes_figure(curves, points, title)


def _gaps_vae_refinement(results: dict) -> list[str]:
  """gaps.md's part on the VAE's decoder: every model on it, with its decoder passes and the
  refinement steps from the VAE it is worth; the tuned refinement's choice."""
  if "vae_refinement" not in results:
    return []
  curves = results["vae_refinement"]
  passes = results["decoder_passes_per_example"]
  samples = {label: curve["settings"]["samples_per_step"] for label, curve in curves.items()}
  worth = lambda n, label: n if n is None else f"{n:.1f} ({2 * samples[label] * n:.0f} passes)"
  rows = [[name, passes[name], stats.format_summary(results[name]["refinement"]["elbo"][0]),
           *(worth(results["refinement_steps_worth"][name][label]["of_the_means"], label)
             if name != "vae" else "" for label in curves)]
          for name in ["vae", *results["same_decoder_as_vae"]]]
  lines = ["", "On the VAE's decoder (the models that share it): each model's ELBO (the "
           "refinement estimator's, K = 0), its decoder passes per image, and the refinement "
           "steps from the VAE's encoder at which the VAE reaches it (interpolated between "
           "the recorded K, from the means over seeds; None: not within the largest K).", "",
           *runs.markdown_table(["model", "decoder passes", "ELBO",
                                   *(f"worth, in {label} refinement steps" for label in curves)],
                                  rows)]
  if "tuned" in curves:
    tuning = curves["tuned"]["tuning"]
    chosen = tuning["chosen"]
    lines += ["", f"Tuned refinement: {chosen['optimizer']}, learning rate "
              f"{chosen['learning_rate']:.4g}, {chosen['samples_per_step']} samples per step, "
              f"chosen among {len(tuning['candidates'])} candidates by the mean ELBO on "
              f"{tuning['examples']} validation images (seed {tuning['seed']}'s VAE) after "
              f"{tuning['budget']} decoder passes per image. SA-VAE's first step on them: "
              + "; ".join(f"{f['samples_per_step']} sample(s) per step: {f['elbo_at_start']:.2f}"
                          f" -> {f['elbo']:.2f}" for f in tuning["sa_vae_first_step"]) + "."]
  return lines


def markdown(results: dict) -> str:
  """``summarize``'s results (with "dataset", "tier", "num_examples", "settings" and
  "wall_seconds" added, and ``refinement_comparison``'s where there is a VAE) as Markdown: the
  gap table, the refinement curves and how to read them (experiments.gaps' gaps.md)."""
  names, seeds, settings = results["models"], results["seeds"], results["settings"]
  rows = []
  for name in names:
    r = results[name]
    share = (stats.format_summary(r["share_of_vae_amortization_gap_closed"], 3)
             if "share_of_vae_amortization_gap_closed" in r else "")
    convergence = r.get("convergence")
    moved = (f"{stats.format_summary(convergence['delta'], 4)} ({convergence['examples']} images: "
             f"{'converged' if convergence['converged'] else 'NOT converged'})"
             if convergence else "not checked")
    rows.append([name,
                 *(stats.format_summary(r[key]) for key in ("log_px", "elbo_qstar", "elbo")),
                 *(stats.format_summary(r[key], 3)
                   for key in ("approximation_gap", "amortization_gap")),
                 share, stats.format_summary(r["qstar_steps"], 0), moved])
  lines = [
      f"# {results['dataset']} ({results['tier']} tier): inference gaps on "
      f"{results['num_examples']} test images, {len(seeds)} seed(s) {seeds}", "",
      "Mean ± std over seeds of each seed's mean over the images; nats.", "",
      *runs.markdown_table(
          ["model", "log p^", "L[q*]", "L[q]", "approximation gap", "amortization gap",
           "VAE's amortization gap closed", "q* steps", "twice the q* budget moves L[q*] by"],
          rows)]
  steps = results[names[0]]["refinement"]["steps"]
  lines += ["", "Test-time refinement (SA-VAE's SGD on each image's mean and log-variance from "
            "the encoder's output, decoder fixed): ELBO after K steps, and wall time per image "
            "(encoder pass + K steps).", "",
            *runs.markdown_table(
                ["model", *(f"K = {k}" for k in steps)],
                [[name, *(f"{stats.format_summary(e)} ({1e3 * t['mean']:.2f} ms)" for e, t in zip(
                    results[name]["refinement"]["elbo"],
                    results[name]["refinement"]["seconds_per_example"]))] for name in names])]
  lines += _gaps_vae_refinement(results)
  for name, match in results.get("refinement_steps_to_match_iavae", {}).items():
    found = match["of_the_means"]
    lines += ["", f"{name} reaches the IA-VAE's single-pass ELBO after "
              + (f"K = {found} refinement steps" if found is not None else
                 f"more than {max(steps)} refinement steps")
              + f" (per seed: {match['per_seed']}; null: not within K = {max(steps)})."]
  lines += [
      "", "How to read: L[q] is the encoder's ELBO, L[q*] that of the best diagonal Gaussian "
      "found per image with the decoder fixed, log p^ an importance-sampled estimate of log "
      "p(x) with q* as the proposal. approximation gap = log p^ - L[q*] (the diagonal Gaussian "
      "family's limit), amortization gap = L[q*] - L[q] (what the encoder leaves on the table). "
      "Each model's gaps are measured with its own decoder, so the share of the VAE's "
      "amortization gap a model closes is 1 - its gap / the VAE's gap of the same seed. L[q*] "
      "counts as converged when twice the patience and max_steps move its mean by less than "
      f"{settings['convergence_tolerance']} nats. Wall times were measured on a shared machine.",
      "", f"Settings: {settings}. Wall time {results['wall_seconds']:.1f} s (this invocation).",
      ""]
  return "\n".join(lines)
