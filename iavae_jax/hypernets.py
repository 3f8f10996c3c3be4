"""Hypernetworks that emit per-block deltas for a frozen encoder's parameter tree.

``LinearHypernet`` is the synthetic experiment's (paper section 4.1). The image designs cut every
block into slices, one per input feature (``blocks.slicings``), and differ in how a slice's delta
depends on the example's context c [m] (what the hypernetwork sees of x):
  paper  ``StructuredHypernet``: the paper's section 4.2, linear in [c; e_l; e_in_j];
  ha     ``HaHypernet``: Ha et al.'s static hypernetwork, a first layer per slice index;
  mlp    ``MLPHypernet``: a one-hidden-layer generator on [c; e_l; e_in_j].
``make_hypernet`` builds one by name, ``num_params`` counts its parameters, and
``ProjectedContext`` puts one on a learned projection of the context.
"""

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iavae_jax import blocks, modulated
from iavae_jax.blocks import BlockLayout, PyTree
from iavae_jax.hparams import DESIGNS

__all__ = ["InputAxes", "LinearHypernet", "linear_hypernet_deltas_examples_last",
           "StructuredHypernet", "HaHypernet", "MLPHypernet", "ProjectedContext", "HYPERNETS",
           "make_hypernet", "num_params"]

# Per-block input-feature axes by block path (see ``blocks.slicings``); None: Flax's layout.
InputAxes = Mapping[str, Sequence[int]] | None


def _check_example(module: nn.Module, c: jax.Array):
  if c.ndim != 1:
    raise ValueError(f"{type(module).__name__}: expected one example's input of shape [m], got "
                     f"{c.shape}; flatten it and vmap over the batch (see iavae_jax.adaptive).")


def _one_example(module: nn.Module, c: jax.Array) -> PyTree:
  """A design's deltas for one example's context c [m], formed from its factors."""
  _check_example(module, c)
  deltas = modulated.materialize(module.factors(c[None]), module.cuts, module.layout)
  return jax.tree.map(lambda delta: delta[0], deltas)


class _Hypernet(nn.Module):
  """What every hypernetwork has: the layout of the blocks it emits deltas for."""
  layout: BlockLayout

  def _check_batch(self, contexts: jax.Array):
    if contexts.ndim != 2:
      raise ValueError(f"{type(self).__name__}.factors: expected a batch of inputs of shape "
                       f"[B, m], got {contexts.shape}.")

  def _block_embeddings(self, dim: int, init: nn.initializers.Initializer) -> jax.Array:
    """e_l for every block: [num_blocks, dim]."""
    return self.param("block_embeddings", init, (self.layout.num_blocks, dim))



def _groups(cuts: tuple[blocks.Slicing, ...]) -> dict[str, tuple[int, int]]:
  """group -> (most slices of a block in it, largest slice in it), groups in sorted order."""
  return {group: (max(c.num_slices for c in cuts if c.group == group),
                  max(c.slice_size for c in cuts if c.group == group))
          for group in sorted({c.group for c in cuts})}


class _SlicedHypernet(_Hypernet):
  """What the image designs share: block embeddings e_l, output layers at N(0, init_std^2), and
  the blocks cut into slices along their input-feature axes (``input_axes``: see
  ``blocks.slicings``).

  Each design computes its deltas for a batch of contexts in factored form, ``factors`` [B, m]
  -> a ``modulated.Factors`` per block (the form ``modulated.modulated_encode`` applies without
  forming them); called on one example's context c [m], a design returns that example's deltas,
  formed: a tree shaped like the encoder's parameters.
  """
  block_embed_dim: int = 16
  init_std: float = 1e-5
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
  input_axes: InputAxes = None

  @property
  def cuts(self) -> tuple[blocks.Slicing, ...]:
    """How every block is cut into slices (``blocks.slicings``), in the layout's order."""
    return blocks.slicings(self.layout, self.input_axes)

  def __call__(self, c: jax.Array) -> PyTree:
    return _one_example(self, c)

  def _begin(self, contexts: jax.Array) -> tuple[tuple[blocks.Slicing, ...], jax.Array]:
    """Checks a batch of contexts [B, m]; returns the blocks' slicings and e_l [L, l]."""
    self._check_batch(contexts)
    return self.cuts, self._block_embeddings(self.block_embed_dim, self.embedding_init)


