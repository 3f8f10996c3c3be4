"""The slicing rule of the image hypernetworks for Flax blocks of every rank, and the paper
design's numbers pinned."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from iavae_jax import blocks, hypernets
from iavae_jax.models import encoders


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


class PaperDesignTest(chex.TestCase):

  def test_paper_design_numbers_are_pinned(self):
    # StructuredHypernet's parameters and deltas at a fixed key, on the cpu-tier encoder, as
    # computed before the other designs and the general slicing rule were added.
    encoder = encoders.ResNetEncoder((16, 16, 16), 32)
    layout = blocks.BlockLayout.from_tree(jax.eval_shape(
        encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"])
    hypernet = hypernets.StructuredHypernet(layout, 16, 8, 1e-3)
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
