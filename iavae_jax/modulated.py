"""Instance-adaptive layers without per-example parameters: the deltas in factored form.

An image design writes block l's delta for example i slice by slice (``blocks.Slicing``, one
slice per input feature) as per-slice codes times a basis, plus an offset that does not depend
on x:
    slices of delta_l(x_i) = codes_l,i @ basis_l,i + offset_l,
    codes [n_l, r_l], basis [r_l, s_l], offset [n_l, s_l]       (``Factors``),
where the codes or the basis carries the example (a leading batch axis) and the other is shared.
mlp and ha: codes = the slices' hidden units (per example), basis = the output layer; paper:
codes = ones, basis = the example's one vector (``hypernets``' ``factors``).

A layer whose output is linear in its kernel, the kernel's input-feature axes contracting with
axes of the layer's input (Dense, DenseGeneral, Conv of any rank), then needs no per-example
kernel. Slice j of the kernel multiplies input feature j, so by linearity
    layer(x_i; K + delta_i) = layer(x_i; K + offset) + layer_nobias(mix(x_i, codes_i); basis),
mix contracting x_i's input features with the codes (n_l -> r_l features) and the basis laid out
as a kernel with r_l input features. With per-example codes that last layer is one layer shared
by the batch; a dense layer [n_in, n_out] costs (n_in + n_out) r per example instead of the
n_in n_out r of forming its delta. With a per-example basis (paper: r = 1) the mix is shared and
the example's kernel acts on the r mixed features through the layer's patches (strided slices
of the padded input), so no per-example convolution is run either. Where mixing into r features
costs more than forming each example's delta (a convolution on few channels under a wide
hypernetwork), each example's whole kernel is formed and applied to the patches instead. Biases and
normalisation scales are vectors: their per-example deltas are formed and added.

``modulated_encode`` runs a batch through a Flax encoder this way: its modules' calls are
intercepted, and each module owning parameters is applied by its rule (``RULES``: Dense,
DenseGeneral, Conv, the project's Conv, BatchNorm on running averages, LayerNorm) or, if it has
none, by the reference path for that call alone (its parameters formed per example, the call
vmapped), so any encoder works. ``adaptive.instance_adaptive_encode`` is the reference path for
the whole encoder; the two agree to float rounding (tests/test_modulated.py).
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import blocks
from iavae_jax.blocks import BlockLayout, PyTree
from iavae_jax.models import encoders

__all__ = ["Factors", "materialize", "concat_factors", "apply_factors", "modulated_encode",
           "iterative_encode", "Rule", "RULES", "linear_rule", "normalization_rule"]


class Factors(NamedTuple):
  """One block's delta for a batch of examples, in factored form (see the module's docstring).

  codes: [n, r], or [B, n, r] when they carry the example; basis: [r, s], or [B, r, s] when it
  carries the example; offset: [n, s], the same for every example (n slices of s numbers).
  """
  codes: jax.Array
  basis: jax.Array
  offset: jax.Array

  def per_example(self) -> jax.Array:
    """codes @ basis: the x-dependent part of every example's slices, [B, n, s]."""
    return jnp.matmul(self.codes, self.basis)

  def slices(self) -> jax.Array:
    """Every example's slices of the block's delta: [B, n, s]."""
    return self.per_example() + self.offset


def materialize(factors: Sequence[Factors], cuts: Sequence[blocks.Slicing],
                layout: BlockLayout) -> PyTree:
  """Every example's deltas, formed: a tree shaped like the encoder's parameters, each leaf with
  a leading batch axis ([B, *shape_l]). The reference path's deltas."""
  return jax.tree.unflatten(layout.treedef, [jax.vmap(cut.assemble)(f.slices())
                                             for f, cut in zip(factors, cuts)])


class _Block(NamedTuple):
  factors: Factors
  cut: blocks.Slicing