class LinearHypernet(_Hypernet):
  """The synthetic experiment's hypernetwork (paper section 4.1).

  For block l with embedding e_l: h(x, e_l) = W [x; e_l] + b, W: [d_max, d + l], b: [d_max];
  the first d_l outputs, reshaped, are block l's delta. W ~ N(0, init_std^2), b = 0, so at
  initialisation the deltas are ~init_std and the encoder starts at phi_AVI.

  Call on one example x: [d]; returns a tree shaped like the encoder's parameters.
  """
  embed_dim: int = 2
  init_std: float = 1e-3
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> PyTree:
    _check_example(self, x)
    d_max = self.layout.d_max
    block_embeddings = self._block_embeddings(self.embed_dim, self.embedding_init)
    w = self.param("W", nn.initializers.normal(self.init_std),
                   (d_max, x.shape[0] + self.embed_dim))
    b = self.param("b", nn.initializers.zeros, (d_max,))
    # W [x; e_l] + b = W_x x + (W_e e_l + b): the x-part is shared by all blocks, so it is
    # computed once per example rather than once per block (same function, fewer FLOPs).
    w_x, w_e = w[:, :x.shape[0]], w[:, x.shape[0]:]
    rows = (w_x @ x)[None, :] + (block_embeddings @ w_e.T + b)   # [L, d_max]
    return self.layout.unflatten(rows)


def linear_hypernet_deltas_examples_last(psi: PyTree, layout: BlockLayout,
                                         x: jax.Array) -> PyTree:
  """LinearHypernet's deltas for a batch whose examples lie along the last axis.

  psi: a LinearHypernet's parameters; x: [d, B] -> a tree shaped like the encoder's parameters,
  each leaf with a trailing batch axis ([*shape_l, B]), equal (up to float rounding) to vmapping
  ``LinearHypernet.apply`` over the examples: block l's delta is (W_x x + W_e e_l + b)[:d_l], the
  x-part once per example and the rest once per call, every product summed over its few inputs
  (no matmul). For training populations on CPU, with ``mlp_encode_examples_last``.
  """
  d = x.shape[0]
  w_x, w_e = psi["W"][:, :d], psi["W"][:, d:]
  x_part = jnp.sum(w_x[:, :, None] * x, axis=1)   # [d_max, B]
  shared = jnp.sum(psi["block_embeddings"][:, None, :] * w_e, axis=-1) + psi["b"]  # [L, d_max]
  leaves = [(x_part[:size] + shared[l, :size, None]).reshape(*shape, -1)
            for l, (size, shape) in enumerate(zip(layout.sizes, layout.shapes))]
  return jax.tree.unflatten(layout.treedef, leaves)


