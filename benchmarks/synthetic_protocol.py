r"""Times the full synthetic protocol (110 trainings, Table 3, the width sweep, the gap
decomposition) from scratch in a temporary workdir, and prints the measured seconds.

  python -m benchmarks.synthetic_protocol [--plumbing_check]

The last line is a JSON object: {"wall_seconds": ..., "stage_seconds": {...}, "devices": ...}.
On one device the stages "sweep" and "posterior" run on a second thread while "vae" and "iavae"
run, so the stage seconds add up to more than the wall seconds.
"""

import json
import sys
import tempfile

from absl import app, flags, logging

from experiments import configs, synthetic_train

flags.DEFINE_bool("plumbing_check", False,
                  "Time experiments.synthetic --plumbing_check's protocol instead.")
flags.DEFINE_alias("quick", "plumbing_check")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = (configs.synthetic_plumbing_check() if flags.FLAGS.plumbing_check
            else configs.synthetic_full())
  with tempfile.TemporaryDirectory() as workdir:
    results = synthetic_train.train_and_evaluate(config, workdir)
  import jax
  print(json.dumps({"wall_seconds": round(results["wall_seconds"], 2),
                    "stage_seconds": {k: round(v, 2) for k, v in
                                      results["stage_seconds"].items()},
                    "devices": jax.device_count(), "backend": jax.default_backend()}))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