# rule(module, call, args, kwargs, own) -> the module's output with every example's deltas
# applied, or None when the rule does not cover this module's configuration (the call then takes
# the reference path). ``own`` maps each parameter the module owns (e.g. "kernel") to its block;
# ``call(*args, **kwargs)`` runs the module with the shared parameters (phi_AVI + offsets).
Rule = Callable[[nn.Module, Callable, tuple, dict, dict[str, _Block]], Any]


def _trailing(delta: jax.Array, ndim: int) -> jax.Array:
  """A per-example delta [B, *shape] broadcast onto an output of rank ndim whose trailing axes
  are ``shape``."""
  return delta.reshape(delta.shape[0], *(1,) * (ndim - delta.ndim), *delta.shape[1:])


def _vector_delta(block: _Block) -> jax.Array:
  """The x-dependent part of a small block's delta (a bias, a scale), formed: [B, *shape]."""
  return jax.vmap(block.cut.assemble)(block.factors.per_example())


def _without_bias(module: nn.Module, kernel: jax.Array, x: jax.Array, **fields) -> jax.Array:
  """``module``'s layer (``fields`` changed) with this kernel and no bias, applied to x."""
  layer = module.clone(parent=None, use_bias=False, **fields)
  return layer.apply({"params": {"kernel": kernel}}, x)