class StructuredHypernet(_SlicedHypernet):
  """The image experiments' hypernetwork (paper section 4.2): design "paper".

  Every block is cut into slices (``blocks.Slicing``); slice j of block l gets
      delta_{l,j} = (W_g [c; e_l; e_in_{g,j}] + b_g)[:d_l],
  with one output layer (W_g, b_g) per group g in {conv, dense}: W_g: [d_max_g, m + l + n], where
  d_max_g is the largest slice in the group. e_l (size ``block_embed_dim``, paper 16) is block l's
  embedding; e_in_{g,j} (size ``input_embed_dim``, paper 8) is the embedding of input index j,
  shared by the group's blocks. W_g ~ N(0, init_std^2), b_g = 0 (Proposition 1: the deltas start
  at ~init_std). Biases and batch-norm scales/offsets are blocks too (one slice each).

  init_std defaults to 1e-5, not the paper's 1e-3: the x-part of every conv slice's delta is the
  same vector, so it adds up over the input channels, and at 1e-3 the image encoder's mean moved
  by ~1,500x its norm at initialisation (paper architecture); at 1e-5, by ~0.07x.

  As in LinearHypernet, W_g [c; e_l; e_in_j] is computed as W_x c + W_e e_l + W_in e_in_j: the
  c-part once per example, the rest once per call (vmap leaves it unbatched). So the
  x-dependent part of the delta, W_x c, is one vector per group: every slice of every block of
  the group gets its first d_l numbers.

  Call on one example's context c: [m] (for images, a row of ``adaptive.normalized_context``);
  returns a tree shaped like the encoder's parameters. ``input_axes`` names a block's
  input-feature axes where Flax's layout does not (``blocks.slicings``).
  """
  input_embed_dim: int = 8

  @nn.compact
  def factors(self, contexts: jax.Array) -> tuple[modulated.Factors, ...]:
    """contexts [B, m] -> per block: codes = ones [n_l, 1], basis = (W_x c + b + W_e e_l)[:d_l]
    [B, 1, d_l] (the example's one vector), offset = (W_in e_in_j)[:d_l] [n_l, d_l]."""
    cuts, block_embeddings = self._begin(contexts)
    m, l = contexts.shape[1], self.block_embed_dim
    out = {}
    for group, (n_max, d_max) in _groups(cuts).items():
      w = self.param(f"W_{group}", nn.initializers.normal(self.init_std),
                     (d_max, m + l + self.input_embed_dim))
      b = self.param(f"b_{group}", nn.initializers.zeros, (d_max,))
      input_embeddings = self.param(f"input_embeddings_{group}", self.embedding_init,
                                    (n_max, self.input_embed_dim))
      w_x, w_e, w_in = w[:, :m], w[:, m:m + l], w[:, m + l:]
      out[group] = (contexts @ w_x.T + b, block_embeddings @ w_e.T, input_embeddings @ w_in.T)
    factors = []
    for index, cut in enumerate(cuts):
      x_part, block_part, input_part = out[cut.group]
      n, d = cut.num_slices, cut.slice_size
      factors.append(modulated.Factors(jnp.ones((n, 1), x_part.dtype),
                                       (x_part[:, :d] + block_part[index, :d])[:, None, :],
                                       input_part[:n, :d]))
    return tuple(factors)


