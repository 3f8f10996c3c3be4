"""The image hypernetwork designs (paper, ha, mlp) and the slicing rule they share: the slicing of
Flax blocks of every rank, each design's equations, Proposition 1 on the project's encoder and on
a foreign one, where each design's x-dependent part varies (across blocks, across slices), and
an encoder's penultimate feature as a context (adaptive.submodule_input)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from iavae_jax import adaptive, blocks, hypernets
from iavae_jax.models import encoders

DESIGNS = tuple(hypernets.HYPERNETS)
# Each design's output layer: zero, it makes every delta zero (Proposition 1's psi_0).
OUTPUT_LAYER = {"paper": ("W_", "b_"), "ha": ("W_out_", "b_out_"), "mlp": ("W_out_", "b_out_")}


class ForeignEncoder(nn.Module):
  """Not the project's encoder: 3-D and 1-D convolutions, layer norm, DenseGeneral kernels of
  rank 4 and 3, a scalar parameter. x: [B, 4, 4, 4, 2] -> (mean [B, 3], log_var [B, 3])."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.gelu(nn.Conv(3, (2, 2, 2))(x))                     # kernel [2, 2, 2, 2, 3]
    h = h.reshape(h.shape[0], 16, 12)                         # 16 steps of 12 features
    h = nn.LayerNorm()(nn.gelu(nn.Conv(5, (3,))(h)))          # kernel [3, 12, 5]
    h = nn.gelu(nn.DenseGeneral((2, 4), axis=(-2, -1))(h))    # kernel [16, 5, 2, 4]
    out = nn.DenseGeneral(6, axis=(-2, -1))(h)                # kernel [2, 4, 6]
    log_temperature = self.param("log_temperature", nn.initializers.constant(0.1), ())
    return out[:, :3], out[:, 3:] * jnp.exp(log_temperature)


# DenseGeneral_0's input features are its first two axes, which Flax's layout does not say.
FOREIGN_AXES = {"DenseGeneral_0/kernel": (0, 1)}


@functools.cache
def _foreign():
  """(encoder, x [3, 4, 4, 4, 2], phi, encoder_apply(phi, x_i))."""
  encoder = ForeignEncoder()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 4, 2))
  phi = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)["params"]
  encoder_apply = lambda p, x_i: jax.tree.map(lambda a: a[0],
                                              encoder.apply({"params": p}, x_i[None]))
  return encoder, x, phi, encoder_apply


@functools.cache
def _resnet():
  """(x [3, 28, 28, 1], variables, encoder_apply(phi, x_i) per example, the base encoder's
  outputs) of a small ResNetEncoder."""
  encoder = encoders.ResNetEncoder((4, 6), 3)
  per_example = encoders.ResNetEncoder((4, 6), 3, as_matmul=True)
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  stats = variables["batch_stats"]

  def encoder_apply(phi, x_i):
    out = per_example.apply({"params": phi, "batch_stats": stats}, x_i[None], train=False)
    return jax.tree.map(lambda a: a[0], out)
  x = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (3, 28, 28, 1)).astype(jnp.float32)
  base = encoder.apply(variables, x, train=False)
  return x, variables, encoder_apply, base


def _resnet_layout():
  return blocks.BlockLayout.from_tree(_resnet()[1]["params"])


def _scale_output_layer(design, psi, factor):
  return {k: v * factor if k.startswith(OUTPUT_LAYER[design]) else v for k, v in psi.items()}


