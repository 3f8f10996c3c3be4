r"""The cost of one IA-VAE training step relative to one VAE step, measured side by side.

  python -m benchmarks.step_cost                      # the paper architecture, batch 50
  python -m benchmarks.step_cost --tier=cpu           # the cpu tier's smaller models
  python -m benchmarks.step_cost --hypernet=paper,ha,mlp    # several designs side by side
  python -m benchmarks.step_cost --hypernet=mlp --hypernet_input=image_l2,penultimate
  python -m benchmarks.step_cost --tier=converged --xla_defaults   # without the model's options

Builds the real train steps of stage 1 (VAE), the control and stage 2 (IA-VAE: one per
hypernetwork design and input asked for; experiments.images_train.train_step), each IA-VAE on
the modulated path (the default: no example's parameters formed) and, with --reference (on by
default), on the reference path (each example's parameters formed, the encoder vmapped), on
random data; compiles them; then times them interleaved (VAE, control, each IA-VAE, VAE, ...) so
that machine noise hits all alike. Prints a line per model and, last, a JSON object: vae_step_s
and control_step_s (medians), control_ratio, and per IA-VAE (labelled by its design, or
design/input when several inputs are asked for) iavae_step_s, ratio = iavae_step_s / vae_step_s,
reference_step_s and reference_ratio (the reference path's) and hypernet_params; examples per
second of every model; the XLA options compiled with (images_train.Model.compiler_options, or
none with --xla_defaults). Timings are wall-clock on whatever device JAX uses.
"""

import dataclasses
import json
import statistics
import time

from absl import app, flags

from experiments import common, configs

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "paper", list(configs.IMAGE_TIERS), "Which tier's architecture.")
flags.DEFINE_integer("repeats", 5, "Timed steps per model (after one compiling step).")
flags.DEFINE_bool("xla_defaults", False, "Compile with XLA's default options instead of the "
                  "model's own (images_train.Model.compiler_options).")
flags.DEFINE_list("hypernet", None, "The IA-VAE's hypernetwork design(s), of "
                  f"{', '.join(configs.HYPERNETS)} (default: the configuration's).")
flags.DEFINE_bool("reference", True, "Also time each IA-VAE on the reference path (every "
                  "example's parameters formed, the encoder vmapped), beside the default "
                  "modulated path (iavae_jax.modulated).")
flags.DEFINE_list("hypernet_input", None, "What the IA-VAE's hypernetwork sees, of "
                  f"{', '.join(configs.HYPERNET_INPUTS)} (default: the configuration's).")


def main(argv):
  del argv
  import functools
  import jax
  from iavae_jax import blocks, hypernets, training
  from experiments import images_train

  config = configs.image_config("mnist", FLAGS.tier)
  designs = FLAGS.hypernet or [config.hypernet]
  inputs = FLAGS.hypernet_input or [config.hypernet_input]
  models = {}
  for design in designs:
    for kind in inputs:
      label = design if len(inputs) == 1 else f"{design}/{kind}"
      try:
        models[label] = images_train.Model(dataclasses.replace(
            config, hypernet=design, hypernet_input=kind).validate())
      except common.ConfigError as e:
        raise app.UsageError(str(e)) from e
  vae_model = images_train.Model(config)
  vae = vae_model.init_vae(jax.random.PRNGKey(0))
  dec_params = vae["decoder"]
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  iavae_frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  # name -> (model, stage, params, frozen)
  setups = {
      "vae": (vae_model, "vae", vae, None),
      "control": (vae_model, "control", {"encoder": vae["encoder"], "decoder": dec_params},
                  {"batch_stats": vae["batch_stats"]}),
  }
  for label, model in models.items():
    params = {"hypernet": model.init_hypernet(jax.random.PRNGKey(2), layout),
              "decoder": dec_params}
    setups[f"iavae {label}"] = (model, "iavae", params, iavae_frozen)
    if FLAGS.reference:
      setups[f"iavae {label} reference"] = (dataclasses.replace(model, modulated=False), "iavae",
                                            params, iavae_frozen)
  batch = images_train.Batch(
      jax.random.uniform(jax.random.PRNGKey(3), (config.batch_size, 28, 28)),
      jax.random.PRNGKey(4))
  steps, states = {}, {}
  for name, (model, stage, params, frozen) in setups.items():
    steps[name] = jax.jit(
        functools.partial(images_train.train_step, model=model, stage=stage, steps_per_epoch=1),
        compiler_options={} if FLAGS.xla_defaults else model.compiler_options)
    states[name] = training.init_state(params, images_train.stage_optimizer(model.config, stage),
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
  median = {name: statistics.median(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"{name}: median {median[name]:.4f} s per step of {config.batch_size} "
          f"(min {min(t):.4f}, max {max(t):.4f}), "
          f"{config.batch_size / median[name]:.1f} examples/s", flush=True)
  result = {
      "vae_step_s": median["vae"], "control_step_s": median["control"],
      "control_ratio": median["control"] / median["vae"],
      "iavae_step_s": {label: median[f"iavae {label}"] for label in models},
      "ratio": {label: median[f"iavae {label}"] / median["vae"] for label in models},
      **({"reference_step_s": {label: median[f"iavae {label} reference"] for label in models},
          "reference_ratio": {label: median[f"iavae {label} reference"] / median["vae"]
                              for label in models}} if FLAGS.reference else {}),
      "hypernet_params": {label: hypernets.num_params(model.hypernet(layout),
                                                      model.context_size)
                          for label, model in models.items()},
      "examples_per_s": {name: config.batch_size / median[name] for name in setups},
      "tier": FLAGS.tier, "hypernet": designs,
      "compiler_options": {} if FLAGS.xla_defaults else vae_model.compiler_options,
      "hypernet_input": inputs,
      "batch_size": config.batch_size, "repeats": FLAGS.repeats,
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
