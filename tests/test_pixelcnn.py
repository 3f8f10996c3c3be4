"""Gated PixelCNN decoder: exact receptive field (autoregressive, no blind spot), z dependence,
batch independence, the paper config's shape and parameter count; and sa-vae's masking
(``sa_vae_masking``): its receptive field with the blind spot, the constant first logit, the
same parameter count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax.models import pixelcnn


def _random_params(model, x, z, seed=0):
  """Random params of the right shapes, drawn in numpy (compiling flax's threefry init costs
  seconds on CPU): kernels N(0, 1 / fan_in), biases N(0, 0.1^2) -- nonzero biases, so no
  dependence can hide behind an exact cancellation of a symmetric init."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, z)["params"]
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    scale = 0.1 if path[-1].key == "bias" else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(batch, size, latent_dim=3, seed=2):
  kx, kz = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.bernoulli(kx, 0.5, (batch, size, size, 1)).astype(jnp.float32)
  z = jax.random.normal(kz, (batch, latent_dim))
  return x, z


def _predicted_support(kernel_sizes, size, r, c):
  """[size, size] bool: the input pixels the logit at (r, c) should depend on. With
  P = sum of k // 2: rows r-1-P..r-1 x columns c-P..c+P, and row r at columns c-1-P..c-1."""
  big_p = sum(k // 2 for k in kernel_sizes)
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  above = (rows >= r - 1 - big_p) & (rows <= r - 1) & (np.abs(cols - c) <= big_p)
  left = (rows == r) & (cols >= c - 1 - big_p) & (cols <= c - 1)
  return above | left


def _sa_vae_predicted_support(kernel_sizes, size, r, c):
  """[size, size] bool: the input pixels the logit at (r, c) should depend on with sa-vae's
  masking. With P_l = p_1 + ... + p_l, P = P_L: row r at columns c-1-P..c-1, and for each layer
  l, rows r-l-P_l..r-l at columns c-P..c+P_l (the vertical stack moves down a row per layer)."""
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  big_p = sum(k // 2 for k in kernel_sizes)
  support = (rows == r) & (cols >= c - 1 - big_p) & (cols <= c - 1)
  p_l = 0
  for layer, k in enumerate(kernel_sizes, start=1):
    p_l += k // 2
    support |= ((rows >= r - layer - p_l) & (rows <= r - layer) & (cols >= c - big_p)
                & (cols <= c + p_l))
  return support


class AutoregressiveTest(chex.TestCase):

  def _image_jacobian(self, kernel_sizes, size, sa_vae_masking=False):
    """d logit[r, c] / d x[r', c'] as a [size * size, size * size] array (raster order)."""
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=kernel_sizes,
                                   sa_vae_masking=sa_vae_masking)
    x, z = _inputs(1, size)
    params = _random_params(model, x, z)
    jacobian = self.variant(jax.jacrev(lambda x: model.apply({"params": params}, x, z)))
    jac = jacobian(x)                                 # [1, H, W, 1, 1, H, W, 1]
    return np.asarray(jac).reshape(size * size, size * size)

  @chex.variants(with_jit=True, without_jit=True)
  def test_deep_stack_sees_exactly_the_earlier_pixels(self):
    # P = 2 + 2 + 2 + 1 + 1 = 8 >= 7 covers an 8 x 8 image: logit i depends on every pixel
    # j < i (no blind spot, in particular up and to the right) and on none j >= i (mask A).
    # sa-vae's per-layer shift of the vertical stack fails the second assertion: (r-1, c+3)
    # is out of reach of the first 5-wide kernel and later layers only reach rows <= r-2.
    jac = self._image_jacobian((5, 5, 5, 3, 3), 8)
    i, j = np.indices(jac.shape)
    self.assertTrue(np.all(jac[j >= i] == 0), "a logit depends on its own or a later pixel")
    self.assertTrue(np.all(jac[j < i] != 0), "a logit misses an earlier pixel (blind spot)")

  @chex.variants(with_jit=True, without_jit=True)
  def test_shallow_stack_support_is_the_predicted_receptive_field(self):
    # P = 4 on 10 x 10: the support is cut off above and to the sides; it must equal the
    # predicted rectangle-plus-row exactly, for every one of the 100 logits.
    kernel_sizes, size = (5, 3, 3), 10
    jac = self._image_jacobian(kernel_sizes, size)
    for i in range(size * size):
      r, c = divmod(i, size)
      support = _predicted_support(kernel_sizes, size, r, c).reshape(-1)
      np.testing.assert_array_equal(jac[i] != 0, support, err_msg=f"pixel {(r, c)}")


  @chex.variants(with_jit=True)
  def test_sa_vae_masking_support_is_its_receptive_field_with_the_blind_spot(self):
    kernel_sizes, size = (5, 3, 3), 10
    jac = self._image_jacobian(kernel_sizes, size, sa_vae_masking=True)
    for i in range(size * size):
      r, c = divmod(i, size)
      support = _sa_vae_predicted_support(kernel_sizes, size, r, c).reshape(-1)
      np.testing.assert_array_equal(jac[i] != 0, support, err_msg=f"pixel {(r, c)}")
    # Autoregressive, but blind: the deep stack that sees every earlier pixel without the
    # shift misses (r-1, c+3) (beyond the first 5-wide kernel's reach) with it.
    jac = self._image_jacobian((5, 5, 5, 3, 3), 8, sa_vae_masking=True)
    i, j = np.indices(jac.shape)
    self.assertTrue(np.all(jac[j >= i] == 0), "a logit depends on its own or a later pixel")
    r, c = 5, 2
    self.assertEqual(jac[r * 8 + c, (r - 1) * 8 + c + 3], 0)
    self.assertNotEqual(self._image_jacobian((5, 5, 5, 3, 3), 8)[r * 8 + c, (r - 1) * 8 + c + 3],
                        0)


class ConditioningTest(chex.TestCase):

  @chex.variants(with_jit=True)
  def test_sa_vae_masking_makes_the_first_logit_a_constant(self):
    # Mask A hides the latent maps at the current pixel too: pixel (0, 0) sees neither x nor z;
    # every later pixel sees z.
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(5, 3, 3), sa_vae_masking=True)
    x, z = _inputs(1, 6)
    params = _random_params(model, x, z)
    logits = self.variant(lambda x, z: model.apply({"params": params}, x, z))
    jac_x, jac_z = self.variant(jax.jacrev(
        lambda x, z: model.apply({"params": params}, x, z), argnums=(0, 1)))(x, z)
    jac_x, jac_z = np.asarray(jac_x).reshape(36, -1), np.asarray(jac_z).reshape(36, -1)
    self.assertTrue(np.all(jac_x[0] == 0) and np.all(jac_z[0] == 0))
    self.assertTrue(np.all(np.abs(jac_z[1:]).sum(-1) > 0))
    self.assertEqual(float(logits(x, z)[0, 0, 0, 0]), float(logits(1 - x, z + 1.0)[0, 0, 0, 0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_logit_depends_on_z(self):
    # Including pixel (0, 0), which sees no image pixel: the latent maps are not masked.
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(5, 3, 3))
    x, z = _inputs(1, 6)
    params = _random_params(model, x, z)
    jac = self.variant(jax.jacrev(lambda z: model.apply({"params": params}, x, z)))(z)
    jac = np.asarray(jac).reshape(36, -1)             # [pixels, k]
    self.assertTrue(np.all(np.abs(jac).sum(-1) > 0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_independence(self):
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(5, 3, 3))
    x, z = _inputs(3, 6)
    params = _random_params(model, x, z)
    # d logits[b].sum() / d (x, z) for every b at once: [B (output), B, ...].
    grads = self.variant(jax.jacrev(
        lambda x, z: model.apply({"params": params}, x, z).sum((1, 2, 3)), argnums=(0, 1)))
    jac_x, jac_z = grads(x, z)
    for b in range(3):
      gx, gz = jac_x[b], jac_z[b]
      for other in range(3):
        depends = bool(jnp.any(gx[other] != 0)) and bool(jnp.any(gz[other] != 0))
        independent = bool(jnp.all(gx[other] == 0)) and bool(jnp.all(gz[other] == 0))
        self.assertTrue(depends if other == b else independent, f"logits[{b}] vs example {other}")

  def test_unconditional_model_ignores_z(self):
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(3, 3), latent_feature_maps=0)
    x, z = _inputs(2, 6)
    params = _random_params(model, x, z)
    self.assertNotIn("z_dense", params)
    chex.assert_trees_all_equal(model.apply({"params": params}, x, z),
                                model.apply({"params": params}, x, z + 1.0))

  def test_rejects_bad_shapes(self):
    model = pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(3,))
    x, z = _inputs(2, 6)
    with self.assertRaisesRegex(ValueError, r"x of shape \[B, H, W, 1\]"):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x[0], z)
    with self.assertRaisesRegex(ValueError, r"z of shape \[2, k\]"):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x, z[:1])
    with self.assertRaisesRegex(ValueError, "must be odd"):
      jax.eval_shape(pixelcnn.GatedPixelCNN(features=8, kernel_sizes=(4,)).init,
                     jax.random.PRNGKey(0), x, z)


