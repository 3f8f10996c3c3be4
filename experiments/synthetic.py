r"""The synthetic oracle experiment from the command line.

  python -m experiments.synthetic --workdir=runs/synthetic           # the paper's protocol
  python -m experiments.synthetic --workdir=runs/quick --quick       # reduced, well under a minute

Writes DIR/results.json, DIR/results.md, DIR/figure6_posterior.png, DIR/figure7_efficiency.png,
DIR/metrics.jsonl and Orbax checkpoints under DIR/checkpoints; a second run with the same flags
resumes from them. Any field of the configuration can be overridden by the flag of its name.
Bad input exits with code 2 and a message naming the flag; so does a second command on a DIR
that a running one holds (DIR/.lock), naming that one's pid.
"""

import dataclasses

from absl import app, flags

from experiments import common, configs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (created if absent).")
flags.DEFINE_bool("quick", False, "Run the reduced protocol (fewer seeds and epochs).")
common.define_run_flags()

_INT_FIELDS = ["num_examples", "data_seed", "seed", "encoder_width", "embed_dim", "batch_size",
               "max_epochs", "patience", "num_samples", "num_vae_seeds", "num_iavae_seeds",
               "num_sweep_seeds", "epochs_per_call", "checkpoint_every"]
_FLOAT_FIELDS = ["sigma", "learning_rate", "hypernet_init_std"]
for _name in _INT_FIELDS:
  flags.DEFINE_integer(_name, None, f"Override the configuration's {_name}.")
for _name in _FLOAT_FIELDS:
  flags.DEFINE_float(_name, None, f"Override the configuration's {_name}.")
flags.DEFINE_list("sweep_widths", None, "Override the encoder widths of the Figure 7 sweep.")


def config_from_flags() -> configs.SyntheticConfig:
  config = configs.synthetic_quick() if FLAGS.quick else configs.synthetic_full()
  overrides = {name: FLAGS[name].value for name in _INT_FIELDS + _FLOAT_FIELDS
               if FLAGS[name].value is not None}
  if FLAGS.sweep_widths is not None:
    try:
      overrides["sweep_widths"] = tuple(int(w) for w in FLAGS.sweep_widths)
    except ValueError as e:
      raise common.ConfigError(f"--sweep_widths must be a comma-separated list of integers, got "
                               f"{','.join(FLAGS.sweep_widths)}.") from e
  return dataclasses.replace(config, **overrides).validate()


def main(argv):
  def body():
    config = config_from_flags()
    with common.workdir_lock(FLAGS.workdir):
      from experiments import synthetic_train  # imports JAX: after the flags are checked
      synthetic_train.train_and_evaluate(config, FLAGS.workdir, common.parallel_from_flags())
  common.run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
