"""The image IA-VAE of the paper's section 4.2, as one configuration: its model, the optimiser and
KL schedule of each training stage, one train step per stage, and data-set evaluation.

A model of one of four kinds (``KINDS``) is trained by ``train_step`` on the negative ELBO of
binarised 28x28 images:
  vae      : SA-VAE's model (ResNet encoder with batch norm, gated PixelCNN decoder) or dense
             encoders and decoders (``ImageVAEConfig.encoder``/``decoder``), KL warm-up;
  iavae    : the VAE's encoder frozen as phi_AVI (batch-norm statistics too); a hypernetwork
             (``ImageVAEConfig.hypernet``) adds a delta to it per example (``Model.infer``);
  control  : the VAE's encoder trained on in the hypernetwork's place;
  corrector: the hypernetwork's input into a network that corrects the frozen encoder's mean and
             log-variance directly (``iavae_jax.feedback.Corrector``).
What the inference network sees of x is ``ImageVAEConfig.hypernet_input``: the image, the image
over its Euclidean norm, the frozen encoder's output or penultimate feature, or, with the
decoder's feedback (``gradient``, ``residual``), [the image over its norm; the current mean and
log-variance; the feedback there], recomputed at each of ``passes`` passes.

    model = image_vae.Model(image_vae.ImageVAEConfig(encoder="mlp", decoder="mlp").validate())
    params = model.init_vae(key)
    state = training.init_state(params, image_vae.stage_optimizer(model.config, "vae"), key)
    state, metrics = image_vae.train_step(state, image_vae.Batch(images, key), model=model,
                                          kind="vae", steps_per_epoch=100)
"""

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax import (adaptive, blocks, checkpoints, distributions, gaps, hypernets, modulated,
                       objectives)
from iavae_jax import feedback as feedback_lib
from iavae_jax import parallel as parallel_lib, progress, training
from iavae_jax.errors import ConfigError
from iavae_jax.hparams import INFERRING_KINDS, KINDS, ImageVAEConfig
from iavae_jax.data import images
from iavae_jax.models import decoders, encoders, pixelcnn

__all__ = ["ImageVAEConfig", "Model", "Batch", "encode_fn", "stage_start", "kind_of",
           "check_params", "stage_optimizer", "kl_weight", "train_step", "stage_schedule",
           "validation_elbo", "validation_score", "stage_epoch_fn", "Trained", "load_trained",
           "dataset_elbo", "evaluate", "reconstruct", "gap_measurements", "matched_model",
           "mean_inputs", "param_counts"]

_FEEDBACK_KEY = 7   # the fixed noise of the gradient feedback, folded with the pass


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
  config: ImageVAEConfig
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
    train faster without XLA's YNNPACK reductions and with its loop emitters
    (benchmarks/step_cost.py; docs/devices.md); the convolutional models gain nothing, so they
    keep the defaults."""
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
    """The decoder's feedback the inference sees (a feedback.FEEDBACKS kind), or None."""
    kind = self.config.hypernet_input
    return kind if kind in feedback_lib.FEEDBACKS else None

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

  def adapted_layout(self, phi_avi=None) -> blocks.BlockLayout:
    """The blocks of the encoder's parameters phi_avi (by default their shapes at
    initialisation) that the hypernetwork adapts: those ``config.adapted_blocks`` selects
    (``blocks.select``; every block for ""). Raises ValueError where it selects none."""
    phi_avi = _encoder_shapes(self)["params"] if phi_avi is None else phi_avi
    pattern = self.config.adapted_blocks
    return blocks.BlockLayout.from_tree(
        blocks.select(phi_avi, pattern, owner=f"adapted_blocks={pattern!r}"))

  def init_hypernet(self, key: jax.Array, layout: blocks.BlockLayout):
    return self.hypernet(layout).init(key, jnp.zeros(self.context_size))["params"]

  @property
  def corrector(self) -> feedback_lib.Corrector:
    """The direct-correction model: iavae_jax.feedback's Corrector on the hypernetwork's input,
    two ELU layers of config.corrector_hidden units, or (0) of the width that gives it about as
    many parameters as the hypernetwork."""
    width = self.config.corrector_hidden
    if not width:
      target = hypernets.num_params(self.hypernet(self.adapted_layout()), self.context_size)
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
    if kind not in INFERRING_KINDS:
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
    if kind in ("image_l2",) + feedback_lib.FEEDBACKS:
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
      key = jax.random.fold_in(jax.random.PRNGKey(_FEEDBACK_KEY), t)
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

  def infer(self, kind: str, layout: blocks.BlockLayout | None, params, frozen, x: jax.Array,
            context_fn: ContextFn) -> tuple[jax.Array, jax.Array]:
    """(mean, log_var) [B, k] of a stage-2 model (an IA-VAE or a corrector) on images x, its
    network seeing ``context_fn`` (see ``context_fn``)."""
    if kind == "corrector":
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

  @functools.lru_cache(maxsize=None)  # one function per kind: jitted callers compile once
  def _encode_fn(self, kind: str, layout: blocks.BlockLayout | None) -> EncodeFn:
    def encode(params, frozen, x):
      _check_images("encode", "x", x, channels=True)
      if kind in INFERRING_KINDS:
        return self.infer(kind, layout, params, frozen, x, self.context_fn(params, frozen, x))
      stats = params["batch_stats"] if kind == "vae" else frozen["batch_stats"]
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


