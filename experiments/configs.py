"""Configurations as data: one per protocol, printed and saved next to the results."""

import dataclasses
import re
from typing import NamedTuple

from experiments.common import ConfigError
from iavae_jax import hparams
from iavae_jax.data import DATASETS


MAX_SEED = 2**31 - 1   # seeds are folded into JAX keys as 32-bit integers


def _as_flags(validate, library_config: type) -> None:
  """Runs a library configuration's validate(); its ValueError, which names the fields (the
  message starts with the field it is about and writes others as name=value), becomes a
  ConfigError that names them as the flags they are."""
  try:
    validate()
  except ValueError as e:
    fields = "|".join(f.name for f in dataclasses.fields(library_config))
    message = re.sub(rf"(?<![-\w])({fields})=", r"--\1=", str(e))
    raise ConfigError(message if message.startswith("--") else "--" + message) from None


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(hparams.SyntheticVAEConfig):
  """The synthetic oracle experiment (paper section 4.1 and Table 1): the model and its training
  (iavae_jax.hparams.SyntheticVAEConfig's fields, the paper's by default), the data, the
  populations trained and the run's plumbing."""
  num_examples: int = 5000          # N; no train/test split
  data_seed: int = 0
  seed: int = 0                     # root of every model's init, noise and data-order seeds
  num_vae_seeds: int = 10           # Table 2 rows
  num_iavae_seeds: int = 10         # IA-VAEs per VAE
  sweep_widths: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)  # Figure 7
  num_sweep_seeds: int = 3          # VAEs per width in the sweep (the curve is their mean)
  epochs_per_call: int = 10         # epochs per jitted call (progress and checkpoint granularity)
  # Stage 2's starting point (the IA-VAE at initialisation, ~its VAE's encoder) is a
  # model-selection candidate (epoch 0), scored like every epoch on the full data.
  start_as_candidate: bool = True
  checkpoint_every: int = 50        # epochs between resume checkpoints

  def validate(self) -> "SyntheticConfig":
    """Returns self, or raises ConfigError naming the first flag that is wrong."""
    _as_flags(super().validate, hparams.SyntheticVAEConfig)
    _as_flags(lambda: hparams.check_fields(self, positive=(
        "num_examples", "num_vae_seeds", "num_iavae_seeds", "num_sweep_seeds", "epochs_per_call",
        "checkpoint_every")), SyntheticConfig)
    for name in ("seed", "data_seed"):
      if not 0 <= getattr(self, name) <= MAX_SEED:
        raise ConfigError(f"--{name} must be an integer in [0, {MAX_SEED}], got "
                          f"{getattr(self, name)}.")
    if not self.sweep_widths or min(self.sweep_widths) <= 0:
      raise ConfigError(f"--sweep_widths must be positive integers, got {list(self.sweep_widths)}.")
    if self.batch_size > self.num_examples:
      raise ConfigError(f"--batch_size={self.batch_size} exceeds --num_examples="
                        f"{self.num_examples}: no full batch can be formed.")
    return self


class SyntheticPopulation(NamedTuple):
  """One population the synthetic protocol trains."""
  key_id: int        # its models' keys derive from (seed, key_id, *their index tuple)
  kind: str          # what its models are: a key of synthetic_vae.LOOP_EMITTERS
  model_name: str    # how errors name one of its models, from its index tuple


SYNTHETIC_POPULATIONS = {
    "vae": SyntheticPopulation(1, "vae", "VAE seed {}"),
    "iavae": SyntheticPopulation(2, "iavae", "IA-VAE seed {1} on VAE seed {0}"),
    "sweep": SyntheticPopulation(3, "vae", "sweep VAE of width {} (seed {})")}


def synthetic_full() -> SyntheticConfig:
  """The paper's protocol (section 4.1): 10 VAEs x 10 IA-VAEs, up to 1000 epochs, patience 100,
  the width sweep of Figure 7 and the held-out data.

    python -m experiments.synthetic --workdir=runs/synthetic

  About a minute on 2 CPU cores (59.8 s, median of 3: python -m benchmarks.synthetic_protocol).
  Measured (docs/results.md): Table 3's ELBO VAE -12.47 (about -4.9 for the typical seed: one
  has a dead hidden unit), IA-VAE -3.34; the IA-VAE closes 82% of its VAE's amortization gap."""
  return SyntheticConfig()