def _literal_deltas(design, hypernet, psi, c):
  """Each design's equation for delta_{l,j}, written out with its concatenation, slice by slice."""
  m, gelu = c.shape[0], hypernet.activation if design == "mlp" else None
  leaves = []
  for l, cut in enumerate(blocks.slicings(hypernet.layout, hypernet.input_axes)):
    g, e_l = cut.group, psi["block_embeddings"][l]

    def row(j):
      if design == "paper":
        out = psi[f"W_{g}"] @ jnp.concatenate([c, e_l, psi[f"input_embeddings_{g}"][j]])
        return out + psi[f"b_{g}"]
      if design == "ha":
        w_j = psi[f"W_{g}"][j]
        if "block_gains" in psi:   # a_{l,j} = s_l * (W_{j,c} c) + W_{j,e} e_l + B_j
          code = psi["block_gains"][l] * (w_j[:, :m] @ c) + w_j[:, m:] @ e_l
        else:                      # a_{l,j} = W_j [c; e_l] + B_j
          code = w_j @ jnp.concatenate([c, e_l])
        return psi[f"W_out_{g}"] @ (code + psi[f"B_{g}"][j]) + psi[f"b_out_{g}"]
      hidden = gelu(psi["U"] @ jnp.concatenate([c, e_l, psi[f"input_embeddings_{g}"][j]])
                    + psi["b"])
      return psi[f"W_out_{g}"] @ hidden + psi[f"b_out_{g}"]
    rows = jax.vmap(row)(jnp.arange(cut.num_slices))
    leaves.append(cut.assemble(rows[:, :cut.slice_size]))
  return jax.tree.unflatten(hypernet.layout.treedef, leaves)


class SlicingTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("conv1d", nn.Conv(4, (3,)), (2, 7, 5), None, 1),
      ("conv2d", nn.Conv(4, (3, 2)), (2, 6, 5, 5), None, 1),
      ("conv3d", nn.Conv(4, (2, 2, 3)), (2, 4, 4, 5, 5), None, 1),
      ("dense", nn.Dense(4), (2, 5), None, 1),
      ("dense_general_one_output_axis", nn.DenseGeneral(4, axis=(-2, -1)), (2, 3, 5), None, 1),
      ("dense_general_named_axes", nn.DenseGeneral((2, 3), axis=(-2, -1)), (2, 3, 5), (0, 1),
       2))
  def test_slice_j_holds_the_weights_that_read_input_feature_j(self, module, x_shape,
                                                               input_axes, feature_ndim):
    # Keep only slice j of the kernel (bias 0): the output then depends on input feature j alone
    # (feature_ndim trailing axes of x; DenseGeneral's other input axis lies inside the slice).
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    params = module.init(jax.random.PRNGKey(1), x)["params"]
    kernel = params["kernel"]
    cut = blocks.Slicing(kernel.shape, input_axes or blocks.input_feature_axes(kernel.shape))
    features = int(np.prod(x_shape[-feature_ndim:]))
    self.assertEqual(cut.num_slices, features)
    for j in (0, features - 1):
      one_hot = jax.nn.one_hot(j, features)
      only_j = cut.assemble(cut.cut(kernel) * one_hot[:, None])
      apply = lambda x: module.apply({"params": {"kernel": only_j,
                                                 "bias": jnp.zeros_like(params["bias"])}}, x)
      x_j = x * one_hot.reshape(x_shape[-feature_ndim:])
      chex.assert_trees_all_close(apply(x), apply(x_j), atol=1e-6)
      self.assertGreater(float(jnp.abs(apply(x)).max()), 0.0)

  @parameterized.parameters(((),), ((5,),), ((4, 3),), ((2, 4, 3),), ((2, 2, 4, 3),),
                            ((2, 2, 2, 4, 3),))
  def test_cut_and_assemble_are_inverse_for_every_rank(self, shape):
    block = jnp.arange(float(np.prod(shape))).reshape(shape)
    cut = blocks.Slicing(shape, blocks.input_feature_axes(shape))
    slices = cut.cut(block)
    chex.assert_shape(slices, (cut.num_slices, cut.slice_size))
    self.assertEqual(cut.num_slices * cut.slice_size, block.size)
    self.assertEqual(cut.group, "conv" if len(shape) >= 3 else "dense")
    chex.assert_trees_all_equal(cut.assemble(slices), block)

  def test_the_existing_rule_is_unchanged(self):
    # Conv [kh, kw, C_in, C_out]: the slices laid out as [C_in, kh, kw, C_out]; dense [d_in,
    # d_out]: the rows; a vector: one slice (the rule before blocks of other ranks had one).
    slices = jnp.arange(4 * 54.0).reshape(4, 54)
    conv = blocks.Slicing((3, 3, 4, 6), blocks.input_feature_axes((3, 3, 4, 6)))
    chex.assert_trees_all_equal(conv.assemble(slices),
                                slices.reshape(4, 3, 3, 6).transpose(1, 2, 0, 3))
    dense = blocks.Slicing((20, 3), blocks.input_feature_axes((20, 3)))
    chex.assert_trees_all_equal(dense.assemble(jnp.ones((20, 3))), jnp.ones((20, 3)))
    self.assertEqual((dense.num_slices, blocks.Slicing((6,), ()).num_slices), (20, 1))

  def test_paths_and_input_axes(self):
    _, _, phi, _ = _foreign()
    layout = blocks.BlockLayout.from_tree(phi)
    self.assertIn("DenseGeneral_0/kernel", layout.paths)
    self.assertIn("log_temperature", layout.paths)
    cuts = dict(zip(layout.paths, blocks.slicings(layout, FOREIGN_AXES)))
    self.assertEqual((cuts["DenseGeneral_0/kernel"].num_slices,
                      cuts["DenseGeneral_0/kernel"].slice_size), (80, 8))
    self.assertEqual((cuts["DenseGeneral_1/kernel"].num_slices,
                      cuts["DenseGeneral_1/kernel"].slice_size), (4, 12))
    self.assertEqual((cuts["Conv_0/kernel"].num_slices, cuts["Conv_0/kernel"].slice_size),
                     (2, 24))
    self.assertEqual((cuts["log_temperature"].num_slices, cuts["log_temperature"].slice_size),
                     (1, 1))
    negative = blocks.slicings(layout, {"Conv_0/kernel": (-2,)})
    self.assertEqual(negative[layout.paths.index("Conv_0/kernel")].input_axes, (3,))
    with self.assertRaisesRegex(ValueError, r"\['Dense_9/kernel'\], which are not blocks.*"
                                            r"Conv_0/bias"):
      blocks.slicings(layout, {"Dense_9/kernel": (0,)})
    for axes in ((0, 0), (4,), (-5,)):
      with self.assertRaisesRegex(ValueError, r"input_axes\['DenseGeneral_1/kernel'\] = .* "
                                              r"does not fit the block's shape \(2, 4, 6\)"):
        blocks.slicings(layout, {"DenseGeneral_1/kernel": axes})
    with self.assertRaisesRegex(ValueError, "does not fit the block's shape"):
      blocks.slicings(layout, {"log_temperature": (0,)})


def _check_equations(design, fields, variant):
  """The design's deltas on the foreign encoder against its equations written out literally."""
  _, x, phi, _ = _foreign()
  layout = blocks.BlockLayout.from_tree(phi)
  hypernet = hypernets.make_hypernet(design, layout, init_std=0.1, input_axes=FOREIGN_AXES,
                                     **fields)
  c = x[0].reshape(-1)
  psi = hypernet.init(jax.random.PRNGKey(3), c)["params"]
  if "block_gains" in psi:
    psi["block_gains"] = 1 + jax.random.normal(jax.random.PRNGKey(4), psi["block_gains"].shape)
  got = variant(hypernet.apply)({"params": psi}, c)
  chex.assert_trees_all_equal_shapes(got, phi)
  chex.assert_trees_all_close(got, _literal_deltas(design, hypernet, psi, c), atol=1e-5)


@pytest.mark.extended
@pytest.mark.parametrize("use_jit", [True, False])
def test_equations_of_ha_with_block_gains(use_jit):
  _check_equations("ha", {"block_gains": True}, jax.jit if use_jit else lambda fn: fn)


