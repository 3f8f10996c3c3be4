r"""The image experiments (paper section 4.2, Table 4, Figure 8) from the command line.

  python -m experiments.images --dataset=mnist --tier=cpu --workdir=runs/cpu/mnist \
      --data_dir=data/mnist-5k
  python -m experiments.images --dataset=omniglot --tier=paper --workdir=runs/paper/omniglot
  python -m experiments.report --workdir=runs/cpu        # Table 4 over every data set

Tiers (experiments/configs.py gives each one's command, wall time and measured numbers):
``paper`` (the paper's architecture and protocol, 10 seeds: for GPU/TPU), ``cpu`` (same families,
smaller, 5 seeds: the whole comparison on a 2-core CPU), ``converged`` (dense models, every one
trained to early stopping, every ablation), ``smoke`` (a plumbing check of minutes, for tests).
Writes DIR/results.json (per-seed test metrics of vae, iavae and control), DIR/results.md,
DIR/figure8_reconstructions.png, DIR/metrics.jsonl (every model's per-epoch metrics),
DIR/learning_curves.png and Orbax checkpoints under DIR/checkpoints (with --tensorboard,
TensorBoard event files under DIR/tensorboard); the same command again resumes. Any
configuration field can be overridden by the flag of its name. Bad input exits with code 2 and
a message naming the flag or file; so does a second command on a DIR that a running one holds
(DIR/.lock), naming that one's pid.
"""

import dataclasses

from absl import app, flags

from experiments import common, configs
from iavae_jax import runs
from iavae_jax.data import DATASETS, SOURCES

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (created if absent).")
flags.DEFINE_string("dataset", None, f"One of {', '.join(DATASETS)}.")
flags.DEFINE_string("tier", "paper", f"One of {', '.join(configs.IMAGE_TIERS)}.")
flags.DEFINE_string("data_dir", None, "Directory of local data files or of prepared TFDS data "
                    "(default: the data set's usual place, e.g. "
                    "/usr/share/datasets/fashion-mnist).")
flags.DEFINE_enum("source", "auto", list(SOURCES),
                  "Where to read the data: local files, TFDS, or local when present.")
common.define_run_flags()
# The help gives each tier's value for MNIST (other data sets differ in weight_decay only).
common.define_config_flags(configs.ImageConfig, exclude=("dataset", "tier"),
                           tiers={tier: configs.image_config("mnist", tier)
                                  for tier in configs.IMAGE_TIERS})
flags.adopt_module_key_flags(common)   # --help lists the flags common defines


def config_from_flags() -> configs.ImageConfig:
  if FLAGS.dataset is None:
    raise common.ConfigError(f"--dataset is required: one of {', '.join(DATASETS)}.")
  config = configs.image_config(FLAGS.dataset, FLAGS.tier)   # refuses an unknown one of them
  overrides = common.config_overrides(configs.ImageConfig, exclude=("dataset", "tier"))
  return dataclasses.replace(config, **overrides).validate()


def main(argv):
  def body():
    config = config_from_flags()
    if FLAGS.parallel == "seeds":
      raise common.ConfigError("--parallel=seeds splits a population of models over the "
                               "devices; the image experiment trains one model at a time: use "
                               "--parallel=data.")
    with runs.workdir_lock(FLAGS.workdir):
      from experiments import images_train  # imports JAX: after the flags are known to be sound
      images_train.train_and_evaluate(config, FLAGS.workdir, FLAGS.data_dir, FLAGS.source,
                                      common.parallel_from_flags(), FLAGS.tensorboard)
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
