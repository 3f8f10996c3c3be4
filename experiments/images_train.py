"""The image experiments: stage 1 VAE, stage 2 IA-VAE, the epoch-matched control, ablations,
evaluation.

For each seed, the models in ``config.models`` (``MODEL_SPECS``) are trained one after the other,
each alone: ``train_step`` is one optimiser step of a stage, ``make_epoch_fn`` loops over it in
Python (XLA:CPU is slow on convolution gradients inside lax.scan), and the shared ``training`` and
``stages`` machinery adds early stopping, Orbax checkpoints, resume and the learning curves:
  vae     : SA-VAE's model (ResNet encoder with batch norm, gated PixelCNN decoder: without a
            blind spot, or Kim et al.'s exactly; or the dense encoder and decoder of
            ``config.encoder``/``config.decoder``), KL warm-up;
  iavae   : the VAE's encoder frozen as phi_AVI, batch-norm statistics frozen; the
            hypernetwork, its embeddings and the decoder trained (paper section 4.2);
  control : the VAE trained on from its best parameters with stage 2's schedule, optimiser,
            learning rates, weight decay and frozen batch-norm statistics, the encoder itself in
            the hypernetwork's place: so a gain of IA-VAE over the control is not just extra
            training. (Matched in epochs, not FLOPs: an IA-VAE step costs more. Weight decay
            pulls the control's encoder toward 0 and the IA-VAE's hypernetwork toward phi_AVI.)
and the ablations that isolate what instance adaptation buys:
  iavae_frozen_decoder, control_frozen_decoder : stage 2 with the VAE's decoder frozen, so that
            only inference can improve: any gain is amortization gap closed. They share the
            keys (initialisation, data order, noise) of iavae and control, for paired tests;
  vae_matched : a VAE whose encoder is widened (every width scaled alike) to at least as many
            parameters as the VAE's encoder plus the hypernetwork, trained as the VAE is;
  corrector, corrector_frozen_decoder : the hypernetwork's input into a network that corrects
            the frozen encoder's mean and log-variance directly (iavae_jax.feedback.Corrector,
            about as many parameters as the hypernetwork): does writing the encoder's
            parameters add anything over correcting its outputs?
  iavae_mean_context, iavae_frozen_decoder_mean_context (evaluated, not trained): the trained
            IA-VAE with the hypernetwork's input (with a feedback input, the feedback) replaced
            by its mean over the training split. What it keeps of its gain this way is not
            instance-specific.
Every model is selected on the validation ELBO and evaluated on the test split: ELBO and KL with
``test_samples`` samples per example, and an importance-weighted estimate of log p(x) with
``iwae_samples`` samples.

The hypernetwork is the design ``config.hypernet`` (``Model.hypernet``: the paper's structured
one, Ha et al.'s static one, or an MLP generator; iavae_jax.hypernets). What it sees of x is
``config.hypernet_input`` (``Model.context_fn``): the flattened binarised image (the paper's
x), the same over its Euclidean norm (the default), or the frozen stage-1 encoder's mean and
log-variance or penultimate feature; or, with the decoder's feedback (``gradient``,
``residual``), [the image over its norm; the current mean and log-variance; the feedback there],
recomputed at each of ``config.passes`` passes.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax import adaptive, blocks, distributions, hypernets, modulated, objectives
from iavae_jax import feedback as feedback_lib
from iavae_jax import plots, training
from iavae_jax import parallel as parallel_lib
from iavae_jax.data import images
from iavae_jax.models import decoders, encoders, pixelcnn
from experiments import common, stages
from experiments.configs import FEEDBACK_INPUTS, ImageConfig

STAGE_IDS = {"vae": 1, "iavae": 2, "control": 3, "eval": 4, "vae_matched": 5, "corrector": 6}
FEEDBACK_KEY = 7   # the fixed noise of the gradient feedback, folded with the pass
# An IA-VAE's evaluated-only ablation: its hypernetwork's input (with a feedback input, the
# feedback) replaced by its mean over the training split, named after the IA-VAE with this suffix.
MEAN_SUFFIX = "_mean_context"
MEAN_CONTEXT = "iavae" + MEAN_SUFFIX
ADAPTED = ("iavae", "iavae_frozen_decoder")   # the IA-VAEs whose ablation is evaluated


class ModelSpec(NamedTuple):
  """One trainable model of an image run."""
  kind: str                     # "vae", "iavae", "control" or "corrector": its step, encoder
                                # and optimiser
  stage_id: int                 # its keys: initialisation, data order and noise (STAGE_IDS)
  freeze_decoder: bool = False  # stage 2 with the VAE's decoder fixed
  matched: bool = False         # its encoder widened to the VAE's encoder + hypernetwork size


MODEL_SPECS = {
    "vae": ModelSpec("vae", STAGE_IDS["vae"]),
    "iavae": ModelSpec("iavae", STAGE_IDS["iavae"]),
    "control": ModelSpec("control", STAGE_IDS["control"]),
    "iavae_frozen_decoder": ModelSpec("iavae", STAGE_IDS["iavae"], freeze_decoder=True),
    "control_frozen_decoder": ModelSpec("control", STAGE_IDS["control"], freeze_decoder=True),
    "vae_matched": ModelSpec("vae", STAGE_IDS["vae_matched"], matched=True),
    "corrector": ModelSpec("corrector", STAGE_IDS["corrector"]),
    "corrector_frozen_decoder": ModelSpec("corrector", STAGE_IDS["corrector"],
                                          freeze_decoder=True),
}


def evaluated_models(config: ImageConfig) -> tuple[str, ...]:
  """The models a run reports: those it trains, and the mean-input ablation of each IA-VAE it
  trains (ADAPTED)."""
  return config.models + tuple(name + MEAN_SUFFIX for name in ADAPTED if name in config.models)


def ablated(name: str) -> str | None:
  """The trained IA-VAE whose mean-input ablation ``name`` is, or None."""
  return name[:-len(MEAN_SUFFIX)] if name.endswith(MEAN_SUFFIX) else None


# encode(params, frozen, x [B, 28, 28, 1]) -> (mean [B, k], log_var [B, k]), batch norm frozen.
EncodeFn = Callable
# context_fn(t, mean [B, k], log_var [B, k]) -> [B, context_size]: the inference network's input
# at pass t (Model.context_fn).
ContextFn = Callable


@dataclasses.dataclass(frozen=True)
class Model:
  """The modules of one configuration (hashable: closed over by jitted functions).

  ``modulated`` selects how the IA-VAE applies its hypernetwork's deltas: without forming any
  example's parameters (``modulated.modulated_encode``, the default), or on the reference path,
  each example's parameters formed and the encoder vmapped over them
  (``adaptive.instance_adaptive_encode``). The two agree to float rounding. The feedback inputs
  take the modulated path only.
  """
  config: ImageConfig
  modulated: bool = True

  @property
  def encoder(self):
    """x [B, 28, 28, 1] -> (mean, log_var) [B, k]; ``train`` for batch norm (ResNet)."""
    if self.config.encoder == "mlp":
      return encoders.MLPImageEncoder(self.config.encoder_hidden, self.config.latent_dim)
    return encoders.ResNetEncoder(self.config.encoder_channels, self.config.latent_dim)

  @property
  def compiler_options(self) -> dict:
    """XLA options for the training steps and validation: on CPU, a dense encoder and decoder
    train 2-3x faster without XLA's YNNPACK reductions and with its loop emitters
    (benchmarks/step_cost.py); the convolutional models gain nothing, so they keep the defaults."""
    dense = self.config.encoder == "mlp" and self.config.decoder == "mlp"
    return training.cpu_compiler_options(loop_emitters=True) if dense else {}

  @property
  def per_example_encoder(self):
    """The encoder as applied to one example's own parameters under vmap on the reference path
    (convolutions as matmuls; a dense encoder vmaps well as it is)."""
    if self.config.encoder == "mlp":
      return self.encoder
    return encoders.ResNetEncoder(self.config.encoder_channels, self.config.latent_dim,
                                  as_matmul=True)

  @property
  def decoder(self):
    """decoder(x [B, 28, 28, 1], z [B, k]) -> Bernoulli logits [B, 28, 28, 1]."""
    if self.config.decoder == "mlp":
      return decoders.MLPDecoder(self.config.decoder_hidden)
    return pixelcnn.GatedPixelCNN(self.config.decoder_features, self.config.decoder_kernel_sizes,
                                  self.config.latent_feature_maps,
                                  sa_vae_masking=self.config.decoder == "pixelcnn_kim")

  def init_vae(self, key: jax.Array) -> dict:
    """A VAE's initial parameters {encoder, decoder, batch_stats} (batch_stats {} for an encoder
    without batch norm)."""
    x0 = jnp.zeros((1, 28, 28, 1))
    enc_key, dec_key = jax.random.split(key)
    enc_vars = self.encoder.init(enc_key, x0)
    decoder = self.decoder.init(dec_key, x0, jnp.zeros((1, self.config.latent_dim)))["params"]
    return {"encoder": enc_vars["params"], "decoder": decoder,
            "batch_stats": enc_vars.get("batch_stats", {})}

  def hypernet(self, layout: blocks.BlockLayout) -> nn.Module:
    """The design ``config.hypernet`` over layout (``hypernets.make_hypernet``), with the
    configuration's embedding sizes, initial scale and, where set, hidden width, gains and a
    learned projection of the context (``hypernets.ProjectedContext``)."""
    config = self.config
    fields = {"block_embed_dim": config.block_embed_dim, "init_std": config.hypernet_init_std}
    if config.hypernet == "ha":
      fields["block_gains"] = config.ha_block_gains
    else:
      fields["input_embed_dim"] = config.input_embed_dim
    if config.hypernet_hidden:
      fields["hidden_dim"] = config.hypernet_hidden
    hypernet = hypernets.make_hypernet(config.hypernet, layout, **fields)
    if config.hypernet_projection:
      return hypernets.ProjectedContext(hypernet, config.hypernet_projection)
    return hypernet

  @property
  def feedback(self) -> str | None:
    """The decoder's feedback the inference sees (a FEEDBACK_INPUTS kind), or None."""
    kind = self.config.hypernet_input
    return kind if kind in FEEDBACK_INPUTS else None

  @property
  def feedback_size(self) -> int:
    """The size of one example's feedback: gradient 4 k (log-magnitude and sign of the two
    [k] gradients), residual the image's 784 pixels; 0 without feedback."""
    return {"gradient": 4 * self.config.latent_dim, "residual": 28 * 28, None: 0}[self.feedback]

  @property
  def context_size(self) -> int:
    """The size of what the hypernetwork (or the corrector) sees of one example
    (``context_fn``)."""
    x0 = jnp.zeros((1, 28, 28, 1))
    variables = jax.eval_shape(self.encoder.init, jax.random.PRNGKey(0), x0)
    frozen = {"phi_avi": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    size = jax.eval_shape(self.hypernet_context, frozen, x0).shape[-1]
    return size + (2 * self.config.latent_dim + self.feedback_size if self.feedback else 0)

  def init_hypernet(self, key: jax.Array, layout: blocks.BlockLayout):
    return self.hypernet(layout).init(key, jnp.zeros(self.context_size))["params"]

  @property
  def corrector(self) -> feedback_lib.Corrector:
    """The direct-correction model: iavae_jax.feedback's Corrector on the hypernetwork's input,
    two ELU layers of config.corrector_hidden units, or (0) of the width that gives it about as
    many parameters as the hypernetwork."""
    width = self.config.corrector_hidden
    if not width:
      layout = blocks.BlockLayout.from_tree(_encoder_shapes(self)["params"])
      target = hypernets.num_params(self.hypernet(layout), self.context_size)
      # (m + 1) w + (w + 1) w + (w + 1) 2k parameters = target, for w.
      k2, b = 2 * self.config.latent_dim, self.context_size + 2 + 2 * self.config.latent_dim
      width = max(1, round((-b + math.sqrt(b * b + 4 * (target - k2))) / 2))
    return feedback_lib.Corrector(self.config.latent_dim, (width, width))

  def init_corrector(self, key: jax.Array):
    return self.corrector.init(key, jnp.zeros((1, self.context_size)))["params"]

  def decoder_passes(self, kind: str) -> int:
    """Decoder passes per example (a forward or backward pass of one sample counting one) that
    the inference of a model of this kind costs: the feedback's, for an IA-VAE or a corrector
    on a feedback input; none otherwise."""
    if kind not in ("iavae", "corrector"):
      return 0
    return feedback_lib.decoder_passes(self.feedback, self.config.passes,
                                       self.config.feedback_samples)

  def hypernet_context(self, frozen, x: jax.Array) -> jax.Array:
    """What the hypernetwork sees of each image x [B, 28, 28, 1] (the x part, with the feedback
    inputs: see ``context_fn``): [B, m].

    image      : the flattened image (the paper's x);
    image_l2   : the flattened image over its Euclidean norm (0 for a blank image), also the x
                 part of the feedback inputs;
    encoder    : the frozen stage-1 encoder's [mean; log-variance], a learned feature of x;
    penultimate: the frozen stage-1 encoder's penultimate feature (the input of its mean and
                 log-variance layers; 576 numbers for the paper encoder);
    and, whatever the kind, frozen["mean_context"] [context_size] for every example where it is
    given (the mean-input ablation).
    """
    if "mean_context" in frozen:   # the no-retraining ablation: one context for every example
      return jnp.broadcast_to(frozen["mean_context"], (x.shape[0], self.context_size))
    kind = self.config.hypernet_input
    if kind in ("encoder", "penultimate"):
      variables = {"params": frozen["phi_avi"], "batch_stats": frozen["batch_stats"]}
      if kind == "penultimate":
        return adaptive.submodule_input(self.encoder, variables, "mean", x, train=False)
      mean, log_var = self.encoder.apply(variables, x, train=False)
      return jnp.concatenate([mean, log_var], axis=-1)
    if kind in ("image_l2",) + FEEDBACK_INPUTS:
      return adaptive.normalized_context(x)
    return x.reshape(x.shape[0], -1)

  def context_fn(self, params, frozen, x: jax.Array) -> ContextFn:
    """context_fn(t, mean, log_var) -> [B, context_size]: what the inference network sees at
    pass t (1, 2, ...) of images x [B, 28, 28, 1] whose current guess is (mean, log_var) [B, k].
    Without feedback, ``hypernet_context`` at every pass; with it, [x over its norm; mean;
    log_var; the decoder's feedback at (mean, log_var)] (iavae_jax.feedback.context), or, where
    frozen["mean_feedback"] [passes, feedback_size] is given (the mean-feedback ablation), that
    pass's row in the feedback's place."""
    if self.feedback is None:
      context = self.hypernet_context(frozen, x)
      return lambda t, mean, log_var: context
    x_feature = adaptive.normalized_context(x)

    def context_fn(t, mean, log_var):
      if "mean_feedback" in frozen:
        value = jnp.broadcast_to(frozen["mean_feedback"][t - 1], (x.shape[0], self.feedback_size))
      else:
        value = self.feedback_value(params["decoder"], x, mean, log_var, t)
      return feedback_lib.context(x_feature, mean, log_var, value)
    return context_fn

  def feedback_value(self, decoder_params, x: jax.Array, mean: jax.Array, log_var: jax.Array,
                     t: int) -> jax.Array:
    """The decoder's feedback at (mean, log_var) [B, k] for images x: [B, feedback_size].
    gradient: the ELBO's gradient with feedback_samples draws, the same for every example and
    step (a fixed key per pass t), preprocessed; residual: x - sigmoid(logits at z = mean)."""
    if self.feedback == "gradient":
      key = jax.random.fold_in(jax.random.PRNGKey(FEEDBACK_KEY), t)
      eps = jax.random.normal(key, (self.config.feedback_samples, self.config.latent_dim))
      grads = feedback_lib.elbo_gradient(self.log_likelihood_fn(decoder_params, x), mean,
                                         log_var, eps)
      return feedback_lib.preprocess_gradient(jnp.concatenate(grads, axis=-1))
    logits = self.decoder.apply({"params": decoder_params}, x, mean)
    return feedback_lib.residual(x, jax.nn.sigmoid(logits))

  def base_apply(self, frozen) -> Callable:
    """apply(phi, x) -> (mean, log_var): the stage-1 encoder with parameters phi on a batch, its
    batch norm on frozen["batch_stats"]."""
    return lambda phi, x: self.encoder.apply({"params": phi, "batch_stats": frozen["batch_stats"]},
                                             x, train=False)

  def infer(self, stage: str, layout: blocks.BlockLayout | None, params, frozen, x: jax.Array,
            context_fn: ContextFn) -> tuple[jax.Array, jax.Array]:
    """(mean, log_var) [B, k] of a stage-2 model (an IA-VAE or a corrector) on images x, its
    network seeing ``context_fn`` (see ``context_fn``)."""
    if stage == "corrector":
      mean, log_var = self.base_apply(frozen)(frozen["phi_avi"], x)
      corrector = self.corrector
      return feedback_lib.iterative_correct(
          lambda c: corrector.apply({"params": params["corrector"]}, c), mean, log_var,
          context_fn, self.config.passes)
    hypernet = self.hypernet(layout)
    if self.feedback is not None:
      if not self.modulated:
        raise ValueError("Model: the feedback inputs run on the modulated path only "
                         "(modulated.iterative_encode); use Model(config) (modulated=True).")
      return modulated.iterative_encode(self.base_apply(frozen), hypernet, frozen["phi_avi"],
                                        params["hypernet"], x, context_fn, self.config.passes)
    context = context_fn(1, None, None)
    if self.modulated:
      return modulated.modulated_encode(self.base_apply(frozen), hypernet, frozen["phi_avi"],
                                        params["hypernet"], x, context=context)
    encoder = self.per_example_encoder

    def encoder_apply(phi, x_i):
      mean, log_var = encoder.apply({"params": phi, "batch_stats": frozen["batch_stats"]},
                                    x_i[None], train=False)
      return mean[0], log_var[0]
    hypernet_apply = lambda psi, c_i: hypernet.apply({"params": psi}, c_i)
    return adaptive.instance_adaptive_encode(encoder_apply, hypernet_apply, frozen["phi_avi"],
                                             params["hypernet"], x, context=context)

  @functools.lru_cache(maxsize=None)  # one function per stage: jitted callers compile once
  def encode_fn(self, stage: str, layout: blocks.BlockLayout | None = None) -> EncodeFn:
    """The encoder of a stage's model with frozen (running-average) batch-norm statistics."""
    if stage in ("iavae", "corrector"):
      return lambda params, frozen, x: self.infer(stage, layout, params, frozen, x,
                                                  self.context_fn(params, frozen, x))

    def encode(params, frozen, x):
      stats = params["batch_stats"] if stage == "vae" else frozen["batch_stats"]
      return self.encoder.apply({"params": params["encoder"], "batch_stats": stats}, x,
                                train=False)
    return encode

  def log_likelihood_fn(self, decoder_params, x: jax.Array):
    """z [S, B, k] -> log p(x | z) [S, B] for images x [B, 28, 28, 1] in {0, 1}."""
    def log_likelihood(z):
      num_samples, batch = z.shape[:2]
      xs = jnp.broadcast_to(x, (num_samples, *x.shape)).reshape(-1, *x.shape[1:])
      logits = self.decoder.apply({"params": decoder_params}, xs, z.reshape(-1, z.shape[-1]))
      return distributions.bernoulli_log_likelihood(xs, logits, event_ndim=3).reshape(
          num_samples, batch)
    return log_likelihood


def _as_images(x: jax.Array) -> jax.Array:
  return x[..., None]


def stage_encode(model: Model, stage: str, frozen) -> EncodeFn:
  """A stage's encoder with frozen batch-norm statistics (``Model.encode_fn``); the IA-VAE's
  hypernetwork laid out over frozen["phi_avi"]."""
  layout = blocks.BlockLayout.from_tree(frozen["phi_avi"]) if stage == "iavae" else None
  return model.encode_fn(stage, layout)


class Batch(NamedTuple):
  """What one training step reads."""
  image: jax.Array   # [B, 28, 28] grey levels in [0, 1], binarised afresh at every step
  key: jax.Array     # the step's PRNG key: the binarisation and the z samples


def stage_schedule(config: ImageConfig, stage: str, steps_per_epoch: int) -> training.Schedule:
  """A stage's batch size, epochs and patience: ``patience`` epochs, or for stage 2 and the
  control with stage2_patience_steps, as many epochs as hold that many optimiser steps."""
  patience = config.patience
  if stage != "vae" and config.stage2_patience_steps:
    patience = -(-config.stage2_patience_steps // steps_per_epoch)
  return training.Schedule(config.batch_size,
                           config.vae_epochs if stage == "vae" else config.iavae_epochs, patience)


def stage_optimizer(config: ImageConfig, stage: str,
                    freeze_decoder: bool = False) -> optax.GradientTransformation:
  """Gradients clipped to max_grad_norm, then stage 1: Adam (batch-norm statistics are left to
  the step, which sets them); later stages: Adam with weight decay, the hypernetwork (IA-VAE) or
  the encoder (control) at one rate, the decoder at another, or not at all with
  ``freeze_decoder``.

  Weight decay as ``config.weight_decay_mode``: "coupled" as PyTorch's Adam(weight_decay=wd),
  wd x params added to the gradient before Adam's moments; after the clipping, as PyTorch's
  clip_grad_norm_ acts on .grad before optimizer.step() adds the decay. "decoupled" as AdamW:
  lr x wd x params added to Adam's update.
  """
  if stage == "vae":
    labels = lambda params: {k: ("state" if k == "batch_stats" else "train") for k in params}
    transforms = {"train": optax.adam(config.vae_learning_rate), "state": optax.set_to_zero()}
  else:
    def adam(learning_rate):
      if config.weight_decay_mode == "decoupled":
        return optax.adamw(learning_rate, weight_decay=config.weight_decay)
      return optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.adam(learning_rate))
    labels = lambda params: {k: ("decoder" if k == "decoder" else "inference") for k in params}
    transforms = {"inference": adam(config.hypernet_learning_rate),
                  "decoder": (optax.set_to_zero() if freeze_decoder
                              else adam(config.decoder_learning_rate))}
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.multi_transform(transforms, labels))


