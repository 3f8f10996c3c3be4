r"""Times the full synthetic protocol (110 trainings, Table 3, the width sweep, the gap
decomposition) from scratch in a temporary workdir, and prints the measured seconds.

  python -m benchmarks.synthetic_protocol [--plumbing_check]

Runs the command a user runs (python -m experiments.synthetic), its output hidden, and reads
its results.json. The last line is a JSON object: {"wall_seconds": ..., "stage_seconds":
{...}, "devices": ...}. On one device the stages "sweep" and "posterior" run on a second thread
while "vae" and "iavae" run, so the stage seconds add up to more than the wall seconds.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_bool("plumbing_check", False,
                  "Time experiments.synthetic --plumbing_check's protocol instead.")
flags.DEFINE_alias("quick", "plumbing_check")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "experiments.synthetic", f"--workdir={workdir}"]
    if flags.FLAGS.plumbing_check:
      command.append("--plumbing_check")
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
      sys.exit(f"{' '.join(command)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
  environment = results["environment"]
  print(json.dumps({"wall_seconds": round(results["wall_seconds"], 2),
                    "stage_seconds": {k: round(v, 2) for k, v in
                                      results["stage_seconds"].items()},
                    "devices": environment["devices"],
                    "backend": environment["backend"]}), flush=True)


if __name__ == "__main__":
  app.run(main)
