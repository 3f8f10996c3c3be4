r"""The cost of one IA-VAE training step relative to one VAE step, measured side by side.

  python -m benchmarks.step_cost                    # the paper architecture, batch 50
  python -m benchmarks.step_cost --tier=cpu         # the cpu tier's smaller models
  python -m benchmarks.step_cost --hypernet_input=encoder   # what the hypernetwork sees

Builds the real train steps of stage 1 (VAE), stage 2 (IA-VAE) and the control
(experiments.images_train.train_step) on random data; compiles them; then times them interleaved
(VAE, IA-VAE, control, VAE, ...) so that machine noise hits all alike. Prints a line per model
and, last, a JSON object with vae_step_s, iavae_step_s, control_step_s (medians), ratio =
iavae_step_s / vae_step_s and examples per second. Timings are wall-clock on whatever device JAX
uses.
"""

import dataclasses
import json
import statistics
import time

from absl import app, flags

from experiments import configs

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "paper", list(configs.IMAGE_TIERS), "Which tier's architecture.")
flags.DEFINE_integer("repeats", 5, "Timed steps per model (after one compiling step).")
flags.DEFINE_bool("xla_defaults", False, "Compile with XLA's default options instead of the "
                  "model's own (images_train.Model.compiler_options).")
flags.DEFINE_enum("hypernet_input", None, list(configs.HYPERNET_INPUTS),
                  "What the IA-VAE's hypernetwork sees (default: the configuration's).")


def main(argv):
  del argv
  import functools
  import jax
  import jax.numpy as jnp
  from iavae_jax import blocks, training
  from experiments import images_train

  config = configs.image_config("mnist", FLAGS.tier)
  if FLAGS.hypernet_input:
    config = dataclasses.replace(config, hypernet_input=FLAGS.hypernet_input)
  model = images_train.Model(config)
  vae = model.init_vae(jax.random.PRNGKey(0))
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  psi = model.init_hypernet(jax.random.PRNGKey(2), layout)
  setups = {
      "vae": (vae, None),
      "iavae": ({"hypernet": psi, "decoder": vae["decoder"]},
                {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}),
      "control": ({"encoder": vae["encoder"], "decoder": vae["decoder"]},
                  {"batch_stats": vae["batch_stats"]}),
  }
  batch = images_train.Batch(
      jax.random.uniform(jax.random.PRNGKey(3), (config.batch_size, 28, 28)),
      jax.random.PRNGKey(4))
  steps, states = {}, {}
  for name, (params, frozen) in setups.items():
    steps[name] = jax.jit(
        functools.partial(images_train.train_step, model=model, stage=name, steps_per_epoch=1),
        compiler_options={} if FLAGS.xla_defaults else model.compiler_options)
    states[name] = training.init_state(params, images_train.stage_optimizer(config, name),
                                       jax.random.PRNGKey(5), frozen)
    t0 = time.perf_counter()
    states[name], metrics = steps[name](states[name], batch)
    jax.block_until_ready(metrics)
    print(f"{name}: compiled and ran one step in {time.perf_counter() - t0:.1f} s", flush=True)

  times = {name: [] for name in setups}
  for _ in range(FLAGS.repeats):
    for name in setups:
      t0 = time.perf_counter()
      states[name], metrics = steps[name](states[name], batch)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - t0)
  result = {f"{name}_step_s": statistics.median(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"{name}: median {statistics.median(t):.4f} s per step of {config.batch_size} "
          f"(min {min(t):.4f}, max {max(t):.4f}), "
          f"{config.batch_size / statistics.median(t):.1f} examples/s", flush=True)
  result.update({
      "ratio": result["iavae_step_s"] / result["vae_step_s"],
      "control_ratio": result["control_step_s"] / result["vae_step_s"],
      "examples_per_s": {name: config.batch_size / result[f"{name}_step_s"] for name in setups},
      "tier": FLAGS.tier, "compiler_options": {} if FLAGS.xla_defaults else model.compiler_options,
      "hypernet_input": config.hypernet_input,
      "batch_size": config.batch_size, "repeats": FLAGS.repeats,
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
  })
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
