r"""What the gap decomposition costs per test image at a tier's architecture, measured.

  python -m benchmarks.gaps_cost --tier=cpu
  python -m benchmarks.gaps_cost --tier=cpu --batch_size=20 --qstar_samples=10

Times the measurements experiments.gaps runs (``image_vae.gap_measurements``, compiled first) on
--batch_size binarised images with a decoder of the tier's architecture (random weights: the cost
does not depend on them): --steps Adam steps of q* with --qstar_samples samples each (a decoder
forward and backward pass per sample), and log p^ with --iwae_samples samples (a forward pass per
sample, --sample_chunk per call). Prints decoder passes per second (per image in the batch, summed
over the batch) by wall clock and by this process's CPU time (on a shared machine the CPU time is
the steadier number; 2 idle cores give about twice as many passes per wall second as per CPU
second), then the projected cost per image and per (model, seed) of q* at --projected_steps steps
and of log p^. The last line is a JSON object with every number.
"""

import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "cpu", ["paper", "cpu", "smoke"], "The image tier's architecture.")
flags.DEFINE_integer("batch_size", 10, "Images per jitted call.")
flags.DEFINE_integer("steps", 100, "Adam steps timed.")
flags.DEFINE_integer("qstar_samples", 50, "Samples per q* step.")
flags.DEFINE_integer("iwae_samples", 1000, "Samples of the log p^ timed.")
flags.DEFINE_integer("sample_chunk", 100, "Samples per decoder call in log p^.")
flags.DEFINE_integer("projected_steps", 3000, "q* steps per image assumed in the projection.")
flags.DEFINE_integer("projected_examples", 1000, "Test images per model assumed in it.")
flags.DEFINE_integer("repeats", 2, "Timed calls of each function (after one to compile).")


def _time(fn, *args) -> tuple[float, float]:
  """Median wall and CPU seconds of fn(*args), after one call that compiles it."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  walls, cpus = [], []
  for _ in range(FLAGS.repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return statistics.median(walls), statistics.median(cpus)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from iavae_jax import gap_runs, gaps, image_vae  # pylint: disable=g-import-not-at-top

  image_config = configs.image_config("mnist", FLAGS.tier)
  model = image_vae.Model(image_config)
  steps = FLAGS.steps
  # Exactly `steps` steps: checks only at the end, never stopping early.
  functions = image_vae.gap_measurements(
      model,
      gaps.QStarSettings(samples_per_step=FLAGS.qstar_samples, check_every=steps,
                         check_samples=FLAGS.sample_chunk, patience=10**6, max_steps=steps,
                         sample_chunk=FLAGS.sample_chunk),
      gaps.RefineSettings(), refine_steps=(1,), final_samples=FLAGS.sample_chunk,
      iwae_samples=FLAGS.iwae_samples, refine_eval_samples=FLAGS.sample_chunk,
      sample_chunk=FLAGS.sample_chunk)
  key = jax.random.PRNGKey(0)
  x = (jax.random.uniform(key, (FLAGS.batch_size, 28, 28, 1)) < 0.2).astype(jnp.float32)
  k = image_config.latent_dim
  decoder = model.decoder.init(key, x[:1], jnp.zeros((1, k)))["params"]
  mean, log_var = jnp.zeros((FLAGS.batch_size, k)), jnp.full((FLAGS.batch_size, k), -2.0)
  keys = gap_runs.example_keys(key, 0, FLAGS.batch_size)
  qstar_wall, qstar_cpu = _time(functions.optimal_gaussian, decoder, x, mean, log_var, keys,
                                FLAGS.batch_size)
  iwae_wall, iwae_cpu = _time(functions.log_px, decoder, x, mean, log_var, keys)

  # Passes: q* = steps x samples (forward + backward) plus two checks' forward passes.
  qstar_passes = FLAGS.batch_size * steps * FLAGS.qstar_samples
  iwae_passes = FLAGS.batch_size * FLAGS.iwae_samples
  rates = {"qstar_fwd_bwd_per_wall_second": qstar_passes / qstar_wall,
           "qstar_fwd_bwd_per_cpu_second": qstar_passes / qstar_cpu,
           "log_px_fwd_per_wall_second": iwae_passes / iwae_wall,
           "log_px_fwd_per_cpu_second": iwae_passes / iwae_cpu}
  per_image_qstar = FLAGS.projected_steps * FLAGS.qstar_samples / rates[
      "qstar_fwd_bwd_per_wall_second"]
  per_image_log_px = 5000 / rates["log_px_fwd_per_wall_second"]
  projection = {
      "qstar_seconds_per_image": per_image_qstar,
      "log_px_5000_seconds_per_image": per_image_log_px,
      "hours_per_model_and_seed": FLAGS.projected_examples * (per_image_qstar + per_image_log_px)
                                  / 3600}
  out = {"tier": FLAGS.tier, "backend": jax.default_backend(), "batch_size": FLAGS.batch_size,
         "steps": steps, "qstar_samples": FLAGS.qstar_samples,
         "iwae_samples": FLAGS.iwae_samples, "sample_chunk": FLAGS.sample_chunk,
         "seconds": {"qstar_wall": qstar_wall, "qstar_cpu": qstar_cpu, "log_px_wall": iwae_wall,
                     "log_px_cpu": iwae_cpu},
         "decoder_passes": rates,
         "projection": {"qstar_steps": FLAGS.projected_steps,
                        "examples": FLAGS.projected_examples, **projection}}
  for name, value in rates.items():
    print(f"{name}: {value:.0f}")
  print(f"at {FLAGS.projected_steps} q* steps of {FLAGS.qstar_samples} samples and log p^ "
        f"with 5,000: {per_image_qstar:.1f} s + {per_image_log_px:.1f} s per image, "
        f"{projection['hours_per_model_and_seed']:.1f} h per model and seed for "
        f"{FLAGS.projected_examples} images (wall clock, this machine as loaded now)")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
