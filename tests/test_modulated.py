"""The modulated path (iavae_jax.modulated): every design's deltas applied without forming any
example's parameters give the reference path's outputs and gradients (each example's
parameters formed, the encoder vmapped), layer kind by layer kind; a layer without a rule, or a
configuration a rule does not cover, falls back to the reference path for its own call;
Proposition 1; the errors."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

from iavae_jax import adaptive, blocks, hypernets, modulated
from iavae_jax.models import encoders

DESIGNS = tuple(hypernets.HYPERNETS)
# Each design's output layer: zero, it makes every delta zero (Proposition 1's psi_0).
OUTPUT_LAYER = {"paper": ("W_", "b_"), "ha": ("W_out_", "b_out_"), "mlp": ("W_out_", "b_out_")}


class Scale(nn.Module):
  """A layer with no rule: x * exp(log_scale), one log-scale per feature."""

  @nn.compact
  def __call__(self, x):
    return x * jnp.exp(self.param("log_scale", nn.initializers.normal(0.5), (x.shape[-1],)))


class Encoder(nn.Module):
  """``layer`` between two dense maps: x [B, *shape] -> layer -> flattened -> (mean [B, 2],
  log_var [B, 2])."""
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(self.layer(x))
    out = nn.Dense(4, name="head")(h.reshape(h.shape[0], -1))
    return out[:, :2], out[:, 2:]


class UserEncoder(nn.Module):
  """A user's encoder: a conv, a layer without a rule, group norm (no rule), a dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Conv(3, (3, 3), strides=(2, 2))(x))
    h = nn.GroupNorm(num_groups=1)(Scale()(h))
    out = nn.Dense(4)(h.reshape(h.shape[0], -1))
    return out[:, :2], out[:, 2:]


class RunningNorm(nn.Module):
  """Batch norm on running averages that differ from (0, 1), as after stage 1."""

  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=True, name="norm")(x)


# name -> (layer, input shape [B, ...] with B = 3, input_axes of blocks.slicings)
LAYERS = {
    "dense": (nn.Dense(5), (3, 6), None),
    "dense_on_a_sequence": (nn.Dense(5), (3, 4, 6), None),
    "dense_general": (nn.DenseGeneral(5, axis=(-2, -1)), (3, 4, 6), None),
    "dense_general_named_axes": (nn.DenseGeneral((2, 3), axis=(1, 2)), (3, 4, 6),
                                 {"layer/kernel": (0, 1)}),
    "conv1d": (nn.Conv(4, (3,)), (3, 7, 2), None),
    "conv2d_strided": (nn.Conv(4, (3, 2), strides=(2, 1), padding="VALID"), (3, 7, 6, 2), None),
    "conv3d_dilated": (nn.Conv(3, (2, 2, 2), kernel_dilation=2), (3, 5, 5, 5, 2), None),
    "conv2d_explicit_padding": (nn.Conv(4, (3, 2), padding=((1, 0), (2, 1))), (3, 5, 4, 2),
                                None),
    # Patches the rule does not slice out itself: it applies the layer with an identity kernel.
    "conv1d_circular": (nn.Conv(4, (3,), padding="CIRCULAR"), (3, 7, 2), None),
    # Many channels: the mlp design's codes mix them (few channels: its deltas are formed).
    "conv2d_many_channels": (nn.Conv(16, (2, 2)), (3, 4, 4, 40), None),
    "project_conv": (encoders.Conv(4, (2, 2), strides=(2, 2), padding="VALID"), (3, 6, 6, 2),
                     None),
    "batch_norm": (RunningNorm(), (3, 5, 4), None),
    "layer_norm": (nn.LayerNorm(), (3, 5, 4), None),
    # Covered by no rule: a feature-grouped conv and a layer of the user's own.
    "grouped_conv": (nn.Conv(4, (3, 3), feature_group_count=2), (3, 5, 5, 2), None),
    "no_rule": (Scale(), (3, 6), None),
}