def _as_tuple(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _patches(module: nn.Module, x: jax.Array, window: tuple[int, ...]) -> jax.Array | None:
  """The convolution's patches of x [B, *spatial, C] as strided slices of the padded input:
  [B, *out_spatial, prod(window) C], ordered as the kernel [*window, C, outputs] flattens, so
  patches @ kernel.reshape(-1, outputs) is the layer without its bias. None where the layer
  reads its input otherwise than this covers (input dilation, circular or causal padding,
  extra batch axes): the caller then applies the layer with an identity kernel."""
  rank = len(window)
  if not isinstance(module, (nn.Conv, encoders.Conv)) or x.ndim != rank + 2:
    return None
  strides = _as_tuple(module.strides, rank)
  dilation = _as_tuple(getattr(module, "kernel_dilation", None), rank)
  if _as_tuple(getattr(module, "input_dilation", None), rank) != (1,) * rank:
    return None
  padding = canonicalize_padding(module.padding, rank)   # as nn.Conv reads it
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
    dilated = tuple(d * (k - 1) + 1 for k, d in zip(window, dilation))
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
  out = [(size - d * (k - 1) - 1) // stride + 1
         for size, k, d, stride in zip(x.shape[1:-1], window, dilation, strides)]
  return jnp.concatenate(
      [x[(slice(None),
          *(slice(o * d, o * d + (n - 1) * stride + 1, stride)
            for o, d, n, stride in zip(offset, dilation, out, strides)), slice(None))]
       for offset in np.ndindex(*window)], axis=-1)


def _kernel_correction(module: nn.Module, x: jax.Array, block: _Block,
                       input_axes: Sequence[int], num_outputs: int,
                       shared_kernel: jax.Array) -> tuple[jax.Array, bool]:
  """layer_nobias(x_i; x-dependent part of delta_i) for every example, without a per-example
  layer, by the factored form; or, where that costs more, layer_nobias(x_i; shared_kernel +
  delta_i), each example's kernel formed and applied to the layer's patches, so the shared
  layer need not run. Returns the output and whether it is the latter (the shared kernel in).

  ``input_axes``: the axes of x that the kernel's input-feature axes (``block.cut.input_axes``,
  in order) contract with; the kernel's last ``num_outputs`` axes are the layer's outputs.
  """
  codes, basis = block.factors.codes, block.factors.basis
  cut, rank = block.cut, len(input_axes)
  n, s, r = cut.num_slices, cut.slice_size, codes.shape[-1]
  positions = x.size // (x.shape[0] * n)   # where the layer reads its input (convolutions)
  forming_is_cheaper = n * r * s + positions * n * s < positions * r * (n + s)
  forming = codes.ndim == 3 and basis.ndim == 2 and forming_is_cheaper
  if forming:
    # Mixing n features into r >= about n costs more than forming each example's delta (n r s)
    # and applying it through the layer's patches (positions n s): e.g. a convolution on few
    # channels with a wide hypernetwork. Then each example's whole kernel is formed and applied
    # so, as on the reference path, but with no per-example layer.
    mixed, kernel_cut, basis = x, cut, codes @ basis
  else:
    # The mixed input carries r features on the axis of the last input axis, 1 on the others;
    # the basis becomes a kernel of the same layout.
    shape = list(cut.shape)
    for axis in cut.input_axes:
      shape[axis] = 1
    shape[cut.input_axes[-1]] = r
    kernel_cut = blocks.Slicing(tuple(shape), cut.input_axes)
    moved = jnp.moveaxis(x, input_axes, range(x.ndim - rank, x.ndim))
    rest = moved.shape[:x.ndim - rank]
    flat = moved.reshape(*rest, n)
    mixed = (jnp.einsum("b...n,bnr->b...r", flat, codes) if codes.ndim == 3 else flat @ codes)
    mixed = jnp.moveaxis(mixed.reshape(*rest, *(1,) * (rank - 1), r),
                         range(x.ndim - rank, x.ndim), input_axes)
  if basis.ndim == 2:   # one layer for the batch
    return _without_bias(module, kernel_cut.assemble(basis), mixed), False
  # Each example's kernel on the mixed input: the layer's patches (strided slices, or the layer
  # with an identity kernel), then every example's kernel as a matrix [patch size, outputs].
  outputs = kernel_cut.shape[len(kernel_cut.shape) - num_outputs:]
  patch_size = math.prod(kernel_cut.shape) // math.prod(outputs)
  inputs = kernel_cut.shape[:len(kernel_cut.shape) - num_outputs]
  patches = _patches(module, mixed, inputs[:-1]) if num_outputs == 1 else None
  if patches is None:
    identity = jnp.eye(patch_size, dtype=mixed.dtype).reshape(*inputs, patch_size)
    patches = _without_bias(module, identity, mixed, features=patch_size)
  kernels = jax.vmap(kernel_cut.assemble)(basis)
  kernels = (shared_kernel + kernels if forming else kernels).reshape(len(basis), patch_size, -1)
  out = jnp.einsum("b...p,bpo->b...o", patches, kernels)
  return out.reshape(*out.shape[:-1], *outputs), forming


def _contracted_axes(module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...]
                     ) -> tuple[dict[int, int], int] | None:
  """For a linear layer: {kernel axis: the axis of x it contracts with} over the kernel's
  input-feature axes, and the number of output axes; None for a configuration without a rule."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return None
    axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axes = sorted(a % x.ndim for a in axes)   # as Flax lays out the kernel
    return dict(enumerate(axes)), len(kernel_shape) - len(axes)
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1 or module.mask is not None:
      return None
    return {len(kernel_shape) - 2: x.ndim - 1}, 1
  # Dense and the project's Conv: the kernel's second-to-last axis reads x's last.
  return {len(kernel_shape) - 2: x.ndim - 1}, 1


def linear_rule(module: nn.Module, call: Callable, args: tuple, kwargs: dict,
                own: dict[str, _Block]):
  """Dense, DenseGeneral (no batch_dims), Conv of any rank (no feature groups, no mask) and the
  project's Conv: the shared layer, plus the kernel's factored correction, plus each example's
  bias delta."""
  if "kernel" not in own or set(own) - {"kernel", "bias"}:
    return None
  x, kernel = args[0], own["kernel"]
  contracted = _contracted_axes(module, x, kernel.cut.shape)
  if contracted is None:
    return None
  axes, num_outputs = contracted
  if not kernel.cut.input_axes or any(a not in axes for a in kernel.cut.input_axes):
    return None   # a kernel sliced along axes that do not read input features
  shared = module.variables["params"]
  out, complete = _kernel_correction(module, x, kernel, [axes[a] for a in kernel.cut.input_axes],
                                     num_outputs, shared["kernel"])
  if not complete:
    out = call(*args, **kwargs) + out
  elif "bias" in shared:
    out = out + shared["bias"]
  if "bias" in own:
    out = out + _trailing(_vector_delta(own["bias"]), out.ndim)
  return out


def normalization_rule(module: nn.Module, call: Callable, args: tuple, kwargs: dict,
                       own: dict[str, _Block]):
  """BatchNorm on its running averages and LayerNorm, both over the last axis: the shared layer,
  plus the normalised input times each example's scale delta, plus its bias delta."""
  x = args[0]
  if set(own) - {"scale", "bias"} or kwargs.get("mask") is not None:
    return None
  if any(block.cut.shape != (x.shape[-1],) for block in own.values()):
    return None   # scale and bias over other axes than the last
  variables = {k: v for k, v in module.variables.items() if k != "params"}
  if isinstance(module, nn.BatchNorm):
    running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if not nn.merge_param("use_running_average", module.use_running_average, running):
      return None   # batch statistics: every example is its own batch on the reference path
    if module.axis not in (-1, x.ndim - 1):
      return None
  elif tuple(np.atleast_1d(module.feature_axes) % x.ndim) != (x.ndim - 1,):
    return None
  out = call(*args, **kwargs)
  if "scale" in own:
    normalized = module.clone(parent=None, use_scale=False, use_bias=False).apply(
        variables, *args, **kwargs)
    out = out + normalized * _trailing(_vector_delta(own["scale"]), out.ndim)
  if "bias" in own:
    out = out + _trailing(_vector_delta(own["bias"]), out.ndim)
  return out


