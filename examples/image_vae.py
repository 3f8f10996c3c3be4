"""The paper's image IA-VAE from the library alone: python examples/image_vae.py [DATA_DIR]

Stage 1 trains a VAE, stage 2 freezes its encoder as phi_AVI and trains a hypernetwork that gives
every image its own encoder (and fine-tunes the decoder), with ``iavae_jax.image_vae``'s train
step of each stage; the control trains the VAE's encoder itself (and its decoder) for as many
steps instead. The three are evaluated on held-out images (ELBO and an importance-weighted
log p(x)). Dense encoder and decoder (the experiments' converged tier), so it runs in a minute on
a CPU. The images are MNIST read from DATA_DIR (the IDX files; see iavae_jax.data.images.load),
or, without it, toy 28x28 images of random rows and columns. Stage 2 starts at the VAE (its
hypernetwork's deltas start near 0) and trains on: the control measures what that extra training
alone gives.
"""

import sys
import time

import jax
import jax.numpy as jnp

from iavae_jax import image_vae, training
from iavae_jax.data import images
from iavae_jax.hparams import ImageVAEConfig

STEPS, BATCH = 300, 100


def load(argv: list) -> tuple[jax.Array, jax.Array]:
  """Training images [N, 28, 28] (grey, binarised afresh at every step) and test images (binary)."""
  if len(argv) > 1:
    data = images.subset(images.load("mnist", data_dir=argv[1], source="local"), 3000, 0, 500)
    return jnp.asarray(data.train), jnp.asarray(data.test)
  rows, cols = jax.random.bernoulli(jax.random.PRNGKey(0), 0.1, (2, 3500, 28))
  toy = (rows[:, :, None] | cols[:, None, :]).astype(jnp.float32)
  return toy[:3000], toy[3000:]


def train(model: image_vae.Model, kind: str, params, frozen, data: jax.Array, seed: int):
  """STEPS optimiser steps of a model of this kind on random batches of data; its parameters."""
  optimizer = image_vae.stage_optimizer(model.config, kind)
  state = training.init_state(params, optimizer, jax.random.PRNGKey(seed), frozen)
  step = jax.jit(lambda state, batch: image_vae.train_step(
      state, batch, model=model, kind=kind, steps_per_epoch=len(data) // BATCH))
  for i in range(STEPS):
    key = jax.random.fold_in(state.key, i)
    picked = jax.random.choice(jax.random.fold_in(key, seed), len(data), (BATCH,), replace=False)
    batch = image_vae.Batch(data[picked], key)
    state, metrics = step(state, batch)
  print(f"{kind}: {STEPS} steps, last loss {float(metrics.loss):.2f}", flush=True)
  return state.params


def test_metrics(model: image_vae.Model, kind: str, params, frozen, test: jax.Array) -> str:
  metrics = image_vae.evaluate(model, image_vae.encode_fn(model, kind, frozen), params, frozen,
                               test, jax.random.PRNGKey(9), test_samples=10, iwae_samples=100,
                               iwae_chunk=100, chunk_size=100)
  return (f"test ELBO {float(jnp.mean(metrics['elbo'])):.2f} nats, "
          f"IWAE (K=100) {float(jnp.mean(metrics['iwae'])):.2f} nats")


def main(argv: list) -> None:
  start = time.time()
  data, test = load(argv)
  config = ImageVAEConfig(encoder="mlp", encoder_hidden=(64,), decoder="mlp",
                          decoder_hidden=(100, 100), warmup_epochs=1).validate()
  model = image_vae.Model(config)
  vae = train(model, "vae", model.init_vae(jax.random.PRNGKey(0)), None, data, seed=1)
  # Stage 2 from the VAE: the IA-VAE's hypernetwork over phi_AVI, and the control (its encoder
  # trained on); each keeps the VAE's batch-norm statistics (none here) frozen.
  trained = {"VAE": ("vae", vae, {})}
  for label, kind, seed in (("IA-VAE", "iavae", 2), ("control", "control", 4)):
    params, frozen = image_vae.stage_start(model, kind, vae, jax.random.PRNGKey(seed))
    trained[label] = (kind, train(model, kind, params, frozen, data, seed=seed + 1), frozen)
  for label, (kind, params, frozen) in trained.items():
    print(f"{label + ':':9s}{test_metrics(model, kind, params, frozen, test)}")
  print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  main(sys.argv)
