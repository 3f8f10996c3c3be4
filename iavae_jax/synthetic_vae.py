"""The paper's synthetic IA-VAE (section 4.1): the oracle model's VAE and IA-VAE encoders, what
the hypernetwork sees, and the training epoch of a population of either, configured by
``hparams.SyntheticVAEConfig``.

The decoder is the known truth (``models.oracle``), so the ELBO is exact in closed form: it is
the monitored score, while the gradient is the Monte Carlo ELBO's, as the paper trains.
Every encode function comes in two layouts: one example at a time (``EncodeFn``: Flax modules,
vmapped; evaluation uses these) and examples along the last axis (``TrainEncodeFn``: how the
populations train, several times faster on CPU).

    config = hparams.SyntheticVAEConfig().validate()
    epoch_fn, optimizer = synthetic_vae.population_epoch_fn(config,
                                                            synthetic_vae.vae_train_encode)
    # one model's epoch: epoch_fn(state, x [3, N], order); training.train_population for many
"""

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iavae_jax import adaptive, blocks, feedback, hypernets, objectives, training
from iavae_jax import parallel as parallel_lib
from iavae_jax.hparams import SyntheticVAEConfig
from iavae_jax.models import encoders, oracle

__all__ = ["LOOP_EMITTERS", "vae_encode", "vae_train_encode", "hypernet_context",
           "feedback_context", "context_size", "decoder_passes", "iavae_encode",
           "iavae_train_encode", "init_vaes", "IAVAEs", "init_iavaes", "param_counts",
           "exact_score", "train_step", "population_epoch_fn"]

# Whether a population's epoch compiles with XLA:CPU's loop emitters
# (training.cpu_compiler_options): faster for the IA-VAEs' epochs, slower for the VAEs'
# (benchmarks/synthetic_step.py; docs/devices.md).
LOOP_EMITTERS = {"vae": False, "iavae": True}
# encode(params, frozen, x [B, 3]) -> (mean [B, 2], log_var [B, 2]): the models as the paper
# defines them, one example at a time (Flax modules, vmapped); evaluation uses these.
EncodeFn = Callable
# The same functions on examples along the last axis, x [3, B] -> (mean [2, B], log_var [2, B]):
# how the populations train, several times faster on CPU (see encoders.mlp_encode_examples_last).
TrainEncodeFn = Callable


def vae_encode(width: int) -> EncodeFn:
  encoder = encoders.MLPEncoder(width)
  return lambda phi, unused_frozen, x: encoder.apply({"params": phi}, x)


def vae_train_encode(phi, unused_frozen, x):
  return encoders.mlp_encode_examples_last(phi, x)


def hypernet_context(config: SyntheticVAEConfig, train_x) -> Callable | None:
  """What the hypernetwork sees of x [..., 3] (config.hypernet_input): None for x itself (the
  paper), else a function of x that is bounded, so a delta is bounded however far x lies from
  the training data. With m and s the training data's mean and std per coordinate:
    "tanh":     tanh((x - m) / s), in (-1, 1);
    "softclip": m + 3 s tanh((x - m) / (3 s)), x itself within about a std of m (1% off at
                0.5 s, 4% at s), then bounded by m +- 3 s: the paper's input in the bulk."""
  if config.hypernet_input in ("x",) + feedback.FEEDBACKS:
    return None
  train_x = np.asarray(train_x, np.float64)
  shift, scale = train_x.mean(0).astype(np.float32), train_x.std(0).astype(np.float32)
  if config.hypernet_input == "tanh":
    return lambda x: jnp.tanh((x - shift) / scale)
  return lambda x: shift + 3 * scale * jnp.tanh((x - shift) / (3 * scale))


def feedback_context(config: SyntheticVAEConfig) -> Callable | None:
  """With a feedback input, context(x [B, 3], mean [B, 2], log_var [B, 2]) -> [B, m]: x, the
  current guess and the true decoder's feedback on it (iavae_jax.feedback.context):
    "gradient": the exact ELBO's gradient in (mean, log_var), preprocessed (m = 15);
    "residual": x - f(mean) (m = 10).
  None for the other inputs."""
  if config.hypernet_input == "gradient":
    def value(x, mean, log_var):
      total = lambda m, v: jnp.sum(oracle.exact_elbo(x, m, v, config.sigma))
      grads = jax.grad(total, argnums=(0, 1))(mean, log_var)
      return feedback.preprocess_gradient(jnp.concatenate(grads, axis=-1))
  elif config.hypernet_input == "residual":
    value = lambda x, mean, log_var: x - oracle.decoder(mean)
  else:
    return None
  return lambda x, mean, log_var: feedback.context(x, mean, log_var, value(x, mean, log_var))


