"""iavae_jax.gap_runs: the gap decomposition over a data set, on the linear-Gaussian model of
test_gaps (whose posterior, L[q*] and log p(x) are known in closed form)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iavae_jax import gap_runs, gaps, hparams
from iavae_jax.errors import ConfigError
from test_gaps import D, N, _encoder_output, _exact, _log_likelihood_fn, _model

BATCH = 3   # N = 4 examples: a full chunk, then one example and two of padding


class _Stop(Exception):
  pass


def _setup():
  w, b, x = _model()
  post_mean, qstar_log_var, elbo_qstar, log_px = _exact(w, b, x)
  # An encoder that knows each example's output by its row in x (padding rows: zeros).
  outputs = _encoder_output(post_mean, qstar_log_var)

  def encode(chunk):
    rows = jnp.argmin(jnp.sum((chunk[:, None, :] - x[None]) ** 2, -1), axis=1)
    known = jnp.any(chunk != 0, axis=1)[:, None]
    return tuple(jnp.where(known, out[rows], 0.0) for out in outputs)
  measure = gaps.Measurements(
      lambda params, x_i: _log_likelihood_fn(params["w"], params["b"], x_i),
      gaps.QStarSettings(learning_rate=1e-2, check_every=50, patience=5),
      gaps.RefineSettings(), refine_steps=(1, 10), final_samples=1000, iwae_samples=1000,
      refine_eval_samples=1000, sample_chunk=500)
  return measure, jax.jit(encode), {"w": w, "b": b}, np.asarray(x), (elbo_qstar, log_px)


def test_records_match_the_closed_forms_and_a_resumed_run_matches_an_uninterrupted_one():
  measure, encode, decoder, x, (elbo_qstar, log_px) = _setup()
  root = jax.random.PRNGKey(5)
  chex.assert_shape(gap_runs.example_keys(root, 2, 3), (3, 2))
  chex.assert_shape(gap_runs.pad(x[:1], BATCH), (BATCH, D))
  whole = gap_runs.measure_examples(measure, encode, decoder, x, root, BATCH,
                                    gap_runs.new_record("model"))
  assert whole["examples_done"] == N and len(whole["elbo"]) == N
  chex.assert_shape(np.asarray(whole["refinement_elbo"]), (N, 3))
  chex.assert_trees_all_close(np.asarray(whole["elbo_qstar"]), elbo_qstar, atol=0.05)
  chex.assert_trees_all_close(np.asarray(whole["log_px"]), log_px, atol=0.1)
  assert np.all(np.asarray(whole["elbo_qstar"]) > np.asarray(whole["elbo"]))
  # Stopped after its first chunk (the record as a caller would have saved it), then resumed.
  seen = []

  def stop_after_first(record, count):
    seen.append(count)
    raise _Stop
  partial = gap_runs.new_record("model")
  with pytest.raises(_Stop):
    gap_runs.measure_examples(measure, encode, decoder, x, root, BATCH, partial,
                              stop_after_first)
  assert seen == [BATCH] and partial["examples_done"] == BATCH
  resumed = gap_runs.measure_examples(measure, encode, decoder, x, root, BATCH, partial)
  for field in ("elbo", "elbo_qstar", "log_px", "qstar_steps", "refinement_elbo"):
    chex.assert_trees_all_close(np.asarray(resumed[field]), np.asarray(whole[field]), atol=1e-5)
  # The refinement curve alone, on the same keys, is the record's.
  chex.assert_trees_all_close(
      gap_runs.refinement_curve(measure, encode, decoder, x, root, BATCH),
      np.asarray(whole["refinement_elbo"]), atol=1e-5)


def test_convergence_check_and_summary():
  measure, encode, decoder, x, _ = _setup()
  root = jax.random.PRNGKey(5)
  records = []
  for seed_root in (root, jax.random.fold_in(root, 1)):
    record = gap_runs.measure_examples(measure, encode, decoder, x, seed_root, BATCH,
                                       gap_runs.new_record("model"))
    records.append(gap_runs.check_convergence(measure, encode, decoder, x, seed_root, BATCH, 2,
                                              record))
  assert records[0]["convergence_done"] == 2 and len(records[0]["elbo_qstar_doubled"]) == 2
  summary = gap_runs.summarize({("vae", 0): records[0], ("vae", 1): records[1]}, ["vae"], [0, 1],
                               measure, tolerance=0.05)
  entry = summary["vae"]
  gaps_per_seed = [float(np.mean(r["elbo_qstar"]) - np.mean(r["elbo"])) for r in records]
  chex.assert_trees_all_close(entry["amortization_gap"]["per_seed"], gaps_per_seed, atol=1e-6)
  assert entry["amortization_gap"]["mean"] > 0 and entry["approximation_gap"]["mean"] > 0
  assert entry["refinement"]["steps"] == [0, 1, 10]
  # The doubled budget moves L[q*] by less than the tolerance: q* had converged.
  assert entry["convergence"]["examples"] == 2 and entry["convergence"]["converged"]


def test_measure_saved_resumes_from_its_file_and_refuses_another_models_record(tmp_path,
                                                                                capsys):
  measure, encode, decoder, x, _ = _setup()
  root, path = jax.random.PRNGKey(5), str(tmp_path / "model.json")
  compiled = []
  args = (measure, encode, decoder, x, root, BATCH, 2, path, "model step 7", "model")
  whole = gap_runs.measure_saved(*args, gap_runs.Progress(N + 2 * 2),
                                 lambda: compiled.append(1))
  assert compiled == [1] and whole["examples_done"] == N and whole["convergence_done"] == 2
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3 and lines[-1].startswith("[gaps] model: convergence check 2/2")
  assert "run 100% done" in lines[-1]
  # Everything is in the file: a rerun measures nothing, compiles nothing, returns the record.
  again = gap_runs.measure_saved(*args, gap_runs.Progress(N + 2 * 2),
                                 lambda: compiled.append(1))
  assert compiled == [1] and again == whole
  with pytest.raises(ConfigError, match="measured model step 7, but the model is now"):
    gap_runs.measure_saved(*args[:8], "model step 8", "model", gap_runs.Progress(1))


def test_gap_settings_default_to_the_measurements_defaults_and_name_a_bad_field():
  qstar, refine, steps, *samples = gap_runs.measurement_args(hparams.GapSettings().validate())
  assert (qstar, refine) == (gaps.QStarSettings(), gaps.RefineSettings())
  assert steps == (1, 5, 20, 100) and samples == [5000, 5000, 5000, 100]
  tuned = gaps.RefineSettings(optimizer="adam", learning_rate=1e-2)
  assert gap_runs.measurement_args(hparams.GapSettings(), tuned, (3,))[1:3] == (tuned, (3,))
  with pytest.raises(ValueError, match="^batch_size must be a positive integer, got 0"):
    hparams.GapSettings(batch_size=0).validate()
  with pytest.raises(ValueError, match="^final_samples=150 must be a multiple of sample_chunk"):
    hparams.GapSettings(final_samples=150).validate()


def test_tuned_curves_resume_and_refinement_comparison_reads_steps_off_the_curves(tmp_path):
  configured = gaps.RefineSettings()
  chosen = {"optimizer": "adam", "learning_rate": 0.01, "samples_per_step": 4}
  calls = []

  def tune():
    calls.append("tune")
    return {"chosen": chosen, "candidates": [chosen]}

  def curve(seed, settings):
    calls.append((seed, settings))
    return [-10.0 + seed, -6.0 + seed, -4.0 + seed]   # K = 0, 1, 3
  path = str(tmp_path / "tuned.json")
  first = gap_runs.tuned_curves(path, [0], configured, tune, curve)
  tuned = gap_runs.tuned_curves(path, [0, 2], configured, tune, curve)   # resumed: seed 2 only
  settings = gap_runs.tuned_settings(configured, chosen)
  assert settings.samples_per_step == 4 and settings.momentum == configured.momentum
  assert calls == ["tune", (0, settings), (2, settings)]
  assert tuned == {**first, "2": [-8.0, -4.0, -2.0]}

  summary = lambda values: {"mean": float(np.mean(values)), "std": None, "per_seed": values}
  results = {"seeds": [0, 2],
             "vae": {"refinement": {"steps": [0, 1, 3],
                                    "elbo": [summary([v, v]) for v in (-9.0, -8.0, -7.0)]}},
             "model": {"refinement": {"elbo": [summary([-5.0, -5.0])]}}}
  comparison = gap_runs.refinement_comparison(results, ["model"], configured, tuned)
  curves = comparison["vae_refinement"]
  assert curves["sa_vae"]["decoder_passes"] == [0, 2, 6]   # one sample: a forward and a backward
  assert curves["tuned"]["decoder_passes"] == [0, 8, 24]
  assert [e["mean"] for e in curves["tuned"]["elbo"]] == [-9.0, -5.0, -3.0]
  # -5 is past SA-VAE's curve (None), and the tuned curve's mean at K = 1 exactly; per seed,
  # seed 0 (-10, -6, -4) reaches it 1/2 of the way from K = 1 to 3, seed 2 (-8, -4, -2) at 3/4.
  assert comparison["refinement_steps_worth"] == {
      "model": {"sa_vae": {"per_seed": [None, None], "of_the_means": None},
                "tuned": {"per_seed": [2.0, 0.75], "of_the_means": 1.0}}}
  assert comparison["same_decoder_as_vae"] == ["model"]


def test_the_figures_draw_every_curve_and_model():
  summary = lambda mean: {"mean": mean, "std": None, "per_seed": [mean]}
  refinement = lambda elbo: {"steps": [0, 1], "elbo": [summary(e) for e in elbo],
                             "seconds_per_example": [summary(1e-3), summary(2e-3)]}
  results = {"models": ["vae", "model"], "seeds": [0],
             "vae": {"refinement": refinement([-9.0, -8.0])},
             "model": {"refinement": refinement([-5.0, -4.5])},
             "decoder_passes_per_example": {"vae": 0, "model": 16}}
  results.update(gap_runs.refinement_comparison(results, ["model"], gaps.RefineSettings()))
  by_steps = gap_runs.refinement_figure(results, "title").axes[0]
  assert len(by_steps.containers) == 2   # an error-bar line per model
  ax = gap_runs.passes_figure(results, "title").axes[0]
  assert [line.get_label() for line in ax.get_lines()] == ["VAE + SA-VAE refinement"]
  np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [0, 2])
  assert [c.get_label() for c in ax.collections] == ["vae", "model"]
  np.testing.assert_array_equal(ax.collections[1].get_offsets(), [[16, -5.0]])