def synthetic_plumbing_check() -> SyntheticConfig:
  """Every step of the protocol on fewer models and epochs, for tests and --plumbing_check: the
  same files, but 20 epochs at the paper's rate train nothing (VAEs near -900 nats).

    python -m experiments.synthetic --plumbing_check --workdir=/tmp/check

  67 s on 2 CPU cores that another run shared (2026-12-03)."""
  return dataclasses.replace(SyntheticConfig(), num_vae_seeds=2, num_iavae_seeds=3, max_epochs=20,
                             patience=10, sweep_widths=(2, 6, 12, 20), num_sweep_seeds=1,
                             checkpoint_every=10)


class ModelSpec(NamedTuple):
  """One trainable model of an image run."""
  kind: str                     # hparams.KINDS: its step, encoder and optimiser
  key_id: int                   # its keys (initialisation, data order, noise) derive from
                                # (seed, key_id)
  label: str                    # its name in the tables
  freeze_decoder: bool = False  # stage 2 with the VAE's decoder fixed
  matched: bool = False         # its encoder widened to the VAE's encoder + hypernetwork size


# The models an image run can train (experiments.images_train says what each is); the models
# with the same key id share their initialisation, data order and noise, for paired tests.
MODEL_SPECS = {
    "vae": ModelSpec("vae", 1, "VAE"),
    "iavae": ModelSpec("iavae", 2, "IA-VAE"),
    "control": ModelSpec("control", 3, "control"),
    "iavae_frozen_decoder": ModelSpec("iavae", 2, "IA-VAE, decoder frozen", freeze_decoder=True),
    "control_frozen_decoder": ModelSpec("control", 3, "control, decoder frozen",
                                        freeze_decoder=True),
    "vae_matched": ModelSpec("vae", 5, "VAE, matched encoder", matched=True),
    "corrector": ModelSpec("corrector", 6, "corrector"),
    "corrector_frozen_decoder": ModelSpec("corrector", 6, "corrector, decoder frozen",
                                          freeze_decoder=True),
}
IMAGE_MODELS = tuple(MODEL_SPECS)   # the converged tier's: the first six
EVAL_KEY_ID = 4                     # the test evaluation's noise derives from (seed, EVAL_KEY_ID)
# An IA-VAE's evaluated-only ablation: its hypernetwork's input (with a feedback input, the
# feedback) replaced by its mean over the training split, named after the IA-VAE with this suffix.
MEAN_SUFFIX = "_mean_context"
ADAPTED = ("iavae", "iavae_frozen_decoder")   # the IA-VAEs whose ablation is evaluated


def evaluated_models(models: tuple[str, ...]) -> tuple[str, ...]:
  """The models a run that trains ``models`` reports: those, and the mean-input ablation of each
  IA-VAE among them (ADAPTED)."""
  return models + tuple(name + MEAN_SUFFIX for name in ADAPTED if name in models)


def ablated(name: str) -> str | None:
  """The trained IA-VAE whose mean-input ablation ``name`` is, or None."""
  return name[:-len(MEAN_SUFFIX)] if name.endswith(MEAN_SUFFIX) else None


def label(name: str) -> str:
  """A model's (or a mean-input ablation's) name in the tables."""
  return (MODEL_SPECS[ablated(name)].label + ", mean input" if ablated(name)
          else MODEL_SPECS[name].label)


