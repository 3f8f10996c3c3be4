"""The instance-adaptive encoder: phi(x) = phi_AVI + h(x; psi), one encoder per example."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from iavae_jax.blocks import BlockLayout, PyTree

__all__ = ["ApplyFn", "modulate", "modulate_examples_last", "adaptive_encoder_params",
           "instance_adaptive_encode", "submodule_input", "normalized_context"]

# apply(params, x) for one example.
ApplyFn = Callable[[PyTree, jax.Array], PyTree]


def modulate(phi_avi: PyTree, deltas: PyTree) -> PyTree:
  """phi_l = phi_AVI,l + delta_l for every block (paper eq. 17). deltas: shaped like phi_avi,
  or like a ``blocks.select`` of it, whose other blocks keep phi_AVI's value."""
  if jax.tree.structure(deltas) == jax.tree.structure(phi_avi):
    return jax.tree.map(jnp.add, phi_avi, deltas)
  selection = BlockLayout.from_tree(deltas)
  selection.check_within("modulate", phi_avi)
  return selection.add_to(phi_avi, jax.tree.leaves(deltas))


def modulate_examples_last(phi_avi: PyTree, deltas: PyTree) -> PyTree:
  """``modulate`` for per-example deltas with a trailing batch axis ([*shape_l, B]): the
  parameters of every example, with the same trailing axis."""
  return jax.tree.map(lambda phi, delta: phi[..., None] + delta, phi_avi, deltas)


def adaptive_encoder_params(hypernet_apply: ApplyFn, phi_avi: PyTree, psi: PyTree,
                            x: jax.Array) -> PyTree:
  """The encoder parameters phi(x; psi) for one example x."""
  return modulate(phi_avi, hypernet_apply(psi, x))


def instance_adaptive_encode(encoder_apply: ApplyFn, hypernet_apply: ApplyFn, phi_avi: PyTree,
                             psi: PyTree, x: jax.Array, context: jax.Array | None = None):
  """Encode a batch x: [B, ...], each example with its own parameters phi(c_i; psi).

  c_i is what the hypernetwork sees of example i: ``context[i]`` (any per-example representation
  of x_i, e.g. a normalised or learned feature of it), or x_i itself when ``context`` is None.
  For images pass ``context=normalized_context(x)``: the raw image makes stage 2 diverge (see
  ``normalized_context``). The per-example call is vmapped; jit the caller (the train step), not
  this function.
  Returns whatever ``encoder_apply`` returns, with a leading batch axis.
  """
  if jnp.ndim(x) == 0 or (context is not None and (
      jnp.ndim(context) == 0 or jnp.shape(context)[0] != jnp.shape(x)[0])):
    raise ValueError(f"instance_adaptive_encode: x and context must share their leading batch "
                     f"axis [B, ...], got {jnp.shape(x)} and "
                     f"{None if context is None else jnp.shape(context)}.")

  def encode_one(x_i, c_i):
    return encoder_apply(adaptive_encoder_params(hypernet_apply, phi_avi, psi, c_i), x_i)
  return jax.vmap(encode_one)(x, x if context is None else context)


def submodule_input(module: nn.Module, variables: PyTree, path: str, *args, **kwargs) -> jax.Array:
  """The input of ``module``'s submodule at ``path`` when ``module.apply(variables, *args,
  **kwargs)`` runs (its first positional argument, at its first call).

  ``path`` is the submodule's names joined by "/", as in the parameter tree. The input of an
  encoder's output layer is its penultimate feature, a learned per-example context for the
  hypernetwork: for the ResNetEncoder, ``submodule_input(encoder, variables, "mean", x,
  train=False)`` is [B, (spatial size) x channels[-1]] (3 x 3 x 64 = 576 on 28 x 28 images).
  """
  captured = []

  def capture(call, call_args, call_kwargs, context):
    if (not captured and context.method_name == "__call__"
        and "/".join(context.module.path) == path):
      captured.append(call_args[0])
    return call(*call_args, **call_kwargs)
  with nn.intercept_methods(capture):
    module.apply(variables, *args, **kwargs)
  if not captured:
    raise ValueError(f"submodule_input: {type(module).__name__} called no submodule at path "
                     f"{path!r}; give its names joined by '/' as in the parameter tree (e.g. "
                     "'mean' or 'Block_0/Dense_1').")
  return captured[0]


def normalized_context(x: jax.Array) -> jax.Array:
  """The hypernetwork's view of images x [B, ...]: [B, m], each example flattened and divided by
  its Euclidean norm (a blank one stays 0).

  With the raw image, one optimiser step on the hypernetwork's input weights moves every delta
  by ~lr x (number of ink pixels), coherently over the conv slices; over its norm the move is
  ~lr x sqrt(ink pixels). The raw image was measured to make stage 2 diverge on Fashion-MNIST.
  """
  flat = x.reshape(x.shape[0], -1)
  norm = jnp.linalg.norm(flat, axis=-1, keepdims=True)
  return flat / jnp.where(norm > 0, norm, 1.0)
