r"""The cost of one IA-VAE training step relative to one VAE step, measured side by side.

  python -m benchmarks.step_cost                      # the paper architecture, batch 50
  python -m benchmarks.step_cost --tier=cpu           # the cpu tier's smaller models
  python -m benchmarks.step_cost --hypernet=paper,ha,mlp    # several designs side by side
  python -m benchmarks.step_cost --hypernet=mlp --hypernet_input=image_l2,penultimate
  python -m benchmarks.step_cost --tier=converged --xla_defaults   # without the model's options

Builds the real train steps of stage 1 (VAE), the control and stage 2 (IA-VAE: one per
hypernetwork design and input asked for; iavae_jax.image_vae.train_step), each IA-VAE on
the modulated path (the default: no example's parameters formed) and, with --reference (on by
default), on the reference path (each example's parameters formed, the encoder vmapped), on
random data; compiles them; then times them interleaved (VAE, control, each IA-VAE, VAE, ...) so
that machine noise hits all alike. Prints a line per model and, last, a JSON object: vae_step_s
and control_step_s (medians), control_ratio, and per IA-VAE (labelled by its design, or
design/input when several inputs are asked for) iavae_step_s, ratio = iavae_step_s / vae_step_s,
reference_step_s and reference_ratio (the reference path's, where it has one: not for the
feedback inputs) and hypernet_params; examples per
second of every model; the XLA options compiled with (image_vae.Model.compiler_options, or
none with --xla_defaults). Timings are wall-clock on whatever device JAX uses.
"""

import dataclasses
import json
import statistics

from absl import app, flags

from experiments import common, configs
from iavae_jax import hparams

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "paper", list(configs.IMAGE_TIERS), "Which tier's architecture.")
flags.DEFINE_integer("repeats", 5, "Timed steps per model (after one compiling step).")
flags.DEFINE_bool("xla_defaults", False, "Compile with XLA's default options instead of the "
                  "model's own (image_vae.Model.compiler_options).")
flags.DEFINE_list("hypernet", None, "The IA-VAE's hypernetwork design(s), of "
                  f"{', '.join(hparams.DESIGNS)} (default: the configuration's).")
flags.DEFINE_bool("reference", True, "Also time each IA-VAE on the reference path (every "
                  "example's parameters formed, the encoder vmapped), beside the default "
                  "modulated path (iavae_jax.modulated).")
flags.DEFINE_list("hypernet_input", None, "What the IA-VAE's hypernetwork sees, of "
                  f"{', '.join(hparams.HYPERNET_INPUTS)} (default: the configuration's).")


def main(argv):
  del argv
  import jax
  from benchmarks import train_steps

  config = configs.image_config("mnist", FLAGS.tier)
  designs = FLAGS.hypernet or [config.hypernet]
  inputs = FLAGS.hypernet_input or [config.hypernet_input]
  iavaes = {}
  for design in designs:
    for kind in inputs:
      label = design if len(inputs) == 1 else f"{design}/{kind}"
      try:
        iavaes[label] = dataclasses.replace(config, hypernet=design,
                                            hypernet_input=kind).validate()
      except common.ConfigError as e:
        raise app.UsageError(str(e)) from e
  setups = train_steps.build(config, iavaes, config.batch_size, FLAGS.reference,
                             FLAGS.xla_defaults)
  times = train_steps.time_steps(setups, FLAGS.repeats)
  median = {name: statistics.median(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"{name}: median {median[name]:.4f} s per step of {config.batch_size} "
          f"(min {min(t):.4f}, max {max(t):.4f}), "
          f"{config.batch_size / median[name]:.1f} examples/s", flush=True)
  result = {
      "vae_step_s": median["vae"], "control_step_s": median["control"],
      "control_ratio": median["control"] / median["vae"],
      "iavae_step_s": {label: median[f"iavae {label}"] for label in iavaes},
      "ratio": {label: median[f"iavae {label}"] / median["vae"] for label in iavaes},
      "reference_step_s": {label: median[f"iavae {label} reference"] for label in iavaes
                           if f"iavae {label} reference" in median},
      "reference_ratio": {label: median[f"iavae {label} reference"] / median["vae"]
                          for label in iavaes if f"iavae {label} reference" in median},
      "hypernet_params": {label: train_steps.hypernet_params(setups[f"iavae {label}"])
                          for label in iavaes},
      "examples_per_s": {name: config.batch_size / median[name] for name in setups},
      "tier": FLAGS.tier, "hypernet": designs,
      "compiler_options": {} if FLAGS.xla_defaults else setups["vae"].model.compiler_options,
      "hypernet_input": inputs,
      "batch_size": config.batch_size, "repeats": FLAGS.repeats,
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