def _check_images(fn: str, name: str, x, channels: bool = False) -> None:
  """Refuses an argument that is not a batch of 28x28 images ([N, 28, 28], or [N, 28, 28, 1]
  with ``channels``), naming the function and the argument."""
  shape = tuple(getattr(x, "shape", ()))
  want = (28, 28, 1) if channels else (28, 28)
  if len(shape) != len(want) + 1 or shape[1:] != want or shape[0] == 0:
    raise ValueError(f"{fn}: {name} must be a batch of images [N, {', '.join(map(str, want))}] "
                     f"with N >= 1, got shape {shape}.")


def encode_fn(model: Model, kind: str, frozen) -> EncodeFn:
  """encode(params, frozen, x [B, 28, 28, 1]) -> (mean, log_var) [B, k]: the encoder of a model
  of this kind with frozen (running-average) batch-norm statistics; an IA-VAE's hypernetwork laid
  out over frozen["phi_avi"]. The same function for every call with equal arguments, so jitted
  callers compile once."""
  if kind not in KINDS:
    raise ValueError(f"encode_fn: kind={kind!r} is not one of {', '.join(KINDS)}.")
  layout = model.adapted_layout(frozen["phi_avi"]) if kind == "iavae" else None
  return model._encode_fn(kind, layout)  # pylint: disable=protected-access


def stage_start(model: Model, kind: str, vae: dict, key: jax.Array) -> tuple[dict, dict]:
  """The initial parameters and frozen inputs of a stage-2 model of this kind ("iavae",
  "control" or "corrector") from a trained VAE's parameters {encoder, decoder, batch_stats}:
  the IA-VAE and the corrector over phi_AVI = the VAE's encoder (a new hypernetwork or
  corrector, drawn with key), the control training the encoder itself; every one of them with
  the VAE's decoder and its batch-norm statistics frozen."""
  if kind not in KINDS or kind == "vae":
    raise ValueError(f"stage_start: kind={kind!r} is not a stage-2 kind; choose one of "
                     f"{', '.join(k for k in KINDS if k != 'vae')}.")
  missing = {"encoder", "decoder", "batch_stats"} - set(vae)
  if missing:
    raise ValueError(f"stage_start: vae has no {', '.join(sorted(missing))}: pass a VAE's "
                     "parameters as Model.init_vae returns them.")
  frozen = {"phi_avi": vae["encoder"], "batch_stats": vae["batch_stats"]}
  if kind == "iavae":
    psi = model.init_hypernet(key, model.adapted_layout(vae["encoder"]))
    return {"hypernet": psi, "decoder": vae["decoder"]}, frozen
  if kind == "corrector":
    return {"corrector": model.init_corrector(key), "decoder": vae["decoder"]}, frozen
  return ({"encoder": vae["encoder"], "decoder": vae["decoder"]},
          {"batch_stats": vae["batch_stats"]})


_KIND_OF_KEYS = {frozenset({"encoder", "decoder", "batch_stats"}): "vae",
                 frozenset({"encoder", "decoder"}): "control",
                 frozenset({"hypernet", "decoder"}): "iavae",
                 frozenset({"corrector", "decoder"}): "corrector"}


def kind_of(params) -> str | None:
  """The kind of a model from its parameters' top-level keys (as ``Model.init_vae`` and
  ``stage_start`` lay them out), or None for none of them."""
  return _KIND_OF_KEYS.get(frozenset(params) if isinstance(params, dict) else frozenset())