class PaperConfigTest(chex.TestCase):

  def test_sa_vae_masking_has_sa_vaes_parameters(self):
    # sa-vae's GatedMaskedConv2d(in, F, k) per layer: v_conv (p+1) k C_in 2F + 2F, vh_conv
    # 4F^2 + 2F, h_conv (p+1) C_in 2F + 2F (one conv over the image and the 4 latent maps in
    # layer 0), h_conv_res F^2 + F; then z_linear (k + 1) 4 x 784 and the 1x1 output conv.
    model = pixelcnn.GatedPixelCNN(sa_vae_masking=True)
    x, z = _inputs(2, 28, latent_dim=32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, z)["params"]
    f, count = 32, 0
    for i, k in enumerate(model.kernel_sizes):
      p, c_in = k // 2, 5 if i == 0 else f
      count += ((p + 1) * k * c_in * 2 * f + 2 * f) + (4 * f * f + 2 * f) + (
          (p + 1) * c_in * 2 * f + 2 * f) + (f * f + f)
    count += 33 * 4 * 784 + (f + 1)
    self.assertEqual(count, 744_801)
    self.assertEqual(sum(a.size for a in jax.tree.leaves(shapes)), count)
    self.assertEqual(shapes["layer_0"]["h_conv"]["kernel"].shape, (1, 5, 5, 2 * f))
    self.assertNotIn("h_conv_cond", shapes["layer_0"])

  @chex.variants(with_jit=True)
  def test_paper_config_shape_and_744801_parameters(self):
    # Per gated layer (F = 32, C_in = 5 for layer 0, else 32, p = k // 2):
    # v_conv (p+1) k C_in 2F + 2F, vh_conv 4F^2 + 2F, h_conv (p+1) C_in 2F + 2F, h_res F^2 + F:
    # 21,344 (k = 9, layer 0) + 2 x 107,744 (9) + 3 x 70,880 (7) + 3 x 42,208 (5)
    # + 3 x 21,728 (3) = 641,280; z_dense 32 x 3136 + 3136 = 103,488; output conv 33.
    model = pixelcnn.GatedPixelCNN()
    x, z = _inputs(2, 28, latent_dim=32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, z)["params"]
    self.assertEqual(sum(a.size for a in jax.tree.leaves(shapes)), 744_801)
    self.assertEqual(sum(a.size for a in jax.tree.leaves(shapes["z_dense"])), 103_488)
    params = _random_params(model, x, z)
    apply = self.variant(lambda z: model.apply({"params": params}, x, z))
    logits = apply(z)
    chex.assert_shape(logits, (2, 28, 28, 1))
    chex.assert_tree_all_finite(logits)
    # Forward only (no backward on the paper config): a different z changes every logit.
    self.assertTrue(bool(jnp.all(apply(z + 1.0) != logits)))