class HaHypernet(_SlicedHypernet):
  """Ha et al.'s static hypernetwork (HyperNetworks, 2016, section 3.1) on [c; e_l]: design "ha".

  Slice j of block l, in group g (``blocks.Slicing``), gets a code of ``hidden_dim`` numbers and
  then its delta:
      a_{l,j} = W_{g,j} [c; e_l] + B_{g,j},        W_{g,j}: [hidden_dim, m + l] (``W_g[j]``),
      delta_{l,j} = (W_out,g a_{l,j} + b_out,g)[:d_l],   W_out,g: [d_max_g, hidden_dim].
  As in Ha et al., the first layer (W_{g,j}, B_{g,j}) is one per slice index j, shared by every
  block of the group (a block enters only through its embedding e_l), and the output layer is
  shared by all slices and blocks of the group (one per group, as slice sizes differ).
  Initialisation: W_{g,j} ~ N(0, 1 / (m + l)), B = 0, e_l ~ ``embedding_init``; W_out,g ~
  N(0, init_std^2), b_out,g = 0, so the deltas start near 0 (Proposition 1).

  The x-dependent part of delta_{l,j} is W_out,g W_{g,j,c} c: different for every slice index j,
  the same for every block of the group at a given j. W_{g,j,c} c is computed once per example
  for every j, its product with W_out,g per block (sum_l n_l d_l hidden_dim multiply-adds; on
  CPU faster than one [n_max_g, d_max_g] product per group cut to each block, whose gradient
  sums the blocks' padded cuts); the rest, W_out,g (W_{g,j,e} e_l + B_{g,j}) + b_out,g, once per
  call (vmap leaves it unbatched).

  ``block_gains`` (not in Ha et al.'s static form) scales block l's code by its own gains
  s_l [hidden_dim] (initialised to 1): a_{l,j} = s_l * (W_{g,j,c} c) + W_{g,j,e} e_l + B_{g,j}, so
  the x-dependent part W_out,g diag(s_l) W_{g,j,c} c differs across blocks too: a multiplicative
  block-input interaction like the weight scaling of Ha et al.'s dynamic hypernetworks.

  Call on one example's context c: [m]; returns a tree shaped like the encoder's parameters.
  """
  hidden_dim: int = 16
  block_gains: bool = False

  @nn.compact
  def factors(self, contexts: jax.Array) -> tuple[modulated.Factors, ...]:
    """contexts [B, m] -> per block: codes = s_l * (W_{g,j,c} c) [B, n_l, hidden_dim], basis =
    W_out,g[:d_l]^T [hidden_dim, d_l], offset = W_out,g (W_{g,j,e} e_l + B_{g,j}) + b_out,g."""
    cuts, block_embeddings = self._begin(contexts)
    gains = (self.param("block_gains", nn.initializers.ones,
                        (self.layout.num_blocks, self.hidden_dim)) if self.block_gains else None)
    m, l = contexts.shape[1], self.block_embed_dim
    first_layer_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-1,
                                                        out_axis=-2, batch_axis=0)
    layers = {}
    for group, (n_max, d_max) in _groups(cuts).items():
      w = self.param(f"W_{group}", first_layer_init, (n_max, self.hidden_dim, m + l))
      b = self.param(f"B_{group}", nn.initializers.zeros, (n_max, self.hidden_dim))
      w_out = self.param(f"W_out_{group}", nn.initializers.normal(self.init_std),
                         (d_max, self.hidden_dim))
      b_out = self.param(f"b_out_{group}", nn.initializers.zeros, (d_max,))
      code_x = jnp.einsum("jhm,bm->bjh", w[..., :m], contexts)   # W_{g,j,c} c, every j
      layers[group] = (code_x, w[..., m:], b, w_out, b_out)
    factors = []
    for index, cut in enumerate(cuts):
      code_x, w_e, b, w_out, b_out = layers[cut.group]
      n, d = cut.num_slices, cut.slice_size
      code_x = code_x[:, :n] if gains is None else code_x[:, :n] * gains[index]
      code_e = w_e[:n] @ block_embeddings[index] + b[:n]       # [n, hidden_dim], x-independent
      factors.append(modulated.Factors(code_x, w_out[:d].T, code_e @ w_out[:d].T + b_out[:d]))
    return tuple(factors)


