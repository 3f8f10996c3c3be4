r"""The synthetic oracle experiment from the command line.

  python -m experiments.synthetic --workdir=runs/synthetic           # the paper's protocol
  python -m experiments.synthetic --workdir=runs/quick --quick       # reduced, well under a minute

Writes DIR/results.json, DIR/results.md, DIR/figure6_posterior.png, DIR/figure7_efficiency.png,
DIR/metrics.jsonl (every model's per-epoch metrics), DIR/learning_curves.png and Orbax
checkpoints under DIR/checkpoints (with --tensorboard, TensorBoard event files under
DIR/tensorboard); a second run with the same flags resumes from them. Any field of the
configuration can be overridden by the flag of its name. Bad input exits with code 2 and a
message naming the flag; so does a second command on a DIR that a running one holds
(DIR/.lock), naming that one's pid.
"""

import dataclasses

from absl import app, flags

from experiments import common, configs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (created if absent).")
flags.DEFINE_bool("quick", False, "Run the reduced protocol (fewer seeds and epochs).")
common.define_run_flags()
common.define_config_flags(configs.SyntheticConfig)


def config_from_flags() -> configs.SyntheticConfig:
  config = configs.synthetic_quick() if FLAGS.quick else configs.synthetic_full()
  overrides = common.config_overrides(configs.SyntheticConfig)
  return dataclasses.replace(config, **overrides).validate()


def main(argv):
  def body():
    config = config_from_flags()
    with common.workdir_lock(FLAGS.workdir):
      from experiments import synthetic_train  # imports JAX: after the flags are checked
      synthetic_train.train_and_evaluate(config, FLAGS.workdir, common.parallel_from_flags(),
                                         FLAGS.tensorboard)
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