# Module classes -> their rule, matched along the module's class hierarchy (nn.Conv covers every
# spatial rank). A user may pass ``rules`` with more.
RULES: dict[type, Rule] = {
    nn.Dense: linear_rule,
    nn.DenseGeneral: linear_rule,
    nn.Conv: linear_rule,
    encoders.Conv: linear_rule,
    nn.BatchNorm: normalization_rule,
    nn.LayerNorm: normalization_rule,
}


def _rule_for(module: nn.Module, rules: dict[type, Rule]) -> Rule | None:
  for cls in type(module).__mro__:
    if cls in rules:
      return rules[cls]
  return None


@dataclasses.dataclass
class _Interceptor:
  """Applies every example's deltas to the modules of one encoder call (see modulated_encode)."""
  blocks_by_path: dict[str, _Block]   # every adapted block, by its path in the parameter tree
  batch: int
  rules: dict[type, Rule]
  busy: bool = False                   # inside a module already being handled

  def __call__(self, call, args, kwargs, context):
    module = context.module
    if self.busy or context.method_name == "setup":
      return call(*args, **kwargs)
    prefix = "/".join(module.path)
    own = {path[len(prefix) + 1 if prefix else 0:]: block
           for path, block in self.blocks_by_path.items() if _parent(path) == prefix}
    if not own:   # its parameters (if any) are its submodules'
      return call(*args, **kwargs)
    x = args[0] if args else None
    if not isinstance(x, jax.Array) or x.ndim == 0 or x.shape[0] != self.batch:
      raise ValueError(
          f"modulated_encode: the module at {prefix or 'the root'!r} ({type(module).__name__}) "
          f"was called on {getattr(x, 'shape', type(x).__name__)}, whose leading axis is not "
          f"the batch of {self.batch} examples; every module owning parameters must take the "
          "examples along its first argument's leading axis. For this encoder use "
          "adaptive.instance_adaptive_encode.")
    self.busy = True
    try:
      # A rule covers a layer's own __call__; another method, a module whose submodules own
      # parameters too, or a configuration the rule declines takes the reference path.
      rule = _rule_for(module, self.rules) if context.method_name == "__call__" else None
      has_children = any(path.startswith(prefix + "/" if prefix else "") and _parent(path) != prefix
                         for path in self.blocks_by_path)
      out = None if rule is None or has_children else rule(module, call, args, kwargs, own)
      return out if out is not None else self._reference(module, context.method_name, args,
                                                         kwargs, prefix)
    finally:
      self.busy = False

  def _reference(self, module: nn.Module, method: str, args: tuple, kwargs: dict, prefix: str):
    """The module's ``method`` with its parameters formed per example and vmapped over the batch
    (its first argument's leading axis; the other arguments are the same for every example)."""
    variables = dict(module.variables)

    def per_example(path, shared):   # a block the hypernetwork does not adapt stays shared
      block = self.blocks_by_path.get(_join(prefix, jax.tree_util.keystr(path, simple=True,
                                                                          separator="/")))
      if block is None:
        return jnp.broadcast_to(shared, (self.batch, *shared.shape))
      return shared + jax.vmap(block.cut.assemble)(block.factors.per_example())
    params = jax.tree_util.tree_map_with_path(per_example, variables.pop("params"))
    layer = module.clone(parent=None)

    def one(params_i, x_i):
      out = layer.apply({**variables, "params": params_i}, x_i[None], *args[1:], method=method,
                        **kwargs)
      return jax.tree.map(lambda a: a[0], out)
    return jax.vmap(one)(params, args[0])


