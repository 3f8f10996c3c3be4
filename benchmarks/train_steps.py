"""What the step benchmarks share: the image experiments' real train steps of the VAE, the
control and IA-VAEs (one per design and input, on the modulated path and, if asked, on the
reference path), built on random data, and their steps timed interleaved (VAE, control, each
IA-VAE, VAE, ...) so that machine noise hits all alike."""

import dataclasses
import functools
import time
from typing import NamedTuple

import jax

from iavae_jax import blocks, hypernets, image_vae, training
from iavae_jax.hparams import ImageVAEConfig


class Setup(NamedTuple):
  """One model's jitted step, its state and its batch."""
  step: object
  state: training.TrainState
  batch: image_vae.Batch
  model: image_vae.Model
  layout: blocks.BlockLayout


def build(config: ImageVAEConfig, iavaes: dict[str, ImageVAEConfig], batch_size: int,
          reference: bool = False,
          xla_defaults: bool = False, control: bool = True) -> dict[str, Setup]:
  """{"vae"[, "control"], "iavae LABEL"[, "iavae LABEL reference"]: Setup}: the train step of
  each model, compiled (one step run), on a random batch of batch_size images.
  ``iavaes`` maps a label to an IA-VAE's configuration (the same architecture as ``config``)."""
  vae_model = image_vae.Model(config)
  vae = vae_model.init_vae(jax.random.PRNGKey(0))
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  iavae_frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  models = {"vae": (vae_model, "vae", vae, None)}   # name -> (model, kind, params, frozen)
  if control:
    models["control"] = (vae_model, "control",
                         {"encoder": vae["encoder"], "decoder": vae["decoder"]},
                         {"batch_stats": vae["batch_stats"]})
  for label, iavae_config in iavaes.items():
    model = image_vae.Model(iavae_config)
    params = {"hypernet": model.init_hypernet(jax.random.PRNGKey(2), layout),
              "decoder": vae["decoder"]}
    models[f"iavae {label}"] = (model, "iavae", params, iavae_frozen)
    if reference and model.feedback is None:   # the feedback inputs have no reference path
      models[f"iavae {label} reference"] = (dataclasses.replace(model, modulated=False), "iavae",
                                            params, iavae_frozen)
  batch = image_vae.Batch(
      jax.random.uniform(jax.random.PRNGKey(3), (batch_size, 28, 28)),
      jax.random.PRNGKey(4))
  setups = {}
  for name, (model, kind, params, frozen) in models.items():
    step = jax.jit(
        functools.partial(image_vae.train_step, model=model, kind=kind, steps_per_epoch=1),
        compiler_options={} if xla_defaults else model.compiler_options)
    state = training.init_state(params, image_vae.stage_optimizer(model.config, kind),
                                jax.random.PRNGKey(5), frozen)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"{name}: compiled and ran one step in {time.perf_counter() - t0:.1f} s", flush=True)
    setups[name] = Setup(step, state, batch, model, layout)
  return setups


def time_steps(setups: dict[str, Setup], repeats: int) -> dict[str, list[float]]:
  """The seconds of each model's ``repeats`` steps, its steps interleaved with the others'."""
  states = {name: setup.state for name, setup in setups.items()}
  times = {name: [] for name in setups}
  for _ in range(repeats):
    for name, setup in setups.items():
      t0 = time.perf_counter()
      states[name], metrics = setup.step(states[name], setup.batch)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - t0)
  return times


def peak_bytes(setup: Setup) -> int:
  """The step's peak memory as XLA's buffer assignment plans it (arguments, outputs and
  temporaries live at once), from its compiled form."""
  return int(setup.step.lower(setup.state, setup.batch).compile().memory_analysis()
             .peak_memory_in_bytes)


def hypernet_params(setup: Setup) -> int:
  return hypernets.num_params(setup.model.hypernet(setup.layout), setup.model.context_size)
