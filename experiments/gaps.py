r"""The inference gaps of a trained image run, and test-time refinement, from the command line.

  python -m experiments.images --dataset=mnist --tier=cpu --workdir=runs/cpu/mnist ...
  python -m experiments.gaps --workdir=runs/cpu/mnist [--num_examples=1000]

For every model (stage) and seed of the experiments.images run in DIR, with its decoder fixed,
on the first --num_examples images of the test split: L[q] (the amortised ELBO), L[q*] (a
diagonal Gaussian optimised per example), log p^(x) (importance sampling with q* as the
proposal), the approximation gap log p^ - L[q*] and the amortization gap L[q*] - L[q]; the share
of its seed's VAE amortization gap that each other model closes; and SA-VAE's test-time
refinement curve (ELBO after K gradient steps from the encoder's output, and its wall time).
Writes DIR/gaps.json, DIR/gaps.md and DIR/gaps_refinement.png (the schema and how to read them:
experiments/gaps_eval.py) and per (model, seed) partial results under DIR/gaps/; the same
command again resumes, and other settings in the same DIR are refused. The settings' defaults
depend on the run's tier; every one can be overridden by the flag of its name. Bad input exits
with code 2 and writes nothing.
"""

import dataclasses
import os

from absl import app, flags

from experiments import common, configs
from iavae_jax import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The directory of a finished experiments.images run.")
flags.DEFINE_string("data_dir", None, "Where the run's data are now, if they moved (default: "
                    "where DIR/data.json says they were).")

common.define_config_flags(configs.GapsConfig, exclude=("tier",),
                           tiers={tier: configs.gaps_config(tier) for tier in configs.IMAGE_TIERS})
flags.adopt_module_key_flags(common)   # --help lists the flags common defines


def run_config(workdir: str) -> configs.ImageConfig:
  """The configuration recorded in DIR/config.json by a finished experiments.images run."""
  if not all(os.path.isfile(os.path.join(workdir, f)) for f in ("results.json", "config.json")):
    raise common.ConfigError(
        f"--workdir={workdir} holds no finished experiments.images run (no results.json and "
        "config.json): there are no trained models to measure. Run experiments.images there "
        "first, to the end.")
  return runs.read_config(workdir, configs.ImageConfig, "experiments.images").validate()


def config_from_flags(tier: str) -> configs.GapsConfig:
  overrides = common.config_overrides(configs.GapsConfig, exclude=("tier",))
  return dataclasses.replace(configs.gaps_config(tier), **overrides).validate()


def main(argv):
  def body():
    if FLAGS.num_examples is not None and FLAGS.num_examples <= 0:
      raise common.ConfigError(f"--num_examples must be a positive number of test images, got "
                               f"{FLAGS.num_examples} (omit it for the tier's default).")
    if not FLAGS.workdir or not os.path.isdir(FLAGS.workdir):
      raise common.ConfigError(f"--workdir={FLAGS.workdir} holds no finished "
                               "experiments.images run (no such directory).")
    with runs.workdir_lock(FLAGS.workdir):
      image_config = run_config(FLAGS.workdir)
      config = config_from_flags(image_config.tier)
      from experiments import gaps_eval  # imports JAX: after the flags are known to be sound
      gaps_eval.measure(image_config, config, FLAGS.workdir, FLAGS.data_dir)
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
