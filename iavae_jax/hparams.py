"""The configurations of the paper's two IA-VAEs (``ImageVAEConfig``, iavae_jax.image_vae's;
``SyntheticVAEConfig``, iavae_jax.synthetic_vae's), of the gap measurements over a data set
(``GapSettings``, iavae_jax.gap_runs') and the names of the library's choices.

Plain data, free of JAX (as ``iavae_jax.data``'s names are), so that command lines can check
their flags before importing it.
"""

import dataclasses
import re

__all__ = ["DESIGNS", "FEEDBACKS", "KINDS", "INFERRING_KINDS", "ENCODERS", "DECODERS",
           "HYPERNET_INPUTS", "WEIGHT_DECAY_MODES", "SYNTHETIC_INPUTS", "REFINE_TUNE_SAMPLES",
           "SA_VAE_BATCH_SIZE", "ImageVAEConfig", "SyntheticVAEConfig", "GapSettings",
           "check_fields"]

# The hypernetwork designs (iavae_jax.hypernets.HYPERNETS): the paper's structured one, Ha et
# al.'s static hypernetwork, a one-hidden-layer generator.
DESIGNS = ("paper", "ha", "mlp")
# The decoder's feedback on the encoder's current guess (iavae_jax.feedback): the ELBO's
# gradient, or the image minus the decoder's mean.
FEEDBACKS = ("gradient", "residual")
KINDS = ("vae", "iavae", "control", "corrector")   # what a model's step, encoder and optimiser are
INFERRING_KINDS = ("iavae", "corrector")   # the kinds whose inference may see the feedback
ENCODERS = ("resnet", "mlp")
# pixelcnn: the gated PixelCNN without a blind spot; pixelcnn_kim: Kim et al.'s masking exactly;
# mlp: a dense decoder of independent pixels given z.
DECODERS = ("pixelcnn", "pixelcnn_kim", "mlp")
# What the inference network sees of x (``Model.hypernet_context``), or, with the decoder's
# feedback on the encoder's current guess (FEEDBACKS), x with that guess and feedback.
HYPERNET_INPUTS = ("image", "image_l2", "encoder", "penultimate") + FEEDBACKS
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
# What the synthetic hypernetwork sees: x itself, a bounded function of it, or (FEEDBACKS) x with
# the encoder's current guess and the true decoder's feedback on it.
SYNTHETIC_INPUTS = ("x", "tanh", "softclip") + FEEDBACKS
# Samples per step of the tuned refinement's candidates (iavae_jax.gaps.tune_refinement).
REFINE_TUNE_SAMPLES = (1, 4, 16)