def kl_weight(config: ImageConfig, stage: str, step: jax.Array,
              steps_per_epoch: int) -> jax.Array:
  """The KL weight of optimiser step ``step`` (0-based): in stage 1, [20]'s warm-up from
  warmup_start to 1, linear per step over warmup_epochs; 1 otherwise."""
  if stage != "vae" or config.warmup_epochs == 0:
    return jnp.ones(())
  warmup_steps = config.warmup_epochs * steps_per_epoch
  return jnp.minimum(1.0, config.warmup_start
                     + (1.0 - config.warmup_start) * (step + 1) / warmup_steps)


def train_step(state: training.TrainState, batch: Batch, *, model: Model, stage: str,
               steps_per_epoch: int, freeze_decoder: bool = False
               ) -> tuple[training.TrainState, training.StepMetrics]:
  """One optimiser step of a stage on the negative ELBO of a batch: the images binarised
  afresh, num_samples z per example, the KL weighted by ``kl_weight``.

  vae     : params {encoder, decoder, batch_stats}; the encoder's batch norm normalises with
            the batch's statistics, and the step sets its running averages in params;
  iavae   : params {hypernet, decoder}; state.frozen {phi_avi, batch_stats}: every example's
            encoder is phi_AVI plus the hypernetwork's deltas (``Model.encode_fn``);
  control : params {encoder, decoder}; state.frozen {batch_stats};
  corrector: params {corrector, decoder}; state.frozen {phi_avi, batch_stats}: the frozen
            encoder's output corrected (``Model.infer``).
  In stages 2 and 3 batch norm uses the frozen running statistics. With ``freeze_decoder`` the
  decoder gets no gradient (nor, from ``stage_optimizer``, any update).
  """
  config = model.config
  binarize_key, eps_key = jax.random.split(batch.key)
  x = _as_images(images.binarize(binarize_key, batch.image))
  weight = kl_weight(config, stage, state.step, steps_per_epoch)

  def loss_fn(params):
    batch_stats = None
    if stage == "vae":
      (mean, log_var), updates = model.encoder.apply(
          {"params": params["encoder"], "batch_stats": params["batch_stats"]}, x, train=True,
          mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      mean, log_var = stage_encode(model, stage, state.frozen)(params, state.frozen, x)
    eps = jax.random.normal(eps_key, (config.num_samples, *mean.shape))
    decoder = (jax.lax.stop_gradient(params["decoder"]) if freeze_decoder
               else params["decoder"])
    terms = objectives.elbo(eps, mean, log_var, model.log_likelihood_fn(decoder, x))
    loss = -jnp.mean(terms.expected_log_likelihood - weight * terms.kl)
    return loss, (jnp.mean(terms.kl), batch_stats)

  (loss, (kl, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = stage_optimizer(config, stage, freeze_decoder).update(
      grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if stage == "vae":
    params = {**params, "batch_stats": batch_stats}
  return (state._replace(params=params, opt_state=opt_state, step=state.step + 1),
          training.StepMetrics(loss, kl, optax.tree.norm(grads)))


def _chunks(data: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """[N, ...] -> ([ceil(N / size), size, ...] zero-padded, weights [ceil(N / size), size])."""
  num_chunks = -(-data.shape[0] // size)
  pad = num_chunks * size - data.shape[0]
  padded = jnp.concatenate([data, jnp.zeros((pad, *data.shape[1:]), data.dtype)])
  weights = jnp.concatenate([jnp.ones(data.shape[0]), jnp.zeros(pad)])
  return padded.reshape(num_chunks, size, *data.shape[1:]), weights.reshape(num_chunks, size)


def dataset_elbo(model: Model, encode: EncodeFn, params, frozen, data: jax.Array,
                 num_samples: int, key: jax.Array) -> jax.Array:
  """The mean ELBO over binary images data [N, 28, 28] (chunks of eval_batch_size examples)."""
  chunks, weights = _chunks(data, model.config.eval_batch_size)
  keys = jax.random.split(key, chunks.shape[0])

  def chunk_elbo(inputs):
    x, key = inputs
    x = _as_images(x)
    mean, log_var = encode(params, frozen, x)
    eps = jax.random.normal(key, (num_samples, *mean.shape))
    return objectives.elbo(eps, mean, log_var,
                           model.log_likelihood_fn(params["decoder"], x)).elbo
  elbos = jax.lax.map(chunk_elbo, (chunks, keys))
  return jnp.sum(elbos * weights) / jnp.sum(weights)


@functools.partial(jax.jit, static_argnums=(0, 1))
def evaluate(model: Model, encode: EncodeFn, params, frozen, data: jax.Array,
             key: jax.Array) -> dict:
  """Per-example test metrics for binary images data [N, 28, 28]: ELBO and KL (test_samples
  samples), and the IWAE estimate of log p(x) (iwae_samples samples, iwae_chunk at a time)."""
  config = model.config
  chunks, _ = _chunks(data, config.eval_batch_size)
  num_iwae_chunks = -(-config.iwae_samples // config.iwae_chunk)
  keys = jax.random.split(key, chunks.shape[0])

  def chunk_metrics(inputs):
    x, key = inputs
    x = _as_images(x)
    elbo_key, iwae_key = jax.random.split(key)
    mean, log_var = encode(params, frozen, x)
    log_likelihood = model.log_likelihood_fn(params["decoder"], x)
    eps = jax.random.normal(elbo_key, (config.test_samples, *mean.shape))
    terms = objectives.elbo(eps, mean, log_var, log_likelihood)

    log_weights = lambda key: objectives.importance_log_weights(
        jax.random.normal(key, (config.iwae_chunk, *mean.shape)), mean, log_var, log_likelihood)
    all_weights = jax.lax.map(log_weights, jax.random.split(iwae_key, num_iwae_chunks))
    all_weights = all_weights.reshape(-1, x.shape[0])[:config.iwae_samples]
    iwae = jax.nn.logsumexp(all_weights, axis=0) - jnp.log(config.iwae_samples)
    return terms.elbo, terms.kl, iwae
  elbo, kl, iwae = jax.lax.map(chunk_metrics, (chunks, keys))
  n = data.shape[0]  # the padding is at the end
  return {"elbo": elbo.reshape(-1)[:n], "kl": kl.reshape(-1)[:n], "iwae": iwae.reshape(-1)[:n]}


@functools.partial(jax.jit, static_argnums=(0, 1))
def reconstruct(model: Model, encode: EncodeFn, params, frozen, x: jax.Array,
                key: jax.Array) -> jax.Array:
  """Figure 8: z = the posterior mean of q(z|x), then x' ~ p(x|z) drawn pixel by pixel in
  raster order (the decoder is autoregressive). x: [n, 28, 28] -> [n, 28, 28] in {0, 1}."""
  mean, _ = encode(params, frozen, _as_images(x))
  height, width = x.shape[1:]
  keys = jax.random.split(key, height * width)

  def draw_pixel(i, canvas):
    logits = model.decoder.apply({"params": params["decoder"]}, canvas, mean)
    r, c = i // width, i % width
    pixel = jax.random.bernoulli(keys[i], jax.nn.sigmoid(logits[:, r, c, 0]))
    return canvas.at[:, r, c, 0].set(pixel.astype(canvas.dtype))
  return jax.lax.fori_loop(0, height * width, draw_pixel, jnp.zeros_like(_as_images(x)))[..., 0]


@functools.lru_cache(maxsize=None)  # one set per stage, shared by every seed: compiled once
def _epoch_functions(model: Model, stage: str, steps_per_epoch: int,
                     parallel: parallel_lib.Parallel | None, freeze_decoder: bool = False):
  """The jitted pieces of a stage's epoch: start, train_step and finish (see make_epoch_fn)."""
  config, schedule = model.config, stage_schedule(model.config, stage, steps_per_epoch)

  def start(key, train, order):
    """The epoch's batches [steps, B, 28, 28] and step keys, and the next epoch's key."""
    key, steps_key = jax.random.split(key)
    batches = train[order.reshape(steps_per_epoch, config.batch_size)]
    if parallel is not None and parallel.mode == "data":   # split every batch over the devices
      batches = jax.lax.with_sharding_constraint(
          batches, parallel.batch_sharding(1, batches.ndim))
    return key, batches, jax.random.split(steps_key, steps_per_epoch)

  def finish(state, trained, steps, valid):
    """Scores the trained parameters (``validation_score``) and closes the epoch
    (``training.end_epoch``)."""
    score = validation_elbo(model, stage, trained.params, trained.frozen, valid)
    return training.end_epoch(state, trained, steps, score, schedule)

  step = functools.partial(train_step, model=model, stage=stage, steps_per_epoch=steps_per_epoch,
                           freeze_decoder=freeze_decoder)
  options = model.compiler_options
  return (jax.jit(start), jax.jit(step, compiler_options=options),
          jax.jit(finish, compiler_options=options))


@functools.lru_cache(maxsize=None)  # one per stage: compiled once
def validation_score(model: Model, stage: str):
  """A stage's monitored score, jitted: score(params, frozen, valid [n, 28, 28]) -> the
  validation ELBO (``validation_elbo``)."""
  return jax.jit(functools.partial(validation_elbo, model, stage),
                 compiler_options=model.compiler_options)


def validation_elbo(model: Model, stage: str, params, frozen, valid: jax.Array) -> jax.Array:
  """The validation ELBO of a stage's model: valid_samples samples per example, the same noise
  every time."""
  return dataset_elbo(model, stage_encode(model, stage, frozen), params, frozen, valid,
                      model.config.valid_samples, jax.random.PRNGKey(0))


def make_epoch_fn(model: Model, stage: str, name: str, valid: jax.Array, train_size: int,
                  parallel: parallel_lib.Parallel | None = None, freeze_decoder: bool = False):
  """A stage's epoch for ``training.train_model``: epoch(state, train [N, 28, 28], order) ->
  (state, EpochMetrics). A Python loop of the jitted ``train_step`` over the shuffled batches
  (XLA:CPU runs convolution gradients inside a loop ~8x slower than outside one), a progress
  line at most every 30 s of a long epoch, then the validation ELBO on ``valid`` [n, 28, 28]
  as the monitored score."""
  steps_per_epoch = train_size // model.config.batch_size
  schedule = stage_schedule(model.config, stage, steps_per_epoch)
  start, step, finish = _epoch_functions(model, stage, steps_per_epoch, parallel,
                                         freeze_decoder)

  def epoch(state: training.TrainState, train: jax.Array, order: jax.Array):
    if bool(training.is_done(state, schedule)):
      return state, training.idle_metrics(state)
    key, batches, step_keys = start(state.key, train, order)
    progress = common.StepProgress(name, int(state.epoch) + 1, schedule.max_epochs,
                                   steps_per_epoch)
    trained, steps = state, []
    for i in range(steps_per_epoch):
      trained, metrics = step(trained, Batch(batches[i], step_keys[i]))
      steps.append(metrics)
      progress.update(i + 1, metrics.loss.block_until_ready)
    steps = training.StepMetrics(*(jnp.stack(values) for values in zip(*steps)))
    return finish(state, trained._replace(key=key), steps, valid)
  return epoch


class Selected(NamedTuple):
  """A trained model as selected on the validation ELBO."""
  params: dict          # its best parameters
  frozen: dict | None   # what it uses but did not train (TrainState.frozen)
  best_epoch: int       # 0: its starting point (config.start_as_candidate)
  valid_elbo: float     # its validation ELBO (the selection score)
  valid_elbo_at_start: float | None   # of its starting point (stages 2 and 3; None in stage 1)


def matched_model(model: Model) -> Model:
  """The model of ``vae_matched``: every encoder width (ResNet channels or dense widths) scaled
  by the smallest factor (in steps of 1/64) that gives the encoder at least as many parameters
  as the VAE's encoder and the hypernetwork together."""
  counts = param_counts(model)
  target = counts["encoder"] + counts["hypernetwork"]
  field = "encoder_hidden" if model.config.encoder == "mlp" else "encoder_channels"
  widths = getattr(model.config, field)

  def scaled(step: int) -> Model:
    return Model(dataclasses.replace(
        model.config, **{field: tuple(max(1, round(w * step / 64)) for w in widths)}))

  def reaches(step: int) -> bool:
    return _count(_encoder_shapes(scaled(step))["params"]) >= target

  low, high = 64, 64 * 64   # bisection: the count grows with the width
  if not reaches(high):
    raise ValueError(f"matched_model: no width up to 64x {field}={widths} reaches {target} "
                     "encoder parameters.")
  while high - low > 1:     # invariant: low falls short (or is the VAE's), high reaches
    middle = (low + high) // 2
    low, high = (low, middle) if reaches(middle) else (middle, high)
  return scaled(high)


def train_seed(model: Model, workdir: str, seed: int, data: images.ImageSplits,
               timings: dict, resumed: list, parallel: parallel_lib.Parallel | None = None,
               tensorboard: bool = False) -> dict:
  """Trains the models ``config.models`` of one seed (resuming what is in workdir); returns
  them, {name: Selected}. Each model is trained alone (``make_epoch_fn``). The stage-2 models
  (IA-VAEs and controls) start from the VAE, scored before their first step
  (``validation_score``): with config.start_as_candidate that start is selected unless an epoch
  scores higher. Stages that
  start from a checkpoint are appended to ``resumed``."""
  config = model.config
  train = jnp.asarray(data.train)
  valid = jnp.asarray(data.valid)
  if parallel is not None:
    valid = parallel.shared(valid)   # every device scores on the whole validation split
  selected = {}

  def run(name, spec, run_model, params, frozen):
    stage_name = f"{name}_seed{seed}"
    init_key, train_key = training.model_keys(seed, spec.stage_id)
    t0 = time.time()
    if os.path.isdir(os.path.join(workdir, "checkpoints", stage_name)):
      resumed.append(stage_name)
    if params is None:
      params = run_model.init_vae(init_key)
    # Stage-2 models start from the VAE (Proposition 1 for the IA-VAE): their starting score.
    start = (None if spec.kind == "vae"
             else float(validation_score(run_model, spec.kind)(params, frozen, valid)))
    state = stages.run_stage(
        stage_name, workdir,
        make_epoch_fn(run_model, spec.kind, stage_name, valid, train.shape[0], parallel,
                      spec.freeze_decoder),
        training.init_state(params, stage_optimizer(config, spec.kind, spec.freeze_decoder),
                            train_key, frozen, start if config.start_as_candidate else None),
        train, np.array([seed, spec.stage_id]),
        stage_schedule(config, spec.kind, train.shape[0] // config.batch_size),
        config.checkpoint_every, parallel=parallel, tensorboard=tensorboard)
    timings[stage_name] = time.time() - t0
    selected[name] = Selected(state.best_params, state.frozen, int(state.best_epoch),
                              float(state.best_score), start)

  run("vae", MODEL_SPECS["vae"], model, None, None)
  vae = selected["vae"].params
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  layout = blocks.BlockLayout.from_tree(vae["encoder"])
  psi = model.init_hypernet(training.model_keys(seed, STAGE_IDS["iavae"])[0], layout)
  for name in config.models:
    spec = MODEL_SPECS[name]
    if name == "vae":
      continue
    if spec.kind == "vae":
      run(name, spec, matched_model(model) if spec.matched else model, None, None)
    elif spec.kind == "iavae":
      run(name, spec, model, {"hypernet": psi, "decoder": vae["decoder"]}, frozen)
    elif spec.kind == "corrector":
      omega = model.init_corrector(training.model_keys(seed, STAGE_IDS["corrector"])[0])
      run(name, spec, model, {"corrector": omega, "decoder": vae["decoder"]}, frozen)
    else:
      run(name, spec, model, {"encoder": vae["encoder"], "decoder": vae["decoder"]},
          {"batch_stats": vae["batch_stats"]})
  return selected


def evaluation_inputs(model: Model, name: str, selected: dict, train: jax.Array
                      ) -> tuple[Model, EncodeFn, dict, dict | None]:
  """(model, encode, params, frozen) to evaluate the model ``name`` of ``evaluated_models``
  from a seed's trained models {name: Selected} (``train``: the training split, for the
  mean context)."""
  if ablated(name):
    iavae = selected[ablated(name)]
    frozen = {**iavae.frozen, **mean_inputs(model, iavae.params, iavae.frozen, train)}
    return model, stage_encode(model, "iavae", frozen), iavae.params, frozen
  spec = MODEL_SPECS[name]
  run_model = matched_model(model) if spec.matched else model
  params, frozen = selected[name].params, selected[name].frozen
  return run_model, stage_encode(run_model, spec.kind, frozen), params, frozen


def mean_inputs(model: Model, params: dict, frozen: dict, train: jax.Array) -> dict:
  """What the mean-input ablation of a trained IA-VAE adds to its frozen inputs: over the
  training split [N, 28, 28] (binarised once, with a fixed key), the mean of its hypernetwork's
  input ({"mean_context": [context_size]}) or, with a feedback input, the mean of the feedback
  at each pass ({"mean_feedback": [passes, feedback_size]})."""
  x = _as_images(images.binarize(jax.random.PRNGKey(0), train))
  chunks, weights = _chunks(x, model.config.eval_batch_size)
  if model.feedback is None:
    contexts = jax.lax.map(lambda chunk: model.hypernet_context(frozen, chunk), chunks)
    return {"mean_context": jnp.einsum("cb,cbm->m", weights, contexts) / jnp.sum(weights)}
  layout = blocks.BlockLayout.from_tree(frozen["phi_avi"])

  def chunk_feedback(chunk):   # [passes, B, feedback_size] along the IA-VAE's own passes
    seen, context_fn = [], model.context_fn(params, frozen, chunk)

    def recording(t, mean, log_var):
      context = context_fn(t, mean, log_var)
      seen.append(context[:, context.shape[1] - model.feedback_size:])
      return context
    model.infer("iavae", layout, params, frozen, chunk, recording)
    return jnp.stack(seen)
  values = jax.lax.map(chunk_feedback, chunks)
  return {"mean_feedback": jnp.einsum("cb,ctbf->tf", weights, values) / jnp.sum(weights)}


def _count(tree) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def _encoder_shapes(model: Model):
  return jax.eval_shape(model.encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


def param_counts(model: Model) -> dict:
  """Parameter counts of the encoder, decoder and hypernetwork, and the encoder's blocks."""
  x0 = jnp.zeros((1, 28, 28, 1))
  enc = _encoder_shapes(model)
  dec = jax.eval_shape(model.decoder.init, jax.random.PRNGKey(0), x0,
                       jnp.zeros((1, model.config.latent_dim)))
  layout = blocks.BlockLayout.from_tree(enc["params"])
  psi = jax.eval_shape(lambda key: model.init_hypernet(key, layout), jax.random.PRNGKey(0))
  omega = jax.eval_shape(model.init_corrector, jax.random.PRNGKey(0))
  return {"encoder": _count(enc["params"]), "decoder": _count(dec["params"]),
          "corrector": _count(omega),
          "hypernetwork": _count(psi), "encoder_blocks": layout.num_blocks}


def load_data(config: ImageConfig, data_dir: str | None, source: str) -> images.ImageSplits:
  """The run's splits (``subset`` to the tier's sizes); bad data or sizes are a ConfigError."""
  try:
    data = images.load(config.dataset, data_dir=data_dir, source=source,
                       split_seed=config.split_seed)
  except images.DataError as e:
    raise common.ConfigError(str(e)) from e
  data = subset(data, config)
  if data.train.shape[0] < config.batch_size:
    raise common.ConfigError(f"--batch_size={config.batch_size} exceeds the {data.train.shape[0]}"
                             " training examples (after --max_train): no full batch can be "
                             "formed.")
  return data


def evaluate_seed(model: Model, seed: int, selected: dict, train: jax.Array, test: jax.Array,
                  num_reconstructions: int) -> tuple[dict, dict]:
  """Every reported model of one seed on the test split: ({name: its results row}, {name: its
  reconstructions of the first num_reconstructions test images})."""
  rows, recon = {}, {}
  eval_key = training.derive_key(seed, STAGE_IDS["eval"])
  for name in evaluated_models(model.config):
    run_model, encode, params, frozen = evaluation_inputs(model, name, selected, train)
    metrics = jax.device_get(evaluate(run_model, encode, params, frozen, test, eval_key))
    # A mean-input ablation is its selected IA-VAE, not selected on its own score.
    source = selected[ablated(name) or name]
    rows[name] = {
        "test_elbo": float(np.mean(metrics["elbo"])), "test_kl": float(np.mean(metrics["kl"])),
        "test_iwae": float(np.mean(metrics["iwae"])),
        "valid_elbo": None if ablated(name) else source.valid_elbo,   # never scored
        "best_epoch": source.best_epoch}
    if not ablated(name) and source.valid_elbo_at_start is not None:
      rows[name]["valid_elbo_at_start"] = source.valid_elbo_at_start
    if num_reconstructions:
      recon[name] = np.asarray(reconstruct(run_model, encode, params, frozen,
                                           test[:num_reconstructions],
                                           jax.random.fold_in(eval_key, 1)))
  return rows, recon


def collect_results(model: Model, data: images.ImageSplits, seeds: list, per_seed: dict,
                    timings: dict, resumed: list, wall_seconds: float,
                    parallel: parallel_lib.Parallel | None) -> dict:
  """results.json's contents: per model, its rows of every seed as lists."""
  config, names = model.config, list(per_seed)
  return {
      "experiment": "images",
      "dataset": config.dataset,
      "tier": config.tier,
      "seeds": seeds,
      "wall_seconds": wall_seconds,   # this invocation (see resumed_stages)
      "stage_seconds": timings,
      "resumed_stages": resumed,
      "models": {name: {key: [row[key] for row in per_seed[name]]
                        for key in per_seed[name][0]} for name in names},
      "data": {**data.info, "train": int(data.train.shape[0]), "valid": int(data.valid.shape[0]),
               "test": int(data.test.shape[0])},
      # Per example, the decoder passes (one sample's forward or backward pass each) that the
      # model's inference costs: its feedback's; 0 for a mean-input ablation (no feedback).
      "decoder_passes_per_example": {
          name: 0 if ablated(name) else model.decoder_passes(MODEL_SPECS[name].kind)
          for name in names},
      "parameters": {**param_counts(model),
                     **({"matched_encoder": param_counts(matched_model(model))["encoder"]}
                        if "vae_matched" in config.models else {})},
      "config": common.as_json(config),
      "environment": common.environment(parallel),
  }


def train_and_evaluate(config: ImageConfig, workdir: str, data_dir: str | None = None,
                       source: str = "auto", parallel: parallel_lib.Parallel | None = None,
                       tensorboard: bool = False) -> dict:
  """Runs the whole protocol for one data set in workdir and writes results.json, results.md,
  figure8_reconstructions.png, metrics.jsonl and learning_curves.png (and TensorBoard event
  files with ``tensorboard``). With a ``parallel`` in ``data`` mode, every training batch is
  split over its devices (the image seeds train one after another, so ``seeds`` mode does not
  apply: ``training.train_model`` refuses it)."""
  config.validate()
  data = load_data(config, data_dir, source)
  common.prepare_workdir(workdir, config)
  check_data(workdir, data.info)
  start = time.time()
  model = Model(config)
  print(f"config: {config}", flush=True)
  print(f"data: {data.info}; train {data.train.shape[0]}, valid {data.valid.shape[0]}, "
        f"test {data.test.shape[0]}", flush=True)
  if config.tier == "paper" and data.info["paper_split"] is False:
    print(f"WARNING: this is not the paper's train/test split of {config.dataset} (for OMNIGLOT: "
          "Burda et al.'s chardata.mat in --data_dir); results.json and Table 4 say so.",
          flush=True)
  names = evaluated_models(config)
  timings, per_seed, recon, resumed = {}, {name: [] for name in names}, {}, []
  train, test = jnp.asarray(data.train), jnp.asarray(data.test)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  for seed in seeds:
    selected = train_seed(model, workdir, seed, data, timings, resumed, parallel, tensorboard)
    t0 = time.time()
    rows, seed_recon = evaluate_seed(model, seed, selected, train, test,
                                     config.num_reconstructions if seed == seeds[0] else 0)
    recon.update(seed_recon)
    for name in names:
      per_seed[name].append(rows[name])
    timings[f"eval_seed{seed}"] = time.time() - t0
    line = "  ".join(f"{name} {rows[name]['test_elbo']:.2f}" for name in names)
    print(f"[seed {seed}] test ELBO: {line}", flush=True)
    for name in config.models:
      if not np.isfinite(rows[name]["valid_elbo"]):
        print(f"[seed {seed}] WARNING: {name} never reached a finite validation ELBO (its "
              "training diverged); its test numbers are those of its initial parameters.",
              flush=True)

  results = collect_results(model, data, seeds, per_seed, timings, resumed,
                            time.time() - start, parallel)
  if recon:
    fig8 = plots.reconstruction_figure(
        np.asarray(data.test[:config.num_reconstructions]), recon,
        f"{config.dataset} ({config.tier} tier, seed {seeds[0]}): test images and x' ~ p(x | z = "
        "mean of q(z | x)), drawn pixel by pixel")
    common.save_figure(fig8, os.path.join(workdir, "figure8_reconstructions.png"))
  common.write_results(workdir, results, render_markdown(results), config,
                       f"{config.dataset} ({config.tier} tier): a line per seed")
  return results


def check_data(workdir: str, info: dict) -> None:
  """Records the data's description in workdir/data.json, or refuses data other than the
  recorded (another --data_dir or --source would resume checkpoints trained on other data)."""
  path = os.path.join(workdir, "data.json")
  wanted = json.loads(json.dumps(info))
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    if recorded != wanted:
      raise common.ConfigError(
          f"--workdir={workdir} holds a run on other data (recorded {recorded}, now {wanted}); "
          "use the same --data_dir and --source to resume, or a new --workdir.")
  else:
    common.write_json(path, wanted)


def subset(data: images.ImageSplits, config: ImageConfig) -> images.ImageSplits:
  """The first max_* examples of each split (the loader's splits are already shuffled)."""
  cap = lambda x, n: x[:n] if n else x
  return dataclasses.replace(data, train=cap(data.train, config.max_train),
                             valid=cap(data.valid, config.max_valid),
                             test=cap(data.test, config.max_test))


def _cell(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def render_markdown(results: dict) -> str:
  lines = [f"# {results['dataset']} ({results['tier']} tier): test metrics per seed", ""]
  lines += common.markdown_table(
      ["seed", "model", "test ELBO", "test KL",
       f"IWAE bound (K={results['config']['iwae_samples']})", "valid ELBO (selection score)",
       "best epoch"],
      [[seed, stage] + [_cell(results["models"][stage][key][i])
                        for key in ("test_elbo", "test_kl", "test_iwae", "valid_elbo")]
       + [results["models"][stage]["best_epoch"][i]]
       for i, seed in enumerate(results["seeds"]) for stage in results["models"]])
  resumed = results["resumed_stages"]
  lines += ["", f"Wall time {results['wall_seconds']:.1f} s"
            + (f" (this invocation; resumed from checkpoints: {', '.join(resumed)})"
               if resumed else "") + f". Data: {results['data']}.",
            f"Parameters: {results['parameters']}.", ""]
  return "\n".join(lines)