# What the reports compare (experiments.report and experiments.designs, rendered by
# experiments.tables). Table 4's models, which every image run trains beside the VAE; the others
# a run may train or evaluate, summarised where present; the paired tests (key, model, other) of
# H1 "model > other" on test ELBO, made where both are present.
TABLE4_MODELS = ("vae", "iavae", "control")
ABLATIONS = tuple(name for name in evaluated_models(IMAGE_MODELS) if name not in TABLE4_MODELS)
COMPARISONS = (("iavae_vs_vae", "iavae", "vae"), ("iavae_vs_control", "iavae", "control"))
ABLATION_COMPARISONS = (
    ("iavae_vs_iavae_mean_context", "iavae", "iavae_mean_context"),
    ("iavae_frozen_decoder_vs_control_frozen_decoder", "iavae_frozen_decoder",
     "control_frozen_decoder"),
    ("iavae_vs_vae_matched", "iavae", "vae_matched"),
    ("iavae_vs_corrector", "iavae", "corrector"),
    ("iavae_frozen_decoder_vs_corrector_frozen_decoder", "iavae_frozen_decoder",
     "corrector_frozen_decoder"),
    ("iavae_frozen_decoder_vs_iavae_frozen_decoder_mean_context", "iavae_frozen_decoder",
     "iavae_frozen_decoder_mean_context"))
# The designs' second table: the IA-VAE on the VAE's frozen decoder, and its tests against each
# other model there (key: other).
FROZEN_IAVAE = "iavae_frozen_decoder"
FROZEN_OTHERS = {"vs_control": "control_frozen_decoder", "vs_corrector": "corrector_frozen_decoder",
                 "vs_mean_input": FROZEN_IAVAE + MEAN_SUFFIX}


# Stage-2 weight decay: the paper's values for OMNIGLOT and MNIST; Fashion-MNIST (not given in the
# paper) and binarized MNIST take MNIST's, the closer data set in size and image statistics.
WEIGHT_DECAY = {"omniglot": 5e-3, "mnist": 5e-4, "fashion_mnist": 5e-4, "binarized_mnist": 5e-4}


@dataclasses.dataclass(frozen=True)
class ImageConfig(hparams.ImageVAEConfig):
  """The image experiments (paper section 4.2, Table 4): the model and its training settings
  (iavae_jax.image_vae.ImageVAEConfig's fields, the paper's by default), the data, the models
  trained per seed, the schedules and the evaluation."""
  dataset: str = "mnist"
  tier: str = "paper"
  # Data: validation = a seeded 15% of the training split (split_seed), test = the test split.
  split_seed: int = 0
  max_train: int = 0                # cap on training examples after the split (0: all)
  max_valid: int = 0                # cap on validation examples (0: all)
  max_test: int = 0                 # cap on test examples (0: all)
  seed: int = 0                     # model seeds are seed, seed + 1, ...
  num_seeds: int = 10
  models: tuple[str, ...] = TABLE4_MODELS   # IMAGE_MODELS to train, per seed
  # Stage 2's and the control's starting point (the stage-1 VAE) is a model-selection candidate
  # (epoch 0), so a run never selects something worse on validation than where it started.
  start_as_candidate: bool = True
  # Evaluation.
  test_samples: int = 10            # per example for the test ELBO
  iwae_samples: int = 5000          # K of the importance-weighted log-likelihood estimate
  iwae_chunk: int = 100             # importance samples per decoder call
  num_reconstructions: int = 8      # Figure 8 columns
  checkpoint_every: int = 1         # epochs between resume checkpoints

  def validate(self) -> "ImageConfig":
    """Returns self, or raises ConfigError naming the first flag that is wrong."""
    _as_flags(super().validate, hparams.ImageVAEConfig)
    if self.dataset not in DATASETS:
      raise ConfigError(f"--dataset={self.dataset} is not known; choose one of "
                        f"{', '.join(DATASETS)}.")
    if self.tier not in IMAGE_TIERS:
      raise ConfigError(f"--tier={self.tier} is not known; choose one of {', '.join(IMAGE_TIERS)}.")
    unknown = [m for m in self.models if m not in IMAGE_MODELS]
    if unknown or "vae" not in self.models or len(set(self.models)) != len(self.models):
      raise ConfigError(f"--models={','.join(self.models)}: name each model once, among "
                        f"{', '.join(IMAGE_MODELS)}, and include vae (every other model starts "
                        "from it or is compared with it).")
    _as_flags(lambda: hparams.check_fields(
        self, positive=("num_seeds", "test_samples", "iwae_samples", "iwae_chunk",
                        "checkpoint_every"),
        non_negative=("split_seed", "max_train", "max_valid", "max_test", "seed",
                      "num_reconstructions")), ImageConfig)
    if self.seed + self.num_seeds > MAX_SEED + 1:
      raise ConfigError(f"--seed + --num_seeds must be at most {MAX_SEED + 1} (the seeds are "
                        f"{self.seed}, {self.seed} + 1, ..., and JAX names seeds with 32-bit "
                        f"integers); got {self.seed} + {self.num_seeds}.")
    return self