def check_fields(config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive_finite: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the first of ``config``'s fields in ``positive`` that is not a
  positive integer, in ``non_negative`` not a non-negative one, or in ``positive_finite`` not a
  positive finite number."""
  for names, ok, what in ((positive, lambda v: v > 0, "a positive integer"),
                          (non_negative, lambda v: v >= 0, "a non-negative integer"),
                          (positive_finite, lambda v: 0 < v < float("inf"),
                           "positive and finite")):
    for name in names:
      if not ok(getattr(config, name)):
        raise ValueError(f"{name} must be {what}, got {getattr(config, name)}.")


@dataclasses.dataclass(frozen=True)
class ImageVAEConfig:
  """The model and its training settings; the defaults are the paper's (SA-VAE's model for
  MNIST). ``validate`` checks every field and names the one that is wrong."""
  # Models (Kim et al. 2018): ResNet encoder, gated PixelCNN decoder, 32-d latent; or dense
  # encoders and decoders (ENCODERS, DECODERS).
  encoder: str = "resnet"
  encoder_channels: tuple[int, ...] = (64, 64, 64)   # resnet: a residual stage per width
  encoder_hidden: tuple[int, ...] = (200,)          # mlp: a ReLU layer per width
  latent_dim: int = 32
  decoder: str = "pixelcnn"
  decoder_features: int = 32
  decoder_kernel_sizes: tuple[int, ...] = (9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3)
  latent_feature_maps: int = 4
  decoder_hidden: tuple[int, ...] = (200, 200)      # mlp: a ReLU layer per width
  # The structured hypernetwork (paper: e_l of 16, e_in of 8, output layers N(0, 1e-3^2)).
  # The paper's 1e-3 does not start stage 2 near the stage-1 encoder here: the x-part of every
  # conv slice's delta is the same vector, so it adds up coherently over the (non-negative)
  # input channels; 1e-5 keeps the start close, as the paper intends (docs/results.md).
  block_embed_dim: int = 16
  input_embed_dim: int = 8          # paper and mlp (ha has no input embeddings)
  hypernet_init_std: float = 1e-5
  # The hypernetwork's design (DESIGNS): the paper's structured one, Ha et al.'s
  # static hypernetwork, or a one-hidden-layer generator (docs/results.md, "Hypernetwork
  # designs").
  hypernet: str = "mlp"
  hypernet_hidden: int = 0          # ha's code size / mlp's hidden width (0: the design's own
                                    # default, ha 16, mlp 64); not for paper
  ha_block_gains: bool = False      # ha: a per-block gain on the x-part of the code
  hypernet_projection: int = 0      # > 0: the design sees a learned projection of the context to
                                    # this many numbers (ha's first layers grow with its size)
  # The encoder blocks the hypernetwork adapts: a regular expression over their paths
  # (blocks.select; e.g. "^(mean|log_var)/" for the dense encoder's output layers), "" for every
  # block; the others keep phi_AVI's value.
  adapted_blocks: str = ""
  # What the hypernetwork sees of x (HYPERNET_INPUTS). The paper's raw image diverged on
  # Fashion-MNIST: Adam's first step moves every delta by ~lr x (ink pixels), coherently; over
  # the image's Euclidean norm by ~lr x sqrt(ink pixels).
  hypernet_input: str = "image_l2"
  # The feedback inputs: [x over its norm; mean; log-variance; feedback] at the encoder's current
  # output, recomputed at each of ``passes`` passes; ``gradient`` estimated with
  # feedback_samples fixed noise draws (2 feedback_samples decoder passes per pass).
  feedback_samples: int = 8
  passes: int = 1
  # The corrector's two ELU layers' width, 0 for the width that gives it about as many
  # parameters as the hypernetwork.
  corrector_hidden: int = 0
  # Stage 1 as in SA-VAE: Adam 1e-3, KL weight 0.1 -> 1 over 10 epochs, gradients clipped to 5.
  vae_learning_rate: float = 1e-3
  warmup_epochs: int = 10
  warmup_start: float = 0.1
  max_grad_norm: float = 5.0
  # Stage 2 (and the control and corrector).
  hypernet_learning_rate: float = 1e-4   # hypernetwork and embeddings (control: the encoder)
  decoder_learning_rate: float = 5e-5
  weight_decay: float = 5e-4             # the paper's for MNIST (OMNIGLOT: 5e-3)
  # As PyTorch's Adam(weight_decay=...), which the paper's setup implies: the decay added to the
  # clipped gradient before Adam's scaling; "decoupled" is AdamW's (the decay added to the update).
  weight_decay_mode: str = "coupled"
  num_samples: int = 1              # z samples per example in the training ELBO
  # The schedules (stage 1 as in SA-VAE: batch 50) and early stopping on the validation ELBO.
  batch_size: int = 50
  vae_epochs: int = 100
  iavae_epochs: int = 100                # stage 2, the control and the corrector
  patience: int = 100                    # epochs without a better validation ELBO (both stages)
  # > 0: the patience of every model that starts from the VAE (IA-VAEs, controls, correctors)
  # counted in optimiser steps (rounded up to whole epochs), so that it does not shrink with the
  # training set.
  stage2_patience_steps: int = 0
  valid_samples: int = 1            # per example for the validation ELBO (fixed noise)
  eval_batch_size: int = 50         # examples per evaluation chunk

  def validate(self) -> "ImageVAEConfig":
    """Returns self, or raises ValueError naming the first field that is wrong and what it
    accepts."""
    for name, known in (("encoder", ENCODERS), ("decoder", DECODERS),
                        ("hypernet", DESIGNS),
                        ("hypernet_input", HYPERNET_INPUTS),
                        ("weight_decay_mode", WEIGHT_DECAY_MODES)):
      if getattr(self, name) not in known:
        raise ValueError(f"{name}={getattr(self, name)} is not known; choose one of "
                         f"{', '.join(known)}.")
    for name in ("encoder_hidden", "decoder_hidden", "encoder_channels"):
      if not getattr(self, name) or min(getattr(self, name)) <= 0:
        raise ValueError(f"{name} must be positive integers, got {list(getattr(self, name))}.")
    if len(self.encoder_channels) > 3:
      raise ValueError(f"encoder_channels: at most 3 stride-2 stages fit a 28x28 image "
                       f"(28 -> 14 -> 7 -> 3), got {len(self.encoder_channels)}.")
    if not self.decoder_kernel_sizes or any(k <= 0 or k % 2 == 0
                                            for k in self.decoder_kernel_sizes):
      raise ValueError(f"decoder_kernel_sizes must be odd positive integers, got "
                       f"{list(self.decoder_kernel_sizes)}.")
    check_fields(self, non_negative=("hypernet_hidden", "hypernet_projection",
                                     "corrector_hidden", "warmup_epochs", "stage2_patience_steps"))
    if self.hypernet_hidden and self.hypernet == "paper":
      raise ValueError("hypernet_hidden sets the hidden width of hypernet=ha or mlp; the paper "
                       "design has no hidden layer.")
    try:
      re.compile(self.adapted_blocks)
    except re.error as e:
      raise ValueError(f"adapted_blocks={self.adapted_blocks!r} is not a regular expression "
                       f"({e}).") from None
    if self.ha_block_gains and self.hypernet != "ha":
      raise ValueError(f"ha_block_gains applies to hypernet=ha only, not {self.hypernet}.")
    check_fields(self, positive=(
        "latent_dim", "decoder_features", "latent_feature_maps", "block_embed_dim",
        "input_embed_dim", "feedback_samples", "passes", "num_samples", "batch_size",
        "vae_epochs", "iavae_epochs", "patience", "valid_samples", "eval_batch_size"))
    if self.passes > 1 and self.hypernet_input not in FEEDBACKS:
      raise ValueError(f"passes={self.passes}: later passes differ from the first only through "
                       f"the decoder's feedback; use hypernet_input="
                       f"{' or '.join(FEEDBACKS)}, or passes=1.")
    check_fields(self, positive_finite=("vae_learning_rate", "hypernet_learning_rate",
                                        "decoder_learning_rate", "hypernet_init_std",
                                        "max_grad_norm", "warmup_start"))
    if self.warmup_start > 1:
      raise ValueError(f"warmup_start is a KL weight in (0, 1], got {self.warmup_start}.")
    if not 0 <= self.weight_decay < float("inf"):
      raise ValueError(f"weight_decay must be non-negative and finite, got {self.weight_decay}.")
    return self


@dataclasses.dataclass(frozen=True)
class SyntheticVAEConfig:
  """The synthetic oracle model's VAE and IA-VAE and their training (paper section 4.1): the
  paper's values by default. ``validate`` checks every field and names the one that is wrong."""
  sigma: float = 0.1                # observation noise and Gaussian likelihood scale
  encoder_width: int = 2            # hidden units of the base encoder (8h + 4 parameters)
  embed_dim: int = 2                # size of the block embeddings e_l
  hypernet_init_std: float = 1e-3   # std of the hypernetwork's W at initialisation (b = 0)
  learning_rate: float = 1e-4       # Adam
  batch_size: int = 32
  max_epochs: int = 1000
  patience: int = 100               # early stopping on the full-data ELBO
  num_samples: int = 1              # Monte Carlo samples S per example in the training ELBO
  # What the hypernetwork sees of x (SYNTHETIC_INPUTS): "x" as in the paper (its delta grows
  # linearly with |x|), or a bounded function of x, so every delta is bounded: "tanh" of x
  # standardised by the training data's mean and std, or "softclip", x itself in the bulk
  # (synthetic_vae.hypernet_context). "gradient" (the exact ELBO's, the decoder being known) or
  # "residual" (x - f(mean)) with x, mean and log-variance: recomputed at each of ``passes``
  # passes, each adding a delta.
  hypernet_input: str = "x"
  passes: int = 1

  def validate(self) -> "SyntheticVAEConfig":
    """Returns self, or raises ValueError naming the first field that is wrong and what it
    accepts."""
    check_fields(self, positive=("encoder_width", "embed_dim", "batch_size", "max_epochs",
                                 "patience", "num_samples"),
                 positive_finite=("sigma", "learning_rate", "hypernet_init_std"))
    if self.hypernet_input not in SYNTHETIC_INPUTS:
      raise ValueError(f"hypernet_input={self.hypernet_input} is not known; choose one of "
                       f"{', '.join(SYNTHETIC_INPUTS)}.")
    if self.passes < 1 or (self.passes > 1 and self.hypernet_input not in FEEDBACKS):
      raise ValueError(f"passes={self.passes}: give 1, or more with hypernet_input="
                       f"{' or '.join(FEEDBACKS)} (later passes differ from the first only "
                       "through the decoder's feedback).")
    return self