def _parent(path: str) -> str:
  return path.rpartition("/")[0]


def _join(prefix: str, path: str) -> str:
  return f"{prefix}/{path}" if prefix else path


def concat_factors(first: Factors, second: Factors) -> Factors:
  """The factors of the sum of two deltas of one block: the codes and bases side by side (rank
  r_1 + r_2), the offsets added. A part that carries the example in one and not in the other is
  broadcast over the batch."""
  batch = next((a.shape[0] for a in (first.codes, first.basis, second.codes, second.basis)
                if a.ndim == 3), None)

  def side_by_side(a, b, axis):
    if a.ndim != b.ndim:
      a, b = (jnp.broadcast_to(t, (batch, *t.shape[-2:])) for t in (a, b))
    return jnp.concatenate([a, b], axis=axis)
  return Factors(side_by_side(first.codes, second.codes, -1),
                 side_by_side(first.basis, second.basis, -2), first.offset + second.offset)


def apply_factors(encoder_apply: Callable[[PyTree, jax.Array], Any], phi_avi: PyTree,
                  factors: Sequence[Factors], cuts: Sequence[blocks.Slicing], x: jax.Array,
                  rules: dict[type, Rule] | None = None, layout: BlockLayout | None = None):
  """encoder_apply on x [B, ...] with every example's parameters phi_AVI + (its deltas, given
  as ``factors``, one per block of ``layout`` in its order, cut as ``cuts``), none of them
  formed. layout: the blocks adapted, phi_avi's or a ``blocks.select`` of it (None: every block
  of phi_avi); the others keep phi_AVI's value. See ``modulated_encode``."""
  layout = BlockLayout.from_tree(phi_avi) if layout is None else layout
  layout.check_within("apply_factors", phi_avi)
  if len(factors) != layout.num_blocks or len(cuts) != layout.num_blocks:
    raise ValueError(f"apply_factors: {layout.num_blocks} blocks are adapted, but "
                     f"{len(factors)} factors and {len(cuts)} cuts were given; give one of each "
                     "per block, in the order of the layout's paths.")
  adapted = {path: _Block(f, cut) for path, f, cut in zip(layout.paths, factors, cuts)}
  shared = layout.add_to(phi_avi, [cut.assemble(f.offset) for f, cut in zip(factors, cuts)])
  interceptor = _Interceptor(adapted, x.shape[0], RULES if rules is None else rules)
  with nn.intercept_methods(interceptor):
    return encoder_apply(shared, x)


def _check_hypernet(owner: str, hypernet: nn.Module, phi_avi: PyTree):
  if not hasattr(hypernet, "factors"):
    raise ValueError(f"{owner}: the hypernet ({type(hypernet).__name__}) gives no factored "
                     "deltas (a `factors` method: the image designs of hypernets.make_hypernet "
                     "do); apply it with adaptive.instance_adaptive_encode instead.")
  hypernet.layout.check_within(owner, phi_avi)