class DesignTest(chex.TestCase, parameterized.TestCase):

  def test_paper_design_numbers_are_pinned(self):
    # StructuredHypernet's parameters and deltas at a fixed key, on the cpu-tier encoder, as
    # computed before the other designs and the general slicing rule were added.
    encoder = encoders.ResNetEncoder((16, 16, 16), 32)
    layout = blocks.BlockLayout.from_tree(jax.eval_shape(
        encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"])
    hypernet = hypernets.StructuredHypernet(layout, block_embed_dim=16, input_embed_dim=8,
                                            init_std=1e-3)
    c = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (784,)).astype(jnp.float32)
    psi = jax.jit(hypernet.init)(jax.random.PRNGKey(3), c)["params"]

    def checksum(tree):
      flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])
      return flat.sum(), np.abs(flat).sum(), (flat * np.cos(np.arange(flat.size))).sum()
    np.testing.assert_allclose(checksum(psi), (-5.629636457661812, 1600.4659021557056,
                                               -21.696412089312872), rtol=1e-6)
    np.testing.assert_allclose(checksum(hypernet.apply({"params": psi}, c)),
                               (35.36671598527755, 306.98919179041695, 0.2673654630718864),
                               rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*DESIGNS)
  def test_equations(self, design):
    _check_equations(design, {}, self.variant)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*DESIGNS)
  def test_proposition_1_on_the_resnet_encoder(self, design):
    x, variables, encoder_apply, base = _resnet()
    phi = variables["params"]
    hypernet = hypernets.make_hypernet(design, blocks.BlockLayout.from_tree(phi), init_std=1e-5)
    hypernet_apply = lambda psi, c: hypernet.apply({"params": psi}, c)
    contexts = x.reshape(x.shape[0], -1)
    psi = hypernet.init(jax.random.PRNGKey(3), contexts[0])["params"]
    encode = self.variant(lambda psi: adaptive.instance_adaptive_encode(
        encoder_apply, hypernet_apply, phi, psi, x, contexts))
    # A zero output layer gives phi_AVI exactly, so the base encoder's outputs (up to float32
    # summation order: a per-example conv as a matmul against XLA's convolution).
    chex.assert_trees_all_close(encode(_scale_output_layer(design, psi, 0.0)), base, atol=1e-5)
    # At initialisation (output layer ~ N(0, 1e-5^2)), within 2% of the outputs' scale
    # (measured: paper 0.9%, ha 0.08%, mlp 0.15%).
    chex.assert_trees_all_close(encode(psi), base, atol=0.02 * float(jnp.abs(base[0]).max()))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*DESIGNS)
  def test_proposition_1_on_a_foreign_encoder(self, design):
    encoder, x, phi, encoder_apply = _foreign()
    hypernet = hypernets.make_hypernet(design, blocks.BlockLayout.from_tree(phi), init_std=1e-5,
                                       input_axes=FOREIGN_AXES)
    hypernet_apply = lambda psi, c: hypernet.apply({"params": psi}, c)
    contexts = x.reshape(x.shape[0], -1)
    psi = hypernet.init(jax.random.PRNGKey(3), contexts[0])["params"]
    encode = self.variant(lambda psi: adaptive.instance_adaptive_encode(
        encoder_apply, hypernet_apply, phi, psi, x, contexts))
    base = encoder.apply({"params": phi}, x)
    chex.assert_trees_all_close(encode(_scale_output_layer(design, psi, 0.0)), base, atol=1e-6)
    # (measured: paper 0.13%, ha 0.03%, mlp 0.06%)
    chex.assert_trees_all_close(encode(psi), base, atol=0.02 * float(jnp.abs(base[0]).max()))
    # A larger output layer (as after training) moves every output away from the base encoder's.
    mean, _ = encode(_scale_output_layer(design, psi, 1e4))
    self.assertGreater(float(jnp.abs(mean - base[0]).min()), 0.0)

  @parameterized.named_parameters(
      # (design, fields, x-part the same for every slice of a block, for every block of a group)
      ("paper", "paper", {}, True, True),       # W_x c, one vector per group: the point
      ("ha", "ha", {}, False, True),            # W_out W_{j,c} c: per slice index, not per block
      ("ha_block_gains", "ha", {"block_gains": True}, False, False),
      ("mlp", "mlp", {}, False, False))
  def test_where_the_x_dependent_part_varies(self, design, fields, same_across_slices,
                                             same_across_blocks):
    layout = _resnet_layout()
    hypernet = hypernets.make_hypernet(design, layout, init_std=0.1, **fields)
    c0, c1 = jax.random.normal(jax.random.PRNGKey(5), (2, 20))
    psi = hypernet.init(jax.random.PRNGKey(3), c0)["params"]
    if "block_gains" in psi:   # as after training: the gains move away from their init, 1
      psi["block_gains"] = 1 + jax.random.normal(jax.random.PRNGKey(4), psi["block_gains"].shape)
    cuts = blocks.slicings(layout)
    deltas = [jax.tree.leaves(hypernet.apply({"params": psi}, c)) for c in (c0, c1)]
    # The x-dependent part of every slice: delta(c1) - delta(c0), [n_l, d_l] per block.
    parts = [np.asarray(cut.cut(a) - cut.cut(b)) for cut, a, b in zip(cuts, *deltas[::-1])]
    scale = max(np.abs(p).max() for p in parts)
    same = lambda u, v: np.abs(u - v).max(-1) <= 1e-5 * scale

    # Across slices: slice j against slice 0 of the same block, for every block and j > 0.
    across_slices = np.concatenate([same(p[1:], p[:1]) for p in parts if len(p) > 1])
    # Across blocks: slice j of block l against slice j of block l' of the same group, on the
    # first min(d_l, d_l') numbers (a group's output layer is cut to each block's slice size).
    across_blocks = []
    for l, (cut_l, p_l) in enumerate(zip(cuts, parts)):
      for cut_k, p_k in list(zip(cuts, parts))[l + 1:]:
        if cut_k.group == cut_l.group:
          n, d = min(len(p_l), len(p_k)), min(p_l.shape[1], p_k.shape[1])
          across_blocks.append(same(p_l[:n, :d], p_k[:n, :d]))
    across_blocks = np.concatenate(across_blocks)
    self.assertGreater(scale, 0.0)
    self.assertGreater(min(len(across_slices), len(across_blocks)), 100)
    # All pairs coincide, or none does.
    self.assertTrue(across_slices.all() if same_across_slices else not across_slices.any())
    self.assertTrue(across_blocks.all() if same_across_blocks else not across_blocks.any())

  @parameterized.parameters(*DESIGNS)
  def test_make_hypernet(self, design):
    hypernet = hypernets.make_hypernet(design, _resnet_layout(), init_std=0.5)
    self.assertIsInstance(hypernet, hypernets.HYPERNETS[design])
    self.assertEqual(hypernet.init_std, 0.5)

  def test_parameter_counts_by_formula(self):
    layout = _resnet_layout()
    groups = {}
    for cut in blocks.slicings(layout):
      n, d = groups.get(cut.group, (0, 0))
      groups[cut.group] = (max(n, cut.num_slices), max(d, cut.slice_size))
    m, l, n_in, h, num_blocks = 30, 16, 8, 16, layout.num_blocks
    paper = sum(d * (m + l + n_in) + d + n * n_in for n, d in groups.values())
    ha = sum(n * h * (m + l) + n * h + d * h + d for n, d in groups.values())
    mlp = 64 * (m + l + n_in) + 64 + sum(n * n_in + d * 64 + d for n, d in groups.values())
    for design, count in (("paper", paper), ("ha", ha), ("mlp", mlp)):
      self.assertEqual(hypernets.num_params(hypernets.make_hypernet(design, layout), m),
                       count + num_blocks * l)
    gains = hypernets.make_hypernet("ha", layout, block_gains=True)
    self.assertEqual(hypernets.num_params(gains, m), ha + num_blocks * (l + h))

  @chex.variants(with_jit=True, without_jit=True)
  def test_projected_context(self):
    encoder, x, phi, encoder_apply = _foreign()
    layout = blocks.BlockLayout.from_tree(phi)
    inner = hypernets.make_hypernet("ha", layout, init_std=1e-5, input_axes=FOREIGN_AXES)
    hypernet = hypernets.ProjectedContext(inner, dim=4)
    contexts = x.reshape(x.shape[0], -1)
    psi = hypernet.init(jax.random.PRNGKey(3), contexts[0])["params"]
    self.assertEqual(hypernets.num_params(hypernet, 128),
                     128 * 4 + hypernets.num_params(inner, 4))
    # The design sees P c.
    projected = contexts[0] @ psi["projection"]["kernel"]
    chex.assert_trees_all_close(
        self.variant(hypernet.apply)({"params": psi}, contexts[0]),
        inner.apply({"params": psi["hypernet"]}, projected), atol=1e-6)
    # Proposition 1: a zero output layer gives the base encoder.
    zero = dict(psi, hypernet=_scale_output_layer("ha", psi["hypernet"], 0.0))
    encode = self.variant(lambda psi: adaptive.instance_adaptive_encode(
        encoder_apply, lambda p, c: hypernet.apply({"params": p}, c), phi, psi, x, contexts))
    chex.assert_trees_all_close(encode(zero), encoder.apply({"params": phi}, x), atol=1e-6)

  def test_make_hypernet_errors(self):
    layout = blocks.BlockLayout.from_tree({"w": jnp.zeros((2, 3))})
    with self.assertRaisesRegex(ValueError, r"name='resnet' is not a design; choose one of "
                                            r"paper, ha, mlp"):
      hypernets.make_hypernet("resnet", layout)
    with self.assertRaisesRegex(ValueError, r"the 'ha' design has no field input_embed_dim; "
                                            r"its fields are .*hidden_dim"):
      hypernets.make_hypernet("ha", layout, input_embed_dim=8)

  @parameterized.parameters(*DESIGNS)
  def test_rejects_a_batch(self, design):
    hypernet = hypernets.make_hypernet(design, blocks.BlockLayout.from_tree({"w": jnp.zeros(3)}))
    with self.assertRaisesRegex(ValueError, "one example"):
      hypernet.init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))


class SubmoduleInputTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_resnet_encoders_penultimate_feature(self):
    encoder = encoders.ResNetEncoder((4, 6), 3)
    x, variables, _, (mean, _) = _resnet()
    feature = self.variant(lambda v, x: adaptive.submodule_input(encoder, v, "mean", x,
                                                                 train=False))(variables, x)
    chex.assert_shape(feature, (3, 7 * 7 * 6))   # 28 -> 14 -> 7
    # The output layer reads it: mean = feature W + b.
    head = variables["params"]["mean"]
    chex.assert_trees_all_close(feature @ head["kernel"] + head["bias"], mean, atol=1e-5)

  def test_nested_path_and_unknown_path(self):
    _, x, phi, _ = _foreign()
    encoder = ForeignEncoder()
    feature = adaptive.submodule_input(encoder, {"params": phi}, "DenseGeneral_1", x)
    chex.assert_shape(feature, (3, 2, 4))
    self.assertGreaterEqual(float(feature.min()), -0.2)   # after a GELU
    with self.assertRaisesRegex(ValueError, "called no submodule at path 'Dense_7'"):
      adaptive.submodule_input(encoder, {"params": phi}, "Dense_7", x)
