r"""The synthetic oracle experiment from the command line.

  python -m experiments.synthetic --workdir=runs/synthetic           # the paper's protocol
  python -m experiments.synthetic --workdir=runs/check --plumbing_check   # the plumbing only

The full protocol takes about a minute on 2 CPU cores. --plumbing_check (formerly --quick, still
accepted) runs every step of it on 2 VAEs x 3 IA-VAEs for 20 epochs at the paper's rate, which
train nothing (VAEs near -900 nats where trained ones reach -5): it checks that the command
works, and its numbers say nothing about the method.

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
from iavae_jax import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (created if absent).")
flags.DEFINE_bool("plumbing_check", False,
                  "Run every step on 2 VAEs x 3 IA-VAEs for 20 epochs: a check that the command "
                  "works, whose numbers say nothing about the method (the full protocol takes "
                  "about a minute).")
flags.DEFINE_alias("quick", "plumbing_check")
common.define_run_flags()
common.define_config_flags(configs.SyntheticConfig,
                           tiers={"full": configs.synthetic_full(),
                                  "plumbing_check": configs.synthetic_plumbing_check()})
flags.adopt_module_key_flags(common)   # --help lists the flags common defines


def config_from_flags() -> configs.SyntheticConfig:
  config = (configs.synthetic_plumbing_check() if FLAGS.plumbing_check
            else configs.synthetic_full())
  overrides = common.config_overrides(configs.SyntheticConfig)
  return dataclasses.replace(config, **overrides).validate()


def main(argv):
  def body():
    config = config_from_flags()
    with runs.workdir_lock(FLAGS.workdir):
      if FLAGS.plumbing_check:   # once the workdir is ours: a refused run prints nothing
        print("--plumbing_check: 20 epochs train nothing; these numbers say nothing about the "
              "method. Run without it for the paper's protocol (about a minute).", flush=True)
      from experiments import synthetic_train  # imports JAX: after the flags are checked
      synthetic_train.train_and_evaluate(config, FLAGS.workdir, common.parallel_from_flags(),
                                         FLAGS.tensorboard)
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
