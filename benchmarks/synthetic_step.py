r"""Seconds per epoch of the synthetic protocol's three populations, with the models written one
example at a time and on examples along the last axis, measured side by side in one process.

  python -m benchmarks.synthetic_step                 # 3 epochs per call, 5 timed calls
  python -m benchmarks.synthetic_step --epochs=5 --repeats=9

For each stage (10 VAEs, 100 IA-VAEs, the 30-model width sweep) builds the population epoch of
iavae_jax.synthetic_vae in five variants:
  vmapped               the Flax modules applied per example under vmap, XLA's default CPU
                        options (how the populations trained before);
  vmapped_no_ynn        the same without XLA:CPU's YNNPACK reductions;
  examples_last_default the examples-last encoders (encoders.mlp_encode_examples_last), XLA's
                        default options;
  examples_last_no_ynn  the same without YNNPACK reductions (cpu_compiler_options());
  examples_last_loop    and with XLA's loop emitters (cpu_compiler_options(True)).
synthetic_vae.LOOP_EMITTERS says which of the last two each stage trains with (the sweep as
the VAEs).
Each variant is one jitted call of --epochs epochs of the whole population (early stopping off),
compiled first, then timed interleaved with the others so that machine noise hits all alike:
wall seconds and the process's CPU seconds (all threads), which a busy machine distorts less.
The last line is a JSON object with the median seconds per epoch of every stage and variant and
the ratios vmapped / variant.
"""

import json
import os
import statistics
import time

from absl import app, flags

from experiments import configs

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 3, "Epochs per timed call.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (after one compiling call).")

# name: (examples last, None for XLA's default options, else the loop_emitters argument of
# training.cpu_compiler_options)
VARIANTS = {"vmapped": (False, None), "vmapped_no_ynn": (False, False),
            "examples_last_default": (True, None), "examples_last_no_ynn": (True, False),
            "examples_last_loop": (True, True)}


def _populations(config, x):
  """name: (params, frozen, keys, order seeds, per-example encode, examples-last encode) of the
  protocol's three populations at initialisation, keyed as the protocol keys them."""
  import jax
  import jax.numpy as jnp
  from iavae_jax import blocks, hypernets, synthetic_vae, training
  from iavae_jax.models import encoders

  def keys(population, indices):   # as the protocol keys its populations
    return training.population_keys(
        indices, prefix=(config.seed, configs.SYNTHETIC_POPULATIONS[population].key_id))

  def vae_params(indices, widths, stage):
    init_keys, train_keys, order_seeds = keys(stage, indices)
    params = [encoders.pad_hidden(encoders.MLPEncoder(w).init(k, x[0])["params"], max(widths))
              for w, k in zip(widths, init_keys)]
    return jax.tree.map(lambda *a: jnp.stack(a), *params), train_keys, order_seeds

  vae_indices = [(v,) for v in range(config.num_vae_seeds)]
  phi, vae_keys, vae_seeds = vae_params(vae_indices, [config.encoder_width] * len(vae_indices),
                                        "vae")
  layout = blocks.BlockLayout.from_tree(jax.tree.map(lambda a: a[0], phi))
  hypernet = hypernets.LinearHypernet(layout, config.embed_dim, config.hypernet_init_std)
  iavae_indices = [(v, s) for v in range(config.num_vae_seeds)
                   for s in range(config.num_iavae_seeds)]
  init_keys, iavae_keys, iavae_seeds = keys("iavae", iavae_indices)
  psi = jax.vmap(lambda k: hypernet.init(k, x[0])["params"])(init_keys)
  phi_avi = jax.tree.map(lambda a: jnp.repeat(a, config.num_iavae_seeds, axis=0), phi)
  sweep_indices = [(w, s) for w in config.sweep_widths for s in range(config.num_sweep_seeds)]
  sweep, sweep_keys, sweep_seeds = vae_params(sweep_indices, [w for w, _ in sweep_indices],
                                              "sweep")
  max_width = max(config.sweep_widths)
  return {
      "vae": (phi, None, vae_keys, vae_seeds, synthetic_vae.vae_encode(config.encoder_width),
              synthetic_vae.vae_train_encode),
      "iavae": (psi, phi_avi, iavae_keys, iavae_seeds, synthetic_vae.iavae_encode(config, layout),
                synthetic_vae.iavae_train_encode(layout)),
      "sweep": (sweep, None, sweep_keys, sweep_seeds, synthetic_vae.vae_encode(max_width),
                synthetic_vae.vae_train_encode),
  }


def _compiled_calls(config, x, populations) -> dict:
  """(population, variant): a call that runs --epochs epochs of it, compiled and run once."""
  import jax
  from iavae_jax import synthetic_vae, training

  calls = {}
  for stage, (params, frozen, keys, seeds, encode, train_encode) in populations.items():
    orders = training.data_orders(seeds, 0, FLAGS.epochs, config.num_examples,
                                  config.batch_size)
    for variant, (examples_last, options) in VARIANTS.items():
      epoch_fn, optimizer = synthetic_vae.population_epoch_fn(
          config, train_encode if examples_last else encode, examples_last=examples_last)
      population_epoch = jax.vmap(epoch_fn, in_axes=(0, None, 0))
      run = jax.jit(lambda s, d, o, population_epoch=population_epoch: jax.lax.scan(
          lambda s, order: population_epoch(s, d, order), s, o),
                    compiler_options=None if options is None
                    else training.cpu_compiler_options(options))
      states = jax.vmap(lambda p, k, f: training.init_state(p, optimizer, k, f))(
          params, keys, frozen)
      call = lambda run=run, states=states, orders=orders: run(states, x, orders)
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      print(f"{stage:>5} {variant:>21}: compiled and ran in {time.perf_counter() - t0:.1f} s",
            flush=True)
      calls[stage, variant] = call
  return calls


def main(argv):
  del argv
  import jax
  from iavae_jax import synthetic_vae
  from iavae_jax.data import synthetic

  config = configs.synthetic_full()
  x = synthetic.generate(jax.random.PRNGKey(config.data_seed), config.num_examples,
                         config.sigma).x
  populations = _populations(config, x)
  calls = _compiled_calls(config, x, populations)
  wall = {key: [] for key in calls}
  cpu = {key: [] for key in calls}
  for _ in range(FLAGS.repeats):
    for key, call in calls.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[key].append((time.perf_counter() - t0) / FLAGS.epochs)
      cpu[key].append((time.process_time() - c0) / FLAGS.epochs)
  result = {"epochs": FLAGS.epochs, "repeats": FLAGS.repeats, "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "backend": jax.default_backend()}
  for stage in populations:
    result[stage] = {}
    for variant in VARIANTS:
      w, c = statistics.median(wall[stage, variant]), statistics.median(cpu[stage, variant])
      result[stage][variant] = {
          "wall_s_per_epoch": round(w, 5), "cpu_s_per_epoch": round(c, 5),
          "wall_ratio": round(statistics.median(wall[stage, "vmapped"]) / w, 2),
          "cpu_ratio": round(statistics.median(cpu[stage, "vmapped"]) / c, 2)}
      loop = synthetic_vae.LOOP_EMITTERS["iavae" if stage == "iavae" else "vae"]
      trains = VARIANTS[variant] == (True, loop)
      print(f"{stage:>5} {variant:>21}: {w * 1e3:7.1f} ms wall, {c * 1e3:7.1f} ms CPU per epoch "
            f"(vmapped / this: wall {result[stage][variant]['wall_ratio']}x, "
            f"CPU {result[stage][variant]['cpu_ratio']}x){'  <- trains' if trains else ''}",
            flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
