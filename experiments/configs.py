"""Configurations as data: one per protocol, printed and saved next to the results."""

import dataclasses

from experiments.common import ConfigError


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The synthetic oracle experiment (paper section 4.1 and Table 1)."""
  num_examples: int = 5000          # N; no train/test split
  sigma: float = 0.1                # observation noise and Gaussian likelihood scale
  data_seed: int = 0
  seed: int = 0                     # root of every model's init, noise and data-order seeds
  encoder_width: int = 2            # hidden units of the base encoder (8h + 4 parameters)
  embed_dim: int = 2                # size of the block embeddings e_l
  hypernet_init_std: float = 1e-3   # std of the hypernetwork's W at initialisation (b = 0)
  learning_rate: float = 1e-4       # Adam
  batch_size: int = 32
  max_epochs: int = 1000
  patience: int = 100               # early stopping on the full-data ELBO
  num_samples: int = 1              # Monte Carlo samples S per example in the training ELBO
  num_vae_seeds: int = 10           # Table 2 rows
  num_iavae_seeds: int = 10         # IA-VAEs per VAE
  sweep_widths: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)  # Figure 7
  num_sweep_seeds: int = 3          # VAEs per width in the sweep (the curve is their mean)
  epochs_per_call: int = 10         # epochs per jitted call (progress and checkpoint granularity)
  checkpoint_every: int = 50        # epochs between resume checkpoints

  def validate(self) -> "SyntheticConfig":
    positive = ["num_examples", "encoder_width", "embed_dim", "batch_size", "max_epochs",
                "patience", "num_samples", "num_vae_seeds", "num_iavae_seeds", "num_sweep_seeds",
                "epochs_per_call", "checkpoint_every"]
    for name in positive:
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
    for name in ("sigma", "learning_rate", "hypernet_init_std"):
      if not getattr(self, name) > 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}.")
    for name in ("seed", "data_seed"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name} must be a non-negative integer, got {getattr(self, name)}.")
    if not self.sweep_widths or min(self.sweep_widths) <= 0:
      raise ConfigError(f"--sweep_widths must be positive integers, got {list(self.sweep_widths)}.")
    if self.batch_size > self.num_examples:
      raise ConfigError(f"--batch_size={self.batch_size} exceeds --num_examples="
                        f"{self.num_examples}: no full batch can be formed.")
    return self


def synthetic_full() -> SyntheticConfig:
  """The paper's protocol: 10 VAEs x 10 IA-VAEs, up to 1000 epochs, patience 100."""
  return SyntheticConfig()


def synthetic_quick() -> SyntheticConfig:
  """A reduced protocol for a first look and for tests: same files, well under a minute."""
  return dataclasses.replace(SyntheticConfig(), num_vae_seeds=2, num_iavae_seeds=3, max_epochs=20,
                             patience=10, sweep_widths=(2, 6, 12, 20), num_sweep_seeds=1,
                             checkpoint_every=10)
