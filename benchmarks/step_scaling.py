r"""Step time and peak memory of the VAE and every IA-VAE design against batch size and encoder
width, measured side by side.

  python -m benchmarks.step_scaling                                   # converged tier, CPU grid
  python -m benchmarks.step_scaling --plot=docs/figures/step_scaling.png
  python -m benchmarks.step_scaling --tier=paper --batch_sizes=50 --widths=1   # the paper's

For every encoder width (every encoder width of the tier scaled by --widths: the converged
tier's dense encoder (64,) -> (64 w,), the paper tier's ResNet channels (64, 64, 64) -> 64 w) and
batch size, builds the train steps of the VAE and of the IA-VAE of every --hypernet design on the
modulated path (iavae_jax.modulated; benchmarks.train_steps), times them interleaved (medians of
--repeats steps) and reads each step's peak memory from XLA's buffer assignment (arguments,
outputs and temporaries: the device memory the step needs, whatever the device). Prints a table
row per model and grid point, then one JSON object: per point, each model's step_s and
peak_bytes and the IA-VAEs' ratios to the VAE; with --plot, a figure of those ratios.
"""

import dataclasses
import json
import statistics

from absl import app, flags

from experiments import common, configs
from iavae_jax import hparams

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "converged", ["converged", "paper"], "Which tier's architecture.")
flags.DEFINE_list("batch_sizes", ["50", "100", "200", "500", "1000"], "Batch sizes.")
flags.DEFINE_list("widths", ["1", "4", "16"], "Encoder width multipliers.")
flags.DEFINE_list("hypernet", list(hparams.DESIGNS), "IA-VAE designs.")
flags.DEFINE_integer("repeats", 3, "Timed steps per model and grid point (after one compiling "
                     "step).")
flags.DEFINE_string("plot", None, "Write the ratios' figure to this PNG path.")


def _config(tier: str, width: int, batch_size: int) -> configs.ImageConfig:
  base = configs.image_config("mnist", tier)
  if base.encoder == "mlp":
    widths = {"encoder_hidden": tuple(h * width for h in base.encoder_hidden)}
  else:
    widths = {"encoder_channels": tuple(c * width for c in base.encoder_channels)}
  return dataclasses.replace(base, batch_size=batch_size, **widths).validate()


def _plot(points: list[dict], designs: list[str], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  styles = ["-", "--", ":", "-."]
  for w_index, width in enumerate(sorted({p["width"] for p in points})):
    rows = sorted((p for p in points if p["width"] == width), key=lambda p: p["batch_size"])
    for d_index, design in enumerate(designs):
      for axis, key in zip(axes, ("step_ratio", "memory_ratio")):
        axis.plot([p["batch_size"] for p in rows], [p[key][design] for p in rows],
                  styles[w_index % len(styles)], color=f"C{d_index}", marker="o",
                  label=f"{design}, width x{width}")
  for axis, title in zip(axes, ("step time / VAE's", "peak memory / VAE's")):
    axis.set(xscale="log", yscale="log", xlabel="batch size", title=title)
    axis.axhline(1.0, color="grey", linewidth=0.8)
  axes[1].legend(fontsize=7)
  figure.suptitle(f"IA-VAE train step against the VAE's ({FLAGS.tier} tier architecture)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def main(argv):
  del argv
  import jax
  from benchmarks import train_steps

  try:
    grid = [(int(w), int(b)) for w in FLAGS.widths for b in FLAGS.batch_sizes]
    for design in FLAGS.hypernet:
      if design not in hparams.DESIGNS:
        raise common.ConfigError(f"--hypernet={design} is not known; choose among "
                                 f"{', '.join(hparams.DESIGNS)}.")
    if any(w <= 0 or b <= 0 for w, b in grid):
      raise common.ConfigError("--widths and --batch_sizes must be positive integers.")
  except ValueError as e:
    raise app.UsageError(f"--widths and --batch_sizes must be integers: {e}") from e
  except common.ConfigError as e:
    raise app.UsageError(str(e)) from e
  points = []
  print(f"{'width':>5} {'batch':>5} {'model':>6} {'step ms':>9} {'/VAE':>6} {'peak MiB':>9} "
        f"{'/VAE':>6}", flush=True)
  for width, batch_size in grid:
    config = _config(FLAGS.tier, width, batch_size)
    setups = train_steps.build(
        config, {d: dataclasses.replace(config, hypernet=d) for d in FLAGS.hypernet},
        config.batch_size, control=False)
    times = train_steps.time_steps(setups, FLAGS.repeats)
    step = {name.removeprefix("iavae "): statistics.median(t) for name, t in times.items()}
    peak = {name.removeprefix("iavae "): train_steps.peak_bytes(setup)
            for name, setup in setups.items()}
    point = {"width": width, "batch_size": batch_size, "step_s": step, "peak_bytes": peak,
             "step_ratio": {d: step[d] / step["vae"] for d in FLAGS.hypernet},
             "memory_ratio": {d: peak[d] / peak["vae"] for d in FLAGS.hypernet}}
    points.append(point)
    for name in step:
      print(f"{width:>5} {batch_size:>5} {name:>6} {1e3 * step[name]:>9.2f} "
            f"{step[name] / step['vae']:>6.2f} {peak[name] / 2**20:>9.1f} "
            f"{peak[name] / peak['vae']:>6.2f}", flush=True)
  if FLAGS.plot:
    _plot(points, FLAGS.hypernet, FLAGS.plot)
  print(json.dumps({"tier": FLAGS.tier, "repeats": FLAGS.repeats, "points": points,
                    "backend": jax.default_backend(), "device": str(jax.devices()[0])}))


if __name__ == "__main__":
  app.run(main)