class MLPHypernet(_SlicedHypernet):
  """A nonlinear generator: design "mlp".

  Slice j of block l, in group g (``blocks.Slicing``), gets
      delta_{l,j} = (W_out,g act(U [c; e_l; e_in_{g,j}] + b) + b_out,g)[:d_l],
  U: [hidden_dim, m + l + n] and b shared by every group; e_in_{g,j} (size ``input_embed_dim``)
  the embedding of input index j in group g; W_out,g: [d_max_g, hidden_dim] one per group.
  Initialisation: U ~ N(0, 1 / (m + l + n)), b = 0, embeddings ~ ``embedding_init``; W_out,g ~
  N(0, init_std^2), b_out,g = 0, so the deltas start near 0 (Proposition 1).

  Through the nonlinearity, the x-dependent part of delta_{l,j} differs across blocks and slices.
  U [c; e_l; e_in_j] is computed as U_c c (once per example) + U_e e_l + U_in e_in_j (once per
  call); block l's hidden units [B, n_l, hidden_dim] are its codes (``factors``), recomputed in
  the backward pass rather than stored, and its output layer its basis, so an example costs
  m hidden_dim multiply-adds and S hidden_dim activations (S = sum_l n_l), and forming its deltas
  sum_l n_l d_l hidden_dim more (the modulated path does not form them).

  Call on one example's context c: [m]; returns a tree shaped like the encoder's parameters.
  """
  input_embed_dim: int = 8
  hidden_dim: int = 64
  activation: Callable[[jax.Array], jax.Array] = nn.gelu

  @nn.compact
  def factors(self, contexts: jax.Array) -> tuple[modulated.Factors, ...]:
    """contexts [B, m] -> per block: codes = the slices' hidden units [B, n_l, hidden_dim],
    basis = W_out,g[:d_l]^T [hidden_dim, d_l], offset = b_out,g[:d_l] on every slice."""
    cuts, block_embeddings = self._begin(contexts)
    m, l = contexts.shape[1], self.block_embed_dim
    u = self.param("U", nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-1,
                                                         out_axis=-2),
                   (self.hidden_dim, m + l + self.input_embed_dim))
    b = self.param("b", nn.initializers.zeros, (self.hidden_dim,))
    u_c, u_e, u_in = u[:, :m], u[:, m:m + l], u[:, m + l:]
    block_part = block_embeddings @ u_e.T                        # [L, hidden_dim]
    layers = {}
    for group, (n_max, d_max) in _groups(cuts).items():
      input_embeddings = self.param(f"input_embeddings_{group}", self.embedding_init,
                                    (n_max, self.input_embed_dim))
      w_out = self.param(f"W_out_{group}", nn.initializers.normal(self.init_std),
                         (d_max, self.hidden_dim))
      b_out = self.param(f"b_out_{group}", nn.initializers.zeros, (d_max,))
      layers[group] = (input_embeddings @ u_in.T, w_out, b_out)
    pre_c = (contexts @ u_c.T + b)[:, None, :]                   # [B, 1, hidden_dim]
    factors = []
    for index, cut in enumerate(cuts):
      input_part, w_out, b_out = layers[cut.group]
      n, d = cut.num_slices, cut.slice_size
      # Recomputed in the backward pass rather than stored: [B, n, hidden_dim] per block.
      hidden = jax.checkpoint(self.activation)(block_part[index] + input_part[:n] + pre_c)
      factors.append(modulated.Factors(hidden, w_out[:d].T, jnp.broadcast_to(b_out[:d], (n, d))))
    return tuple(factors)


class ProjectedContext(nn.Module):
  """``hypernet`` on a learned linear projection of the context: c [m] -> hypernet(P c).

  P: [dim, m] (N(0, 1 / m) at initialisation) is trained with the hypernetwork: a small learned
  feature of x for designs whose size grows with m (ha's first layers hold n_max_g x hidden_dim
  x m numbers per group). The parameters are {"projection": {"kernel": P^T}, "hypernet": ...}.
  """
  hypernet: nn.Module
  dim: int

  @property
  def layout(self) -> BlockLayout:
    return self.hypernet.layout

  @property
  def cuts(self) -> tuple[blocks.Slicing, ...]:
    return self.hypernet.cuts

  def __call__(self, c: jax.Array) -> PyTree:
    return _one_example(self, c)

  @nn.compact
  def factors(self, contexts: jax.Array) -> tuple[modulated.Factors, ...]:
    """contexts [B, m] -> the design's factors on [B, dim]."""
    return self.hypernet.factors(nn.Dense(self.dim, use_bias=False, name="projection")(contexts))


# The designs by name (hparams.DESIGNS, in its order).
HYPERNETS = dict(zip(DESIGNS, (StructuredHypernet, HaHypernet, MLPHypernet)))


def make_hypernet(name: str, layout: BlockLayout, **fields) -> nn.Module:
  """The image hypernetwork design ``name`` (a key of HYPERNETS) for ``layout``.

  ``fields`` set the design's own fields (e.g. init_std=1e-5, hidden_dim=64; see its class);
  the others keep their defaults.
  """
  if name not in HYPERNETS:
    raise ValueError(f"make_hypernet: name={name!r} is not a design; choose one of "
                     f"{', '.join(HYPERNETS)}.")
  design = HYPERNETS[name]
  known = {f.name for f in dataclasses.fields(design)} - {"layout", "parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"make_hypernet: the {name!r} design has no field {', '.join(unknown)}; its "
                     f"fields are {', '.join(sorted(known))}.")
  return design(layout, **fields)


def num_params(hypernet: nn.Module, context_size: int) -> int:
  """How many parameters ``hypernet`` has for contexts of ``context_size`` numbers (from the
  shapes alone: nothing is initialised)."""
  shapes = jax.eval_shape(hypernet.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((context_size,), jnp.float32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