def context_size(config: SyntheticVAEConfig) -> int:
  """The size of what the hypernetwork sees of one example: x, or with feedback [x; mean;
  log_var; the feedback] (the gradient preprocessed to 2 x 2k numbers, the residual d)."""
  feedback_size = {"gradient": 4 * oracle.LATENT_DIM, "residual": oracle.DATA_DIM}
  if config.hypernet_input not in feedback_size:
    return oracle.DATA_DIM
  return oracle.DATA_DIM + 2 * oracle.LATENT_DIM + feedback_size[config.hypernet_input]


def decoder_passes(config: SyntheticVAEConfig) -> int:
  """Per example, the decoder passes of the IA-VAE's inference: its feedback's (the exact ELBO,
  a forward and a backward per pass, counts as one sample's), 0 without."""
  kind = config.hypernet_input if config.hypernet_input in feedback.FEEDBACKS else None
  return feedback.decoder_passes(kind, config.passes, 1)


def iavae_encode(config: SyntheticVAEConfig, layout: blocks.BlockLayout,
                 context: Callable | None = None) -> EncodeFn:
  """IA-VAE inference: the hypernetwork sees context(x) (``hypernet_context``), or x; with a
  feedback input, ``iavae_train_encode``'s passes, on rows."""
  if feedback_context(config) is not None:
    train_encode = iavae_train_encode(layout, feedback=feedback_context(config),
                                      passes=config.passes)
    return lambda psi, phi_avi, x: tuple(a.T for a in train_encode(psi, phi_avi, x.T))
  encoder = encoders.MLPEncoder(config.encoder_width)
  hypernet = hypernets.LinearHypernet(layout, config.embed_dim, config.hypernet_init_std)
  encoder_apply = lambda phi, x: encoder.apply({"params": phi}, x)
  hypernet_apply = lambda psi, x: hypernet.apply({"params": psi}, x)
  return lambda psi, phi_avi, x: adaptive.instance_adaptive_encode(
      encoder_apply, hypernet_apply, phi_avi, psi, x, None if context is None else context(x))


def iavae_train_encode(layout: blocks.BlockLayout, context: Callable | None = None,
                       feedback: Callable | None = None, passes: int = 1) -> TrainEncodeFn:
  """iavae_encode's function on examples along the last axis. With ``feedback``
  (``feedback_context``): from the VAE's output, ``passes`` passes, each adding the deltas of
  the hypernetwork on feedback(x, current guess) to every example's parameters (no gradient
  flowing into that input)."""
  def modulated(psi, phi_avi, deltas, c):
    new = hypernets.linear_hypernet_deltas_examples_last(psi, layout, c)
    return new if deltas is None else jax.tree.map(jnp.add, deltas, new)

  def encode(psi, phi_avi, x):
    if feedback is None:
      deltas = modulated(psi, phi_avi, None, x if context is None else context(x.T).T)
      return encoders.mlp_encode_examples_last(adaptive.modulate_examples_last(phi_avi, deltas),
                                               x)
    mean, log_var = encoders.mlp_encode_examples_last(phi_avi, x)
    deltas = None
    for _ in range(passes):
      c = jax.lax.stop_gradient(feedback(x.T, mean.T, log_var.T)).T
      deltas = modulated(psi, phi_avi, deltas, c)
      mean, log_var = encoders.mlp_encode_examples_last(
          adaptive.modulate_examples_last(phi_avi, deltas), x)
    return mean, log_var
  return encode


def init_vaes(keys: jax.Array, widths: Sequence[int], x0: jax.Array) -> dict:
  """The initial encoders of VAEs, one per key [M, 2], stacked along a leading axis: all of
  ``widths[0]`` if it is the only width, else of the width of their index in ``widths``, each
  zero-padded to the widest (``encoders.pad_hidden``) so that they train side by side. x0 [3]:
  an example."""
  if len(widths) == 1:
    encoder = encoders.MLPEncoder(widths[0])
    return jax.vmap(lambda k: encoder.init(k, x0)["params"])(keys)
  if len(widths) != keys.shape[0]:
    raise ValueError(f"init_vaes: widths gives {len(widths)} widths for {keys.shape[0]} keys; "
                     "give one width, or one per key.")
  params = [encoders.pad_hidden(encoders.MLPEncoder(w).init(k, x0)["params"], max(widths))
            for w, k in zip(widths, keys)]
  return jax.tree.map(lambda *a: jnp.stack(a), *params)


class IAVAEs(NamedTuple):
  """A population of IA-VAEs on frozen VAE encoders (``init_iavaes``)."""
  layout: blocks.BlockLayout       # the VAE encoder's blocks
  params: dict                     # the hypernetworks' initial parameters, stacked [M, ...]
  frozen: dict                     # each one's frozen encoder phi_AVI, stacked [M, ...]
  train_encode: TrainEncodeFn      # ``iavae_train_encode`` as the config sets it
  encode: EncodeFn                 # ``iavae_encode`` as the config sets it