def paper_tier(base: ImageConfig) -> ImageConfig:
  """The paper's protocol (section 4.2): SA-VAE's ResNet and gated PixelCNN, the full data
  sets, 100 + 100 epochs, 10 seeds.

    python -m experiments.images --dataset=mnist --workdir=runs/paper/mnist

  Not run on the 2 CPU cores (one epoch of full MNIST would take ~35 min there). On one NVIDIA
  H200, one seed of 20 + 20 epochs on the 5,000-image MNIST subset took 209 s: VAE -82.89,
  IA-VAE -81.53, control -81.50 (docs/results.md, "The paper architecture on a GPU"). The paper
  reports IA-VAE -84.08, VAE -85.56 on full MNIST, not reproduced here."""
  return base


def cpu_tier(base: ImageConfig) -> ImageConfig:
  """The paper's families, smaller: a narrower ResNet, a 3-layer PixelCNN of 16 features,
  1,500 / 500 / 500 images, 10 + 10 epochs, 5 seeds.

    python -m experiments.images --dataset=mnist --tier=cpu --data_dir=data/mnist-5k \
        --workdir=runs/cpu/mnist

  17-22 min per data set on 2 CPU cores. Measured (docs/results.md, Table 4 of the cpu tier;
  run before the fidelity flags and with the paper design): MNIST VAE -101.60, IA-VAE -100.46,
  control -100.46."""
  return dataclasses.replace(
      base, num_seeds=5, encoder_channels=(16, 16, 16), decoder_features=16,
      decoder_kernel_sizes=(5, 3, 3), max_train=1500, max_valid=500, max_test=500,
      vae_epochs=10, warmup_epochs=3, iavae_epochs=10, patience=10, test_samples=5,
      iwae_samples=25, iwae_chunk=25, eval_batch_size=100)


def converged_tier(base: ImageConfig) -> ImageConfig:
  """Every model trained until its validation ELBO stops improving (the best epoch kept), so
  that the control cannot win by extra epochs, and every ablation trained: dense encoders and
  decoders (the kind Cremer et al. measured the gaps of), 1,500 / 500 / 500 images, stage 2 at
  the paper's rates (at ten times them the IA-VAE's validation ELBO fell from -120 to -196 in
  its first epoch), 5 seeds. Stage 2's patience counts 1,500 optimiser steps: 150 stopped models
  whose validation ELBO was still rising (docs/feedback.md, "The stage-2 patience").

    python -m experiments.images --dataset=mnist --tier=converged --data_dir=data/mnist-5k \
        --workdir=runs/converged/mnist
    python -m experiments.gaps --workdir=runs/converged/mnist

  Measured with the earlier patience of 150 steps (--stage2_patience_steps=0), seeds 0-2
  (docs/results.md, "Hypernetwork designs"): MNIST VAE -118.07, IA-VAE -116.54, control
  -116.89, 12% of the VAE's amortization gap closed; 13-55 min per data set on 2 CPU cores. With
  1,500 steps, four frozen-decoder models of 3 seeds took 44-47 min per data set."""
  return dataclasses.replace(
      base, num_seeds=5, models=IMAGE_MODELS[:6], encoder="mlp", encoder_hidden=(64,),
      decoder="mlp", decoder_hidden=(100, 100), max_train=1500, max_valid=500, max_test=500,
      batch_size=100, vae_epochs=1000, iavae_epochs=1000, patience=10,
      stage2_patience_steps=1500, valid_samples=5, test_samples=10, iwae_samples=500,
      iwae_chunk=100, eval_batch_size=250, num_reconstructions=8, checkpoint_every=10)


