r"""Wall time of the synthetic experiment's VAE population on 1 device and split over several,
measured side by side in one process.

  python -m benchmarks.parallel_scaling                    # 4 emulated CPU devices
  python -m benchmarks.parallel_scaling --devices=8 --models=32
  python -m benchmarks.parallel_scaling --devices=0        # the real devices (GPUs, TPU cores)

On CPU, --devices=N sets XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts
(the emulated devices share this machine's cores, so they show the mechanism, not a speed-up
beyond the core count). Trains the same population of --models VAEs (paper section 4.1's
encoder) for --epochs epochs with ``--parallel`` none (device 0), seeds and data; each mode is
compiled first (one untimed chunk), then timed over ``--repeats`` full runs, and the final
parameters are compared with the 1-device ones. The last line is a JSON object with the median
seconds per mode, the speed-ups over none and the largest parameter differences.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 4, "Emulated CPU devices (0: use the real devices as they are).")
flags.DEFINE_integer("models", 16, "VAEs in the population.")
flags.DEFINE_integer("epochs", 20, "Epochs per run (no early stopping).")
flags.DEFINE_integer("repeats", 3, "Timed runs per mode.")


def main(argv):
  del argv
  if FLAGS.devices > 0:
    if "jax" in sys.modules:
      raise app.UsageError("JAX is already imported: set XLA_FLAGS yourself.")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
  import jax
  import numpy as np
  from iavae_jax import parallel, training
  from iavae_jax.data import synthetic
  from iavae_jax.models import encoders
  from iavae_jax import synthetic_vae
  from experiments import configs

  config = configs.SyntheticConfig(num_vae_seeds=FLAGS.models, max_epochs=FLAGS.epochs,
                                   patience=FLAGS.epochs, epochs_per_call=FLAGS.epochs)
  x = synthetic.generate(jax.random.PRNGKey(0), config.num_examples, config.sigma).x
  indices = [(v,) for v in range(config.num_vae_seeds)]
  init_keys, train_keys, order_seeds = training.population_keys(
      indices, prefix=(config.seed, configs.SYNTHETIC_POPULATIONS["vae"].key_id))
  encoder = encoders.MLPEncoder(config.encoder_width)
  params = jax.vmap(lambda k: encoder.init(k, x[0])["params"])(init_keys)
  schedule = training.Schedule(config.batch_size, config.max_epochs, config.patience)
  print(f"{jax.device_count()} devices ({jax.default_backend()}), {FLAGS.models} VAEs, "
        f"{FLAGS.epochs} epochs of {config.num_examples} examples, batch {config.batch_size}",
        flush=True)

  seconds, finals = {}, {}
  for mode in parallel.MODES:
    par = parallel.Parallel.create(mode)
    epoch_fn, optimizer = synthetic_vae.population_epoch_fn(config,
                                                            synthetic_vae.vae_train_encode, par)
    states = jax.vmap(lambda p, k: training.init_state(p, optimizer, k))(params, train_keys)
    train = lambda schedule: jax.block_until_ready(training.train_population(
        epoch_fn, states, x, order_seeds, schedule, config.epochs_per_call, parallel=par))
    train(training.Schedule(config.batch_size, 1, 1))               # compile
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      final = train(schedule)
      times.append(time.perf_counter() - start)
    seconds[mode], finals[mode] = statistics.median(times), parallel.to_host(final.params)
    print(f"{mode:>5}: {seconds[mode]:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times)})",
          flush=True)

  diff = lambda mode: max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(finals[mode]), jax.tree.leaves(finals["none"])))
  print(json.dumps({
      "devices": jax.device_count(), "backend": jax.default_backend(), "models": FLAGS.models,
      "epochs": FLAGS.epochs, "cpu_count": os.cpu_count(),
      **{f"{mode}_s": round(seconds[mode], 4) for mode in parallel.MODES},
      "seeds_speedup": round(seconds["none"] / seconds["seeds"], 3),
      "data_speedup": round(seconds["none"] / seconds["data"], 3),
      "max_abs_param_diff_seeds": diff("seeds"), "max_abs_param_diff_data": diff("data")}))


if __name__ == "__main__":
  app.run(main)