def init_iavaes(config: SyntheticVAEConfig, phi_avi: dict, keys: jax.Array,
                train_x: jax.Array) -> IAVAEs:
  """``keys.shape[0] / V`` IA-VAEs on each of V VAEs' encoders phi_avi (stacked [V, ...]),
  VAE-major: IA-VAE i sits on VAE i // (M / V). Their hypernetwork's input is configured from
  the training data train_x [N, 3] (``hypernet_context``)."""
  layout = blocks.BlockLayout.from_tree(jax.tree.map(lambda a: a[0], phi_avi))
  hypernet = hypernets.LinearHypernet(layout, config.embed_dim, config.hypernet_init_std)
  psi = jax.vmap(lambda k: hypernet.init(k, jnp.zeros(context_size(config)))["params"])(keys)
  num_vaes = jax.tree.leaves(phi_avi)[0].shape[0]
  if keys.shape[0] % num_vaes:
    raise ValueError(f"init_iavaes: {keys.shape[0]} keys for {num_vaes} VAEs; give the same "
                     "number of IA-VAEs (keys) for every VAE.")
  repeats = keys.shape[0] // num_vaes
  frozen = jax.tree.map(lambda a: jnp.repeat(a, repeats, axis=0), phi_avi)
  context = hypernet_context(config, train_x)
  return IAVAEs(layout, psi, frozen,
                iavae_train_encode(layout, context, feedback_context(config), config.passes),
                iavae_encode(config, layout, context))


def param_counts(config: SyntheticVAEConfig, layout: blocks.BlockLayout) -> dict:
  """Figure 7's parameter counts: {"base_params" (the VAE's encoder), "hypernet_params" (the
  linear hypernetwork's), "embedding_params" (its block embeddings' values, counted apart),
  "iavae_params" (base and hypernetwork)}."""
  hypernet = layout.d_max * (context_size(config) + config.embed_dim) + layout.d_max
  return {"base_params": layout.num_params, "hypernet_params": hypernet,
          "embedding_params": layout.num_blocks * config.embed_dim,
          "iavae_params": layout.num_params + hypernet}


def _rows(examples_last: bool) -> Callable:
  """[features, examples] -> [examples, features] for examples-last arrays, else identity."""
  return (lambda a: a.T) if examples_last else (lambda a: a)


def exact_score(config: SyntheticVAEConfig, encode: TrainEncodeFn,
                examples_last: bool = True) -> training.ScoreFn:
  """The monitored score: score(params, frozen, x [3, N]) -> the exact ELBO, mean over x (an
  EncodeFn and x [N, 3] with ``examples_last=False``)."""
  to_rows = _rows(examples_last)

  def score_fn(params, frozen, x):
    mean, log_var = encode(params, frozen, x)
    return jnp.mean(oracle.exact_elbo(to_rows(x), to_rows(mean), to_rows(log_var), config.sigma))
  return score_fn


def train_step(config: SyntheticVAEConfig, encode: TrainEncodeFn, examples_last: bool = True):
  """A synthetic model's optimiser step and its optimiser, (step, optimizer): Adam at
  config.learning_rate on the negative ELBO of a batch, config.num_samples reparameterised
  samples under the true decoder. step(frozen, (params, opt_state), (x [3, B], eps [S, B, 2]))
  -> ((params, opt_state), training.StepMetrics) (``training.make_step_fn``; an EncodeFn and
  x [B, 3] with ``examples_last=False``)."""
  to_rows = _rows(examples_last)

  def loss_fn(params, frozen, x, eps):
    mean, log_var = encode(params, frozen, x)
    terms = objectives.elbo(eps, to_rows(mean), to_rows(log_var),
                            lambda z: oracle.log_likelihood(to_rows(x), z, config.sigma))
    return -jnp.mean(terms.elbo), jnp.mean(terms.kl)
  optimizer = optax.adam(config.learning_rate)
  return training.make_step_fn(loss_fn, optimizer), optimizer


def population_epoch_fn(config: SyntheticVAEConfig, encode: TrainEncodeFn,
                        parallel: parallel_lib.Parallel | None = None, examples_last: bool = True,
                        compiler_options: dict | None = None):
  """The training epoch and its optimiser, (epoch, optimizer): ``train_step`` scanned over the
  batches (``training.scan_epoch_fn``), the exact ELBO monitored (``exact_score``).

  ``encode`` is a TrainEncodeFn, or an EncodeFn with ``examples_last=False`` (benchmarks and
  tests compare the two). ``compiler_options``: see ``training.scan_epoch_fn``."""
  def noise_fn(key, num_steps, unused_epoch):
    return jax.random.normal(
        key, (num_steps, config.num_samples, config.batch_size, oracle.LATENT_DIM))

  step, optimizer = train_step(config, encode, examples_last)
  schedule = training.Schedule(config.batch_size, config.max_epochs, config.patience)
  return training.scan_epoch_fn(noise_fn, step, exact_score(config, encode, examples_last),
                                schedule, parallel, examples_last, compiler_options), optimizer