@functools.cache
def _setup(layer_name: str, design: str, projection: int = 0):
  """(encoder, variables, x, contexts, hypernet, psi), psi with output layers large enough that
  every example's encoder differs from the base one."""
  layer, shape, input_axes = LAYERS[layer_name]
  encoder = Encoder(layer.clone(name="layer"))
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(
        lambda a: a + jax.random.uniform(jax.random.PRNGKey(5), a.shape, minval=0.5),
        variables["batch_stats"])
  layout = blocks.BlockLayout.from_tree(variables["params"])
  hypernet = hypernets.make_hypernet(design, layout, init_std=0.05, input_axes=input_axes)
  if projection:
    hypernet = hypernets.ProjectedContext(hypernet, projection)
  contexts = jax.random.normal(jax.random.PRNGKey(2), (shape[0], 7))
  psi = jax.jit(functools.partial(hypernet.init, method="factors"))(
      jax.random.PRNGKey(3), contexts)["params"]
  return encoder, variables, x, contexts, hypernet, psi


def _paths(encoder, variables, hypernet, x, contexts):
  """(reference(psi), modulated(psi)): the encoder's summed outputs on each path."""
  others = {k: v for k, v in variables.items() if k != "params"}
  phi = variables["params"]

  def reference(psi):
    def encoder_apply(params, x_i):
      return jax.tree.map(lambda a: a[0], encoder.apply({"params": params, **others}, x_i[None]))
    return adaptive.instance_adaptive_encode(
        encoder_apply, lambda psi, c: hypernet.apply({"params": psi}, c), phi, psi, x, contexts)

  def modulated_(psi):
    return modulated.modulated_encode(
        lambda params, x: encoder.apply({"params": params, **others}, x), hypernet, phi, psi, x,
        contexts)
  return reference, modulated_


def _loss(encode):
  """A scalar weighting every output differently (its gradient is each output's, summed with
  distinct weights), with the outputs as its aux."""
  def loss(psi):
    mean, log_var = encode(psi)
    weights = jnp.arange(1.0, 1.0 + mean.size).reshape(mean.shape) / mean.size
    return jnp.sum(weights * mean) + jnp.sum(jnp.cos(weights) * log_var), (mean, log_var)
  return loss


def _check_against_the_reference_path(layer: str, design: str) -> None:
  encoder, variables, x, contexts, hypernet, psi = _setup(layer, design)
  reference, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
  base = encoder.apply(variables, x)
  (_, want), want_grad = jax.jit(jax.value_and_grad(_loss(reference), has_aux=True))(psi)
  (_, got), got_grad = jax.jit(jax.value_and_grad(_loss(modulated_), has_aux=True))(psi)
  # Every example's encoder differs from the base one, so the comparison is not vacuous.
  assert float(jnp.abs(want[0] - base[0]).min()) > 1e-4
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-3, atol=1e-4)


def _user_encoder_case(design):
  encoder = UserEncoder()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 2))
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)
  hypernet = hypernets.make_hypernet(
      design, blocks.BlockLayout.from_tree(variables["params"]), init_std=0.3)
  contexts = x.reshape(3, -1)
  psi = jax.jit(hypernet.init)(jax.random.PRNGKey(3), contexts[0])["params"]
  reference, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
  chex.assert_trees_all_close(jax.jit(modulated_)(psi), jax.jit(reference)(psi), rtol=1e-4,
                              atol=1e-5)


def _projected_context_case(design):
  encoder, variables, x, contexts, hypernet, psi = _setup("conv2d_strided", design, 3)
  reference, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
  chex.assert_trees_all_close(jax.jit(modulated_)(psi), jax.jit(reference)(psi), rtol=1e-4,
                              atol=1e-5)