def check_params(model: Model, kind: str, params, frozen) -> None:
  """Raises ValueError, naming the first leaf that differs, unless params and frozen have the
  structure and shapes of a model of this kind and configuration (frozen: {} for a VAE)."""
  key = jax.random.PRNGKey(0)
  if kind == "vae":
    expected = {"params": jax.eval_shape(model.init_vae, key), "frozen": {}}
  else:
    expected = dict(zip(("params", "frozen"), jax.eval_shape(
        lambda k: stage_start(model, kind, model.init_vae(k), k), key)))
  flat = lambda tree: {jax.tree_util.keystr(path): tuple(np.shape(leaf))
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat({"params": params, "frozen": frozen}), flat(expected)
  if got != want:
    first = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
    raise ValueError(f"check_params: the parameters are not those of a {kind} of this "
                     f"configuration (at {first}: given {got.get(first)}, expected "
                     f"{want.get(first)}).")


class Batch(NamedTuple):
  """What one training step reads."""
  image: jax.Array   # [B, 28, 28] grey levels in [0, 1], binarised afresh at every step
  key: jax.Array     # the step's PRNG key: the binarisation and the z samples


def stage_optimizer(config: ImageVAEConfig, kind: str,
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
  if kind == "vae":
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


def kl_weight(config: ImageVAEConfig, kind: str, step: jax.Array,
              steps_per_epoch: int) -> jax.Array:
  """The KL weight of optimiser step ``step`` (0-based): in stage 1, [20]'s warm-up from
  warmup_start to 1, linear per step over warmup_epochs; 1 otherwise."""
  if kind != "vae" or config.warmup_epochs == 0:
    return jnp.ones(())
  warmup_steps = config.warmup_epochs * steps_per_epoch
  return jnp.minimum(1.0, config.warmup_start
                     + (1.0 - config.warmup_start) * (step + 1) / warmup_steps)


def train_step(state: training.TrainState, batch: Batch, *, model: Model, kind: str,
               steps_per_epoch: int, freeze_decoder: bool = False
               ) -> tuple[training.TrainState, training.StepMetrics]:
  """One optimiser step of a model of this kind on the negative ELBO of a batch: the images
  binarised afresh, num_samples z per example, the KL weighted by ``kl_weight``.

  vae     : params {encoder, decoder, batch_stats}; the encoder's batch norm normalises with
            the batch's statistics, and the step sets its running averages in params;
  iavae   : params {hypernet, decoder}; state.frozen {phi_avi, batch_stats}: every example's
            encoder is phi_AVI plus the hypernetwork's deltas (``Model.infer``);
  control : params {encoder, decoder}; state.frozen {batch_stats};
  corrector: params {corrector, decoder}; state.frozen {phi_avi, batch_stats}: the frozen
            encoder's output corrected (``Model.infer``).
  In stages 2 and 3 batch norm uses the frozen running statistics. With ``freeze_decoder`` the
  decoder gets no gradient (nor, from ``stage_optimizer``, any update).
  """
  _check_images("train_step", "batch.image", batch.image)
  config = model.config
  binarize_key, eps_key = jax.random.split(batch.key)
  x = _as_images(images.binarize(binarize_key, batch.image))
  weight = kl_weight(config, kind, state.step, steps_per_epoch)

  def loss_fn(params):
    batch_stats = None
    if kind == "vae":
      (mean, log_var), updates = model.encoder.apply(
          {"params": params["encoder"], "batch_stats": params["batch_stats"]}, x, train=True,
          mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      mean, log_var = encode_fn(model, kind, state.frozen)(params, state.frozen, x)
    eps = jax.random.normal(eps_key, (config.num_samples, *mean.shape))
    decoder = (jax.lax.stop_gradient(params["decoder"]) if freeze_decoder
               else params["decoder"])
    terms = objectives.elbo(eps, mean, log_var, model.log_likelihood_fn(decoder, x))
    loss = -jnp.mean(terms.expected_log_likelihood - weight * terms.kl)
    return loss, (jnp.mean(terms.kl), batch_stats)

  (loss, (kl, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = stage_optimizer(config, kind, freeze_decoder).update(
      grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if kind == "vae":
    params = {**params, "batch_stats": batch_stats}
  return (state._replace(params=params, opt_state=opt_state, step=state.step + 1),
          training.StepMetrics(loss, kl, optax.tree.norm(grads)))


def stage_schedule(config: ImageVAEConfig, kind: str, steps_per_epoch: int) -> training.Schedule:
  """The batch size, epochs and patience of a model of this kind: ``patience`` epochs, or for
  the models that start from the VAE, with stage2_patience_steps, as many epochs as hold that
  many optimiser steps."""
  patience = config.patience
  if kind != "vae" and config.stage2_patience_steps:
    patience = -(-config.stage2_patience_steps // steps_per_epoch)
  return training.Schedule(config.batch_size,
                           config.vae_epochs if kind == "vae" else config.iavae_epochs, patience)


@functools.lru_cache(maxsize=None)  # one set per model and kind, shared by every seed
def _epoch_functions(model: Model, kind: str, steps_per_epoch: int,
                     parallel: parallel_lib.Parallel | None, freeze_decoder: bool = False):
  """The jitted pieces of an epoch of a model of this kind: start, train_step and finish (see
  stage_epoch_fn)."""
  config, schedule = model.config, stage_schedule(model.config, kind, steps_per_epoch)

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
    score = validation_elbo(model, kind, trained.params, trained.frozen, valid)
    return training.end_epoch(state, trained, steps, score, schedule)

  step = functools.partial(train_step, model=model, kind=kind,
                           steps_per_epoch=steps_per_epoch, freeze_decoder=freeze_decoder)
  options = model.compiler_options
  return (jax.jit(start), jax.jit(step, compiler_options=options),
          jax.jit(finish, compiler_options=options))


@functools.lru_cache(maxsize=None)  # one per model and kind: compiled once
def validation_score(model: Model, kind: str):
  """The monitored score of a model of this kind, jitted: score(params, frozen, valid
  [n, 28, 28]) -> the validation ELBO (``validation_elbo``)."""
  return jax.jit(functools.partial(validation_elbo, model, kind),
                 compiler_options=model.compiler_options)


def validation_elbo(model: Model, kind: str, params, frozen, valid: jax.Array) -> jax.Array:
  """The validation ELBO of a model of this kind: valid_samples samples per example, the same noise
  every time."""
  return dataset_elbo(model, encode_fn(model, kind, frozen), params, frozen, valid,
                      model.config.valid_samples, jax.random.PRNGKey(0),
                      model.config.eval_batch_size)


def stage_epoch_fn(model: Model, kind: str, name: str, valid: jax.Array, train_size: int,
                   parallel: parallel_lib.Parallel | None = None, freeze_decoder: bool = False):
  """An epoch of a model of this kind for ``training.train_model`` (or ``stages.run_stage``):
  epoch(state, train [N, 28, 28], order) -> (state, EpochMetrics). A Python loop of the jitted
  ``train_step`` over the shuffled batches (XLA:CPU runs convolution gradients inside a loop
  slower than outside one: docs/devices.md), a progress line named ``name`` at most every 30 s
  of a long epoch, then the validation ELBO on ``valid`` [n, 28, 28] as the monitored score."""
  steps_per_epoch = train_size // model.config.batch_size
  schedule = stage_schedule(model.config, kind, steps_per_epoch)
  start, step, finish = _epoch_functions(model, kind, steps_per_epoch, parallel,
                                         freeze_decoder)

  def epoch(state: training.TrainState, train: jax.Array, order: jax.Array):
    if bool(training.is_done(state, schedule)):
      return state, training.idle_metrics(state)
    key, batches, step_keys = start(state.key, train, order)
    step_log = progress.StepProgress(name, int(state.epoch) + 1, schedule.max_epochs,
                                     steps_per_epoch)
    trained, steps = state, []
    for i in range(steps_per_epoch):
      trained, metrics = step(trained, Batch(batches[i], step_keys[i]))
      steps.append(metrics)
      step_log.update(i + 1, metrics.loss.block_until_ready)
    steps = training.StepMetrics(*(jnp.stack(values) for values in zip(*steps)))
    return finish(state, trained._replace(key=key), steps, valid)
  return epoch


class Trained(NamedTuple):
  """A trained model as ``load_trained`` reads it from its stage's checkpoint."""
  kind: str          # "vae", "control", "iavae" or "corrector" (kind_of)
  params: dict       # the selected parameters (TrainState.best_params): the decoder's under
                     # "decoder"
  frozen: dict       # what it uses but did not train (TrainState.frozen): phi_AVI, the VAE's
                     # batch-norm statistics; {} for a VAE
  encode: EncodeFn   # its encoder (encode_fn)
  source: str        # "{directory} step {step}": which checkpoint it is


def load_trained(model: Model, directory: str,
                 frozen_if_absent: Callable[[str], dict] | None = None,
                 remedy: str = "load it with the configuration it trained with") -> Trained:
  """The model a stage trained, from the latest checkpoint of its training state under
  ``directory`` (``stages.run_stage``'s DIR/checkpoints/NAME): its selected parameters, its
  frozen inputs, its kind, read from its parameters, and its encoder. A checkpoint written
  before training states held their frozen inputs takes ``frozen_if_absent(kind)``. A
  checkpoint that is missing or unreadable, holds no training state, parameters of no kind, no
  frozen inputs (and no ``frozen_if_absent``), or parameters of another configuration than
  ``model``'s (the message then says ``remedy``) is a ConfigError naming the directory."""
  state, step = checkpoints.read_latest(directory)
  source = f"{directory} step {step}"
  params = state.get("best_params") if isinstance(state, dict) else None
  if not isinstance(params, dict):
    raise ConfigError(f"{directory} does not hold a training state with best_params.")
  kind = kind_of(params)
  if kind is None:
    raise ConfigError(f"{source}: parameters {sorted(params)} are none of a VAE, an IA-VAE, a "
                      "control or a corrector.")
  frozen = {} if kind == "vae" else state.get("frozen")
  if frozen is None:
    if frozen_if_absent is None:
      raise ConfigError(f"{source} holds a {kind} without its frozen inputs (a checkpoint "
                        "written before training states held them): give frozen_if_absent.")
    frozen = frozen_if_absent(kind)
  try:
    check_params(model, kind, params, frozen)
  except ValueError as e:
    raise ConfigError(f"{source} holds parameters of another architecture than the model's "
                      f"configuration ({e}); {remedy}.") from e
  return Trained(kind, params, frozen, encode_fn(model, kind, frozen), source)


def _chunks(data: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """[N, ...] -> ([ceil(N / size), size, ...] zero-padded, weights [ceil(N / size), size])."""
  num_chunks = -(-data.shape[0] // size)
  pad = num_chunks * size - data.shape[0]
  padded = jnp.concatenate([data, jnp.zeros((pad, *data.shape[1:]), data.dtype)])
  weights = jnp.concatenate([jnp.ones(data.shape[0]), jnp.zeros(pad)])
  return padded.reshape(num_chunks, size, *data.shape[1:]), weights.reshape(num_chunks, size)


def dataset_elbo(model: Model, encode: EncodeFn, params, frozen, data: jax.Array,
                 num_samples: int, key: jax.Array, chunk_size: int) -> jax.Array:
  """The mean ELBO over binary images data [N, 28, 28], num_samples samples per example, in
  chunks of chunk_size examples (``encode_fn`` gives ``encode``)."""
  _check_images("dataset_elbo", "data", data)
  chunks, weights = _chunks(data, chunk_size)
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


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("test_samples", "iwae_samples", "iwae_chunk", "chunk_size"))
def evaluate(model: Model, encode: EncodeFn, params, frozen, data: jax.Array, key: jax.Array, *,
             test_samples: int, iwae_samples: int, iwae_chunk: int, chunk_size: int) -> dict:
  """Per-example test metrics for binary images data [N, 28, 28], chunk_size examples at a time:
  {elbo, kl} [N] with test_samples samples, and {iwae} [N], the importance-weighted estimate of
  log p(x) with iwae_samples samples drawn iwae_chunk at a time."""
  _check_images("evaluate", "data", data)
  chunks, _ = _chunks(data, chunk_size)
  num_iwae_chunks = -(-iwae_samples // iwae_chunk)
  keys = jax.random.split(key, chunks.shape[0])

  def chunk_metrics(inputs):
    x, key = inputs
    x = _as_images(x)
    elbo_key, iwae_key = jax.random.split(key)
    mean, log_var = encode(params, frozen, x)
    log_likelihood = model.log_likelihood_fn(params["decoder"], x)
    eps = jax.random.normal(elbo_key, (test_samples, *mean.shape))
    terms = objectives.elbo(eps, mean, log_var, log_likelihood)

    log_weights = lambda key: objectives.importance_log_weights(
        jax.random.normal(key, (iwae_chunk, *mean.shape)), mean, log_var, log_likelihood)
    all_weights = jax.lax.map(log_weights, jax.random.split(iwae_key, num_iwae_chunks))
    all_weights = all_weights.reshape(-1, x.shape[0])[:iwae_samples]
    iwae = jax.nn.logsumexp(all_weights, axis=0) - jnp.log(iwae_samples)
    return terms.elbo, terms.kl, iwae
  elbo, kl, iwae = jax.lax.map(chunk_metrics, (chunks, keys))
  n = data.shape[0]  # the padding is at the end
  return {"elbo": elbo.reshape(-1)[:n], "kl": kl.reshape(-1)[:n], "iwae": iwae.reshape(-1)[:n]}


@functools.partial(jax.jit, static_argnums=(0, 1))
def reconstruct(model: Model, encode: EncodeFn, params, frozen, x: jax.Array,
                key: jax.Array) -> jax.Array:
  """Figure 8: z = the posterior mean of q(z|x), then x' ~ p(x|z) drawn pixel by pixel in
  raster order (the decoder is autoregressive). x: [n, 28, 28] -> [n, 28, 28] in {0, 1}."""
  _check_images("reconstruct", "x", x)
  mean, _ = encode(params, frozen, _as_images(x))
  height, width = x.shape[1:]
  keys = jax.random.split(key, height * width)

  def draw_pixel(i, canvas):
    logits = model.decoder.apply({"params": params["decoder"]}, canvas, mean)
    r, c = i // width, i % width
    pixel = jax.random.bernoulli(keys[i], jax.nn.sigmoid(logits[:, r, c, 0]))
    return canvas.at[:, r, c, 0].set(pixel.astype(canvas.dtype))
  return jax.lax.fori_loop(0, height * width, draw_pixel, jnp.zeros_like(_as_images(x)))[..., 0]


def gap_measurements(model: Model, *args, **kwargs) -> gaps.Measurements:
  """``gaps.Measurements`` on the model's decoder, an example being one image [28, 28, 1] in
  {0, 1}; the other arguments as gaps.Measurements takes them."""
  def log_likelihood_of(decoder_params, x_i):
    log_likelihood = model.log_likelihood_fn(decoder_params, x_i[None])
    return lambda z: log_likelihood(z[:, None])[:, 0]
  return gaps.Measurements(log_likelihood_of, *args, **kwargs)


def matched_model(model: Model) -> Model:
  """The model with a wider encoder that a VAE matched in size is trained with: every encoder
  width (ResNet channels or dense widths) scaled by the smallest factor (in steps of 1/64) that
  gives the encoder at least as many parameters as the VAE's encoder and the hypernetwork
  together."""
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


def mean_inputs(model: Model, params: dict, frozen: dict, train: jax.Array,
                chunk_size: int) -> dict:
  """What the mean-input ablation of a trained IA-VAE adds to its frozen inputs: over the
  training split [N, 28, 28] (binarised once, with a fixed key), the mean of its hypernetwork's
  input ({"mean_context": [context_size]}) or, with a feedback input, the mean of the feedback
  at each pass ({"mean_feedback": [passes, feedback_size]}); chunk_size images at a time."""
  _check_images("mean_inputs", "train", train)
  x = _as_images(images.binarize(jax.random.PRNGKey(0), train))
  chunks, weights = _chunks(x, chunk_size)
  if model.feedback is None:
    contexts = jax.lax.map(lambda chunk: model.hypernet_context(frozen, chunk), chunks)
    return {"mean_context": jnp.einsum("cb,cbm->m", weights, contexts) / jnp.sum(weights)}
  layout = model.adapted_layout(frozen["phi_avi"])

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
  """Parameter counts of the encoder, decoder, corrector and hypernetwork, the encoder's blocks
  and how many of them the hypernetwork adapts."""
  x0 = jnp.zeros((1, 28, 28, 1))
  enc = _encoder_shapes(model)
  dec = jax.eval_shape(model.decoder.init, jax.random.PRNGKey(0), x0,
                       jnp.zeros((1, model.config.latent_dim)))
  layout = model.adapted_layout(enc["params"])
  psi = jax.eval_shape(lambda key: model.init_hypernet(key, layout), jax.random.PRNGKey(0))
  omega = jax.eval_shape(model.init_corrector, jax.random.PRNGKey(0))
  return {"encoder": _count(enc["params"]), "decoder": _count(dec["params"]),
          "corrector": _count(omega),
          "hypernetwork": _count(psi),
          "encoder_blocks": blocks.BlockLayout.from_tree(enc["params"]).num_blocks,
          "adapted_blocks": layout.num_blocks}