def smoke_tier(base: ImageConfig) -> ImageConfig:
  """Every step of a run on tiny models and data (2 epochs per stage, 2 seeds): a plumbing
  check, for the tests. Its numbers say nothing about the method.

    python -m experiments.images --dataset=mnist --tier=smoke --data_dir=data/mnist-5k \
        --workdir=/tmp/smoke

  152 s on 2 CPU cores that another run shared (2026-12-03), most of it compiling."""
  return dataclasses.replace(
      base, num_seeds=2, encoder_channels=(4, 4), latent_dim=4, decoder_features=4,
      decoder_kernel_sizes=(3,), latent_feature_maps=1, block_embed_dim=4, input_embed_dim=2,
      max_train=100, max_valid=40, max_test=40, batch_size=20, vae_epochs=2, warmup_epochs=1,
      iavae_epochs=2, patience=2, test_samples=2, iwae_samples=8, iwae_chunk=4,
      eval_batch_size=20, num_reconstructions=4)


IMAGE_TIER_CONFIGS = {"paper": paper_tier, "cpu": cpu_tier, "converged": converged_tier,
                      "smoke": smoke_tier}
IMAGE_TIERS = tuple(IMAGE_TIER_CONFIGS)


def image_config(dataset: str, tier: str) -> ImageConfig:
  """The configuration of a tier for a data set (validated: an unknown tier or data set is a
  ConfigError; flags override fields after)."""
  base = ImageConfig(dataset=dataset, tier=tier,
                     weight_decay=WEIGHT_DECAY.get(dataset, WEIGHT_DECAY["mnist"]))
  return IMAGE_TIER_CONFIGS.get(tier, lambda config: config)(base).validate()


@dataclasses.dataclass(frozen=True)
class GapsConfig(hparams.GapSettings):
  """The gap decomposition and the refinement curve of a trained image run (experiments.gaps):
  iavae_jax.hparams.GapSettings' fields, and the run's tier."""
  tier: str = "paper"

  def validate(self) -> "GapsConfig":
    """Returns self, or raises ConfigError naming the first flag that is wrong."""
    if self.tier not in IMAGE_TIERS:
      raise ConfigError(f"--tier={self.tier} is not known; choose one of {', '.join(IMAGE_TIERS)}.")
    _as_flags(super().validate, hparams.GapSettings)
    return self


# Each tier's gap-measurement settings, over GapSettings' defaults (the paper tier's: the whole
# test split, Cremer et al.'s settings).
GAPS_TIERS = {
    "paper": {},
    # A faster q* search than Cremer et al.'s (Adam 1e-2, 4 samples per step), chosen for the
    # cpu tier's convolutional decoder (docs/results.md, "Cost"; benchmarks/gaps_cost.py).
    "cpu": dict(num_examples=50, batch_size=10, qstar_learning_rate=1e-2, qstar_samples=4,
                qstar_check_every=50, qstar_check_samples=50, qstar_patience=5,
                qstar_max_steps=2000, final_samples=500, iwae_samples=1000,
                refine_eval_samples=100, convergence_examples=10),
    # The dense decoder is cheap enough for Cremer et al.'s K = 5,000 for log p^; q* by the cpu
    # tier's faster search with 10 samples per step; 50 images per model and seed, 10 of them
    # checked (docs/results.md, "Cost").
    "converged": dict(num_examples=50, batch_size=50, qstar_learning_rate=1e-2, qstar_samples=10,
                      qstar_check_every=50, qstar_check_samples=100, qstar_patience=5,
                      qstar_max_steps=5000, final_samples=500, iwae_samples=5000,
                      sample_chunk=500, refine_eval_samples=200, convergence_examples=10,
                      tune_examples=50,
                      refine_steps=(1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200)),
    "smoke": dict(num_examples=20, batch_size=10, qstar_samples=4, qstar_check_every=10,
                  qstar_check_samples=8, qstar_patience=2, qstar_max_steps=100, final_samples=32,
                  iwae_samples=32, sample_chunk=32, refine_eval_samples=32,
                  convergence_examples=10),
}


def gaps_config(tier: str) -> GapsConfig:
  """The gap decomposition's settings for a run of this tier (flags override fields after)."""
  return dataclasses.replace(GapsConfig(tier=tier).validate(), **GAPS_TIERS[tier]).validate()