def _check_context(owner: str, contexts: jax.Array, batch: int, name: str = "context"):
  if contexts.ndim != 2 or contexts.shape[0] != batch:
    raise ValueError(f"{owner}: {name} must be [B, m] with B = {batch} (x's leading axis), got "
                     f"{contexts.shape}.")


def modulated_encode(encoder_apply: Callable[[PyTree, jax.Array], Any], hypernet: nn.Module,
                     phi_avi: PyTree, psi: PyTree, x: jax.Array,
                     context: jax.Array | None = None,
                     rules: dict[type, Rule] | None = None):
  """Encode a batch x [B, ...], each example with its own parameters phi_AVI + h(c_i; psi),
  without forming them (see the module's docstring).

  encoder_apply(phi, x): the Flax encoder on a batch with parameters phi, e.g.
  ``lambda phi, x: encoder.apply({"params": phi, "batch_stats": stats}, x, train=False)``; its
  modules must take the examples along their input's leading axis, and no collection may be
  mutable. hypernet: a design with ``factors`` (``hypernets.make_hypernet``, or a
  ``hypernets.ProjectedContext`` of one) over phi_avi's layout, or over a ``blocks.select`` of
  it to adapt those blocks alone; psi its parameters. context
  [B, m]: what the hypernetwork sees of each example (x itself, flattened, when None). rules:
  module class -> ``Rule`` (default ``RULES``).
  Returns what encoder_apply returns: the same, to float rounding, as
  ``adaptive.instance_adaptive_encode`` with the encoder applied to one example's parameters.
  """
  _check_hypernet("modulated_encode", hypernet, phi_avi)
  contexts = x.reshape(x.shape[0], -1) if context is None else context
  _check_context("modulated_encode", contexts, x.shape[0])
  factors = hypernet.apply({"params": psi}, contexts, method="factors")
  return apply_factors(encoder_apply, phi_avi, factors, hypernet.cuts, x, rules, hypernet.layout)


def iterative_encode(encoder_apply: Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]],
                     hypernet: nn.Module, phi_avi: PyTree, psi: PyTree, x: jax.Array,
                     context_fn: Callable[[int, jax.Array, jax.Array], jax.Array],
                     num_passes: int = 1, rules: dict[type, Rule] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Instance adaptation in ``num_passes`` passes, each seeing the encoder's current output.

  lambda_0 = (mean_0, log_var_0) = encoder_apply(phi_avi, x); then for t = 1 .. T:
      c_t = context_fn(t, mean_{t-1}, log_var_{t-1})         [B, m] (no gradient flows into it)
      phi_t(x_i) = phi_{t-1}(x_i) + h(c_t,i; psi),   lambda_t = encoder(phi_t(x_i), x_i),
  so every pass adds a delta to the example's parameters (phi_0 = phi_AVI), none of them formed
  (``apply_factors`` of the passes' factors side by side: ``concat_factors``). context_fn
  builds the hypernetwork's input from the current guess, e.g. x's feature with the decoder's
  feedback at it (``iavae_jax.feedback``). encoder_apply must return (mean, log_var) [B, k].
  Returns (mean_T, log_var_T).
  """
  _check_hypernet("iterative_encode", hypernet, phi_avi)
  if num_passes < 1:
    raise ValueError(f"iterative_encode: num_passes must be at least 1, got {num_passes}.")
  mean, log_var = encoder_apply(phi_avi, x)
  factors = None
  for t in range(1, num_passes + 1):
    contexts = jax.lax.stop_gradient(context_fn(t, mean, log_var))
    _check_context("iterative_encode", contexts, x.shape[0], f"context_fn({t}, mean, log_var)")
    new = hypernet.apply({"params": psi}, contexts, method="factors")
    factors = new if factors is None else tuple(map(concat_factors, factors, new))
    mean, log_var = apply_factors(encoder_apply, phi_avi, factors, hypernet.cuts, x, rules,
                                  hypernet.layout)
  return mean, log_var