# SA-VAE's refinement (harvardnlp/sa-vae, train_img.py and optim_n2n.py at test time): SGD with
# momentum 0.5 and learning rate 1 on the mean negative ELBO of a batch of 50 examples, one
# sample per step, each of the batch's two [50, k] gradients (mean, log-variance) clipped to norm
# 5. Per example, independent of any batch, that is learning rate 1/50 on the example's own
# negative ELBO, and (for a batch whose examples' gradients have equal norms) a clip at 5 sqrt(50)
# of each of the example's two gradients.
SA_VAE_BATCH_SIZE = 50


@dataclasses.dataclass(frozen=True)
class GapSettings:
  """The gap decomposition of a trained model over a data set (``iavae_jax.gap_runs``) and the
  refinement curve measured beside it. The defaults, which ``iavae_jax.gaps``' settings take
  from here: Cremer et al.'s for q* (Adam 1e-3, 50 samples per step, a check every 100 steps,
  patience 10, 5,000 samples for the final values and for log p^) and SA-VAE's test-time
  refinement, per example (see SA_VAE_BATCH_SIZE).
  ``validate`` checks every field and names the one that is wrong."""
  num_examples: int = 0               # the first N images of the test split (0: all of it)
  batch_size: int = 50                # examples per jitted call
  qstar_learning_rate: float = 1e-3   # Adam
  qstar_samples: int = 50             # samples per step
  qstar_check_every: int = 100        # steps between checks of a fixed-noise ELBO estimate
  qstar_check_samples: int = 100      # samples of that estimate
  qstar_patience: int = 10            # checks without improvement before stopping
  qstar_max_steps: int = 100_000      # cap on the steps (rounded up to a whole check)
  final_samples: int = 5000           # samples of the reported L[q] and L[q*]
  iwae_samples: int = 5000            # K of log p^ (q* as the proposal)
  sample_chunk: int = 100             # samples per decoder call
  refine_steps: tuple[int, ...] = (1, 5, 20, 100)   # K recorded on the refinement curve
  refine_learning_rate: float = 1 / SA_VAE_BATCH_SIZE   # SGD with momentum, heavy ball
  refine_momentum: float = 0.5
  refine_max_grad_norm: float = 5 * SA_VAE_BATCH_SIZE**0.5   # each of the two gradients
  refine_samples: int = 1             # samples per refinement step
  refine_optimizer: str = "sgd"       # "sgd" (heavy ball, refine_momentum) or "adam"
  # > 0: the VAE's refinement is also tuned, its optimiser, step size and samples per step chosen
  # by the ELBO on this many validation images after tune_budget decoder passes per image
  # (iavae_jax.gaps.tune_refinement); the tuned curve is measured beside the configured one.
  tune_examples: int = 0
  tune_budget: int = 200
  refine_eval_samples: int = 5000     # samples of the ELBO at each K (the final noise of L[q])
  convergence_examples: int = 100     # examples rerun with twice the patience and max_steps
  convergence_tolerance: float = 0.05  # nats: the rule on the mean of L[q*] over them

  def validate(self) -> "GapSettings":
    """Returns self, or raises ValueError naming the first field that is wrong and what it
    accepts."""
    check_fields(self, positive=("batch_size", "qstar_samples", "qstar_check_every",
                                 "qstar_check_samples", "qstar_patience", "qstar_max_steps",
                                 "final_samples", "iwae_samples", "sample_chunk",
                                 "refine_samples", "refine_eval_samples"),
                 non_negative=("num_examples", "convergence_examples"),
                 positive_finite=("qstar_learning_rate", "refine_learning_rate",
                                  "refine_max_grad_norm", "convergence_tolerance"))
    if not 0 <= self.refine_momentum < 1:
      raise ValueError(f"refine_momentum must be in [0, 1), got {self.refine_momentum}.")
    if self.refine_optimizer not in ("sgd", "adam"):
      raise ValueError(f"refine_optimizer must be sgd or adam, got {self.refine_optimizer}.")
    largest = max(REFINE_TUNE_SAMPLES)
    if self.tune_examples < 0 or self.tune_budget < 2 * largest:
      raise ValueError(f"tune_examples={self.tune_examples} must be a non-negative integer and "
                       f"tune_budget={self.tune_budget} at least {2 * largest} (one step of the "
                       f"largest candidate, {largest} samples, forward and backward).")
    if not self.refine_steps or min(self.refine_steps) <= 0:
      raise ValueError(f"refine_steps must be positive step counts, got "
                       f"{list(self.refine_steps)}.")
    for name in ("qstar_check_samples", "final_samples", "iwae_samples", "refine_eval_samples"):
      value = getattr(self, name)
      if value > self.sample_chunk and value % self.sample_chunk:
        raise ValueError(f"{name}={value} must be a multiple of sample_chunk="
                         f"{self.sample_chunk} (or at most it): every decoder call draws as "
                         "many samples.")
    return self