def _materialize_case(design):
  _, _, _, contexts, hypernet, psi = _setup("conv1d", design)
  factors = hypernet.apply({"params": psi}, contexts, method="factors")
  formed = modulated.materialize(factors, hypernet.cuts, hypernet.layout)
  for i in range(contexts.shape[0]):
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], formed),
                                hypernet.apply({"params": psi}, contexts[i]), atol=1e-6)


def _resnet_proposition_1_case(design):
  # A zero output layer: every example's encoder is phi_AVI, so the base encoder's outputs.
  encoder = encoders.ResNetEncoder((2, 3), 3)
  x = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (3, 8, 8, 1)).astype(jnp.float32)
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(0), x)
  hypernet = hypernets.make_hypernet(design, blocks.BlockLayout.from_tree(variables["params"]))
  contexts = adaptive.normalized_context(x)
  psi = jax.jit(hypernet.init)(jax.random.PRNGKey(3), contexts[0])["params"]
  psi = {k: jnp.zeros_like(v) if k.startswith(OUTPUT_LAYER[design]) else v
         for k, v in psi.items()}
  got = jax.jit(lambda psi: modulated.modulated_encode(
      lambda p, x: encoder.apply({**variables, "params": p}, x, train=False), hypernet,
      variables["params"], psi, x, contexts))(psi)
  chex.assert_trees_all_close(got, encoder.apply(variables, x, train=False), atol=1e-5)


def _selected_case(pattern, design):
  """A hypernetwork over blocks.select(phi, pattern) of the user's encoder: the modulated path
  matches the reference path (outputs and gradients), each example's encoder differs from the
  base one, and the deltas touch the selected blocks only."""
  encoder = UserEncoder()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 2))
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)
  selected = blocks.select(variables["params"], pattern)
  hypernet = hypernets.make_hypernet(design, blocks.BlockLayout.from_tree(selected), init_std=0.3)
  contexts = x.reshape(3, -1)
  psi = jax.jit(hypernet.init)(jax.random.PRNGKey(3), contexts[0])["params"]
  reference, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
  (_, want), want_grad = jax.jit(jax.value_and_grad(_loss(reference), has_aux=True))(psi)
  (_, got), got_grad = jax.jit(jax.value_and_grad(_loss(modulated_), has_aux=True))(psi)
  assert float(jnp.abs(want[0] - encoder.apply(variables, x)[0]).min()) > 1e-4
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-3, atol=1e-4)
  deltas = hypernet.apply({"params": psi}, contexts[0])
  phi_0 = adaptive.modulate(variables["params"], deltas)
  paths = blocks.BlockLayout.from_tree(selected).paths
  for path, old, new in zip(blocks.BlockLayout.from_tree(variables["params"]).paths,
                            jax.tree.leaves(variables["params"]), jax.tree.leaves(phi_0)):
    assert (path in paths) == bool(jnp.any(old != new)), path


# The checks that hold for every design: one design each in the fast tier (FAST_DESIGN), the
# others in the extended tier.
FAST_DESIGN = {_user_encoder_case: "paper", _projected_context_case: "ha",
               _materialize_case: "mlp", _resnet_proposition_1_case: "mlp"}
OTHER_DESIGNS = [(case, design) for case, fast in FAST_DESIGN.items() for design in DESIGNS
                 if design != fast]


@pytest.mark.extended
class OtherDesignTest(parameterized.TestCase):
  """The extended tier: each layer kind under the design ModulatedTest does not run it with, and
  the other designs of the design-generic checks."""

  @parameterized.parameters(*[(layer, ("paper", "mlp")[i % 2]) for i, layer in enumerate(LAYERS)])
  def test_outputs_and_gradients_match_the_reference_path(self, layer, design):
    _check_against_the_reference_path(layer, design)

  @parameterized.parameters(*OTHER_DESIGNS)
  def test_the_design_generic_checks(self, case, design):
    case(design)


