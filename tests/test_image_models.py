"""The image model pieces: conv as matmul, the ResNet encoder, the structured hypernetwork,
and the instance-adaptive encoder built from them (Proposition 1 on the image model)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from iavae_jax import adaptive, blocks, hypernets
from iavae_jax.models import encoders

SMALL = dict(channels=(4, 6), latent_dim=3)


@functools.lru_cache(maxsize=None)   # one (jitted: eager Flax init is slow) init per process
def _encoder_and_vars():
  encoder = encoders.ResNetEncoder(**SMALL)
  variables = jax.jit(encoder.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  # Non-trivial batch-norm statistics, so that frozen statistics are visibly used.
  stats = jax.tree.map(lambda a: a + 0.3 * jax.random.uniform(jax.random.PRNGKey(1), a.shape),
                       variables["batch_stats"])
  return encoder, variables["params"], stats


def _images(n, key=2):
  return jax.random.bernoulli(jax.random.PRNGKey(key), 0.3, (n, 28, 28, 1)).astype(jnp.float32)


class ConvAsMatmulTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((3, 3), (1, 1), "SAME"), ((2, 2), (2, 2), "VALID"),
                            ((1, 1), (1, 1), "SAME"))
  def test_equals_xla_convolution(self, kernel_size, strides, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (*kernel_size, 3, 5))
    got = self.variant(lambda x, k: encoders.conv_as_matmul(x, k, strides, padding))(x, kernel)
    want = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    chex.assert_trees_all_close(got, want, atol=1e-5)


class ResNetEncoderTest(chex.TestCase):

  def test_paper_encoder_shapes_and_size(self):
    encoder = encoders.ResNetEncoder()
    variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    mean, log_var = jax.eval_shape(lambda v, x: encoder.apply(v, x), variables,
                                   jnp.zeros((5, 28, 28, 1)))
    chex.assert_shape((mean, log_var), (5, 32))
    # 3 residual blocks of 64 channels, 2x2 stride-2 convs (28 -> 14 -> 7 -> 3), 576 -> 32 x 2.
    self.assertEqual(variables["params"]["mean"]["kernel"].shape, (3 * 3 * 64, 32))
    self.assertEqual(sum(np.size(l) for l in jax.tree.leaves(variables["params"])), 272448)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matmul_form_computes_the_same_encoder(self):
    encoder, params, stats = _encoder_and_vars()
    matmul = encoders.ResNetEncoder(**SMALL, as_matmul=True)
    x = _images(3)
    apply = lambda e: self.variant(
        lambda p, x: e.apply({"params": p, "batch_stats": stats}, x, train=False))
    chex.assert_trees_all_close(apply(matmul)(params, x), apply(encoder)(params, x), atol=1e-4)

  def test_train_mode_updates_statistics_and_eval_mode_uses_them(self):
    encoder, params, stats = _encoder_and_vars()
    x = _images(4)
    _, updates = encoder.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], stats)
    self.assertTrue(all(jax.tree.leaves(changed)))
    # In eval mode, one example's output does not depend on the others (no batch statistics).
    alone = encoder.apply({"params": params, "batch_stats": stats}, x[:1], train=False)
    together = encoder.apply({"params": params, "batch_stats": stats}, x, train=False)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[:1], together), alone, atol=1e-5)


def _literal_deltas(layout, psi, x):
  """delta_{l,j} = (W_g [x; e_l; e_in_j] + b_g)[:d_l], with the concatenation written out."""
  leaves = []
  for l, cut in enumerate(blocks.slicings(layout)):
    w, b = psi[f"W_{cut.group}"], psi[f"b_{cut.group}"]
    rows = [(w @ jnp.concatenate([x, psi["block_embeddings"][l],
                                  psi[f"input_embeddings_{cut.group}"][j]]) + b)[:cut.slice_size]
            for j in range(cut.num_slices)]
    leaves.append(cut.assemble(jnp.stack(rows)))
  return jax.tree.unflatten(layout.treedef, leaves)


class StructuredHypernetTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.encoder, cls.params, cls.stats = _encoder_and_vars()
    cls.layout = blocks.BlockLayout.from_tree(cls.params)
    cls.hypernet = hypernets.StructuredHypernet(cls.layout, block_embed_dim=5, input_embed_dim=3,
                                                init_std=0.01)
    cls.psi = jax.jit(cls.hypernet.init)(jax.random.PRNGKey(3), jnp.zeros(784))["params"]

  def test_slicing_rules(self):
    cut = lambda shape: blocks.Slicing(shape, blocks.input_feature_axes(shape))
    describe = lambda c: (c.group, c.num_slices, c.slice_size)
    self.assertEqual(describe(cut((3, 3, 4, 6))), ("conv", 4, 54))
    self.assertEqual(describe(cut((20, 3))), ("dense", 20, 3))
    self.assertEqual(describe(cut((6,))), ("dense", 1, 6))
    # assemble puts input channel j's slice at kernel[:, :, j, :].
    slices = jnp.arange(4 * 54.0).reshape(4, 54)
    kernel = cut((3, 3, 4, 6)).assemble(slices)
    chex.assert_trees_all_close(kernel[:, :, 2, :].reshape(-1), slices[2])

  def test_parameter_shapes(self):
    d_conv = max(kh * kw * c_out for kh, kw, _, c_out in
                 (s for s in self.layout.shapes if len(s) == 4))
    chex.assert_shape(self.psi["W_conv"], (d_conv, 784 + 5 + 3))
    chex.assert_shape(self.psi["block_embeddings"], (self.layout.num_blocks, 5))
    chex.assert_trees_all_close(self.psi["b_conv"], jnp.zeros(d_conv))

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_the_literal_concatenation(self):
    x = _images(1)[0].reshape(-1)
    got = self.variant(self.hypernet.apply)({"params": self.psi}, x)
    chex.assert_trees_all_close(got, _literal_deltas(self.layout, self.psi, x), atol=1e-4)

  def test_rejects_a_batch(self):
    with self.assertRaisesRegex(ValueError, "one example"):
      self.hypernet.apply({"params": self.psi}, jnp.zeros((2, 784)))

  def _adaptive_encode(self, psi, x, hypernet=None, context=None):
    """The instance-adaptive encoder on x [B, 28, 28, 1]: ``hypernet`` (default self.hypernet)
    sees ``context`` [B, m] (default: the flattened image)."""
    matmul = encoders.ResNetEncoder(**SMALL, as_matmul=True)
    hypernet = hypernet or self.hypernet

    def encoder_apply(phi, x_i):
      mean, log_var = matmul.apply({"params": phi, "batch_stats": self.stats}, x_i[None],
                                   train=False)
      return mean[0], log_var[0]
    hypernet_apply = lambda psi, c_i: hypernet.apply({"params": psi}, c_i)
    context = x.reshape(x.shape[0], -1) if context is None else context
    return adaptive.instance_adaptive_encode(encoder_apply, hypernet_apply, self.params, psi, x,
                                             context)

  @chex.variants(with_jit=True, without_jit=True)
  def test_proposition_1_zero_output_layer_is_the_base_encoder(self):
    zero = {k: (jnp.zeros_like(v) if k.startswith(("W_", "b_")) else v)
            for k, v in self.psi.items()}
    x = _images(4)
    got = self.variant(self._adaptive_encode)(zero, x)
    want = self.encoder.apply({"params": self.params, "batch_stats": self.stats}, x, train=False)
    chex.assert_trees_all_close(got, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmapped_encoder_equals_a_loop_over_examples(self):
    x = _images(3)
    got = self.variant(self._adaptive_encode)(self.psi, x)
    for i in range(3):
      phi_i = adaptive.modulate(self.params, self.hypernet.apply({"params": self.psi},
                                                                 x[i].reshape(-1)))
      want = self.encoder.apply({"params": phi_i, "batch_stats": self.stats}, x[i:i + 1],
                                train=False)
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[i:i + 1], got), want, rtol=1e-4,
                                  atol=1e-4)
    # Different examples really get different encoders.
    phi_0, phi_1 = (self.hypernet.apply({"params": self.psi}, x[i].reshape(-1)) for i in (0, 1))
    self.assertGreater(float(jnp.abs(phi_0["mean"]["kernel"] - phi_1["mean"]["kernel"]).max()),
                       0.0)

  def test_defaults_start_far_closer_to_the_base_encoder_than_the_papers_settings(self):
    # The library's defaults for images (its init_std, the normalised image as the context)
    # against the paper's (1e-3, the raw image): how far the untrained IA-VAE's mean is from the
    # base encoder's, relative to its norm (measured here: 0.30 against 50).
    x = _images(8)
    base, _ = self.encoder.apply({"params": self.params, "batch_stats": self.stats}, x,
                                 train=False)
    hypernet = hypernets.StructuredHypernet(self.layout)
    defaults = jax.jit(hypernet.init)(jax.random.PRNGKey(4), jnp.zeros(784))["params"]
    # The same draw at std 1e-3: W ~ N(0, std^2) scales with std, b = 0, embeddings unchanged.
    paper = {k: v * (1e-3 / hypernet.init_std) if k.startswith("W_") else v
             for k, v in defaults.items()}
    mean = jax.jit(lambda psi, context: self._adaptive_encode(psi, x, hypernet, context)[0])
    moved = lambda psi, context: float(jnp.linalg.norm(mean(psi, context) - base)
                                       / jnp.linalg.norm(base))
    self.assertLess(moved(defaults, adaptive.normalized_context(x)),
                    moved(paper, x.reshape(8, -1)) / 100)


def test_normalized_context_is_the_flattened_image_over_its_norm():
  x = _images(3).at[1].set(0.0)                            # example 1 is blank
  context = adaptive.normalized_context(x)
  chex.assert_shape(context, (3, 784))
  chex.assert_trees_all_close(jnp.linalg.norm(context, axis=-1), jnp.array([1.0, 0.0, 1.0]),
                              atol=1e-6)
  chex.assert_trees_all_close(context[2] * jnp.linalg.norm(x[2]), x[2].reshape(-1), atol=1e-5)