class ModulatedTest(chex.TestCase, parameterized.TestCase):

  # Every layer with the codes carrying the example (mlp; ha alike) or with the basis carrying
  # it (paper), in turn; ha on two layers. The other design of each layer: below, extended tier.
  @parameterized.parameters(*[(layer, ("mlp", "paper")[i % 2]) for i, layer in enumerate(LAYERS)],
                            ("dense", "ha"), ("conv2d_strided", "ha"))
  def test_outputs_and_gradients_match_the_reference_path(self, layer, design):
    _check_against_the_reference_path(layer, design)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit(self):
    encoder, variables, x, contexts, hypernet, psi = _setup("dense", "mlp")
    reference, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
    chex.assert_trees_all_close(self.variant(modulated_)(psi), reference(psi), rtol=1e-4,
                                atol=1e-5)

  def test_a_user_encoder_with_layers_without_rules(self):
    _user_encoder_case(FAST_DESIGN[_user_encoder_case])

  def test_the_fallback_is_taken_only_where_no_rule_applies(self):
    # The reference path for one call vmaps the module over the examples: a Conv covered by its
    # rule runs convolutions for the batch (on few channels none: it slices out the patches), a
    # grouped one (no rule) one per example.
    def feature_groups(layer):
      encoder, variables, x, contexts, hypernet, psi = _setup(layer, "mlp")
      _, modulated_ = _paths(encoder, variables, hypernet, x, contexts)
      return set(re.findall(r"feature_group_count=(\d+)", str(jax.make_jaxpr(modulated_)(psi))))
    self.assertEqual(feature_groups("conv2d_many_channels"), {"1"})
    self.assertEqual(feature_groups("conv2d_strided"), set())
    self.assertEqual(feature_groups("grouped_conv"), {"6"})   # 2 groups x 3 examples

  def test_a_projected_context(self):
    _projected_context_case(FAST_DESIGN[_projected_context_case])

  def test_materialize_gives_each_examples_deltas(self):
    _materialize_case(FAST_DESIGN[_materialize_case])

  def test_proposition_1_on_the_resnet_encoder(self):
    _resnet_proposition_1_case(FAST_DESIGN[_resnet_proposition_1_case])

  # The output layer (its rule), biases alone (the Conv and Dense rules decline a layer whose
  # kernel is not adapted: the reference path for that call), a rule layer beside a layer
  # without one.
  @parameterized.parameters(("^Dense_0/", "mlp"), ("bias$", "paper"), ("^(Conv_0|Scale_0)/", "ha"))
  def test_a_hypernetwork_over_some_blocks(self, pattern, design):
    _selected_case(pattern, design)

  def test_errors_name_the_argument(self):
    encoder, variables, x, contexts, hypernet, psi = _setup("dense", "mlp")
    apply = lambda params, x: encoder.apply({"params": params}, x)
    with self.assertRaisesRegex(ValueError, r"context must be \[B, m\] with B = 3"):
      modulated.modulated_encode(apply, hypernet, variables["params"], psi, x, contexts[:2])
    other = Encoder(nn.Dense(2, name="layer")).init(jax.random.PRNGKey(0), x)["params"]
    with self.assertRaisesRegex(ValueError, r"block 'head/kernel' \(5, 4\) is \(2, 4\) in the "
                                            "encoder's parameters"):
      modulated.modulated_encode(apply, hypernet, other, psi, x, contexts)
    # An encoder that folds the examples into another axis cannot take this path.
    folded = lambda params, x: encoder.apply({"params": params}, x.reshape(1, -1))
    with self.assertRaisesRegex(ValueError, r"module at 'layer' \(Dense\) was called on "
                                            r"\(1, 18\).*instance_adaptive_encode"):
      modulated.modulated_encode(folded, hypernet, variables["params"], psi, x, contexts)
    with self.assertRaisesRegex(ValueError, r"MLPHypernet.factors: expected a batch"):
      hypernet.apply({"params": psi}, contexts[0], method="factors")
