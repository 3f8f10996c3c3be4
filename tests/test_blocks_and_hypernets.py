"""Block layout, the linear hypernetwork, modulation and the instance-adaptive encoder."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from iavae_jax import adaptive, blocks, hypernets
from iavae_jax.models import encoders


def _setup(width=2):
  encoder = encoders.MLPEncoder(width)
  x = jax.random.normal(jax.random.PRNGKey(0), (7, 3))
  phi = encoder.init(jax.random.PRNGKey(1), x[0])["params"]
  layout = blocks.BlockLayout.from_tree(phi)
  hypernet = hypernets.LinearHypernet(layout)
  psi = hypernet.init(jax.random.PRNGKey(2), x[0])["params"]
  encoder_apply = lambda p, xi: encoder.apply({"params": p}, xi)
  hypernet_apply = lambda p, xi: hypernet.apply({"params": p}, xi)
  return x, phi, psi, layout, encoder_apply, hypernet_apply


class BlocksTest(chex.TestCase):

  def test_paper_parameter_counts(self):
    _, phi, psi, layout, _, _ = _setup()
    self.assertEqual(layout.num_blocks, 4)                  # W1, b1, W2, b2
    self.assertEqual(sorted(layout.sizes), [2, 4, 6, 8])
    self.assertEqual(layout.d_max, 8)
    self.assertEqual(layout.num_params, 20)                 # the base encoder
    chex.assert_shape(psi["W"], (8, 3 + 2))
    chex.assert_shape(psi["b"], (8,))
    chex.assert_shape(psi["block_embeddings"], (4, 2))
    self.assertEqual(psi["W"].size + psi["b"].size, 48)      # 20 + 48 = the paper's 68
    for h in range(2, 21, 2):
      params = jax.eval_shape(encoders.MLPEncoder(h).init, jax.random.PRNGKey(0),
                              jnp.zeros(3))["params"]
      self.assertEqual(blocks.BlockLayout.from_tree(params).num_params, 8 * h + 4)

  def test_flatten_unflatten_round_trip(self):
    _, phi, _, layout, _, _ = _setup()
    rows = layout.flatten(phi)
    chex.assert_shape(rows, (4, 8))
    chex.assert_trees_all_equal(layout.unflatten(rows), phi)
    with self.assertRaisesRegex(ValueError, r"expected rows of shape \[4, >=8\]"):
      layout.unflatten(jnp.zeros((3, 8)))

  def test_select_keeps_the_matching_blocks_at_their_paths(self):
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "mean": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)}}
    self.assertIs(blocks.select(params, ""), params)
    chosen = blocks.select(params, "^mean/|bias$")
    self.assertEqual(blocks.BlockLayout.from_tree(chosen).paths,
                     ("Dense_0/bias", "mean/bias", "mean/kernel"))
    self.assertIs(chosen["mean"]["kernel"], params["mean"]["kernel"])
    layout = blocks.BlockLayout.from_tree(chosen)
    self.assertEqual(layout.check_within("t", params), blocks.BlockLayout.from_tree(params))
    with self.assertRaisesRegex(ValueError, r"^select: no block path matches 'log_var'; the paths "
                                            r"are Dense_0/bias, Dense_0/kernel, mean/bias"):
      blocks.select(params, "log_var")
    with self.assertRaisesRegex(ValueError, r"^--only: '\(' is not a regular expression"):
      blocks.select(params, "(", owner="--only")
    with self.assertRaisesRegex(ValueError, r"t: the hypernetwork's block 'mean/bias' \(4,\) is "
                                            r"not in the encoder's parameters"):
      layout.check_within("t", {"Dense_0": params["Dense_0"]})
    moved = adaptive.modulate(params, {"mean": {"bias": jnp.ones(4)}})
    chex.assert_trees_all_equal(moved["mean"]["bias"], jnp.ones(4))
    chex.assert_trees_all_equal({**moved, "mean": {**moved["mean"], "bias": jnp.zeros(4)}}, params)
    with self.assertRaisesRegex(ValueError, r"modulate: the hypernetwork's block 'log_var/bias' "):
      adaptive.modulate(params, {"log_var": {"bias": jnp.ones(4)}})

  def test_hypernet_rejects_a_batch(self):
    x, _, psi, _, _, hypernet_apply = _setup()
    with self.assertRaisesRegex(ValueError, "one example"):
      hypernet_apply(psi, x)

  def test_instance_adaptive_encode_names_a_context_of_another_batch(self):
    x, phi, psi, _, encoder_apply, hypernet_apply = _setup()
    with self.assertRaisesRegex(ValueError, r"instance_adaptive_encode: x and context must share "
                                            r"their leading batch axis"):
      adaptive.instance_adaptive_encode(encoder_apply, hypernet_apply, phi, psi, x,
                                        context=x[:-1])

  @chex.variants(with_jit=True, without_jit=True)
  def test_hypernet_is_w_times_concatenation(self):
    x, phi, psi, layout, _, hypernet_apply = _setup()
    deltas = self.variant(hypernet_apply)(psi, x[0])
    chex.assert_trees_all_equal_shapes(deltas, phi)
    inputs = jnp.concatenate([jnp.tile(x[0], (4, 1)), psi["block_embeddings"]], 1)
    rows = inputs @ psi["W"].T + psi["b"]
    chex.assert_trees_all_close(deltas, layout.unflatten(rows), atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_proposition_1_zero_output_layer_gives_base_encoder(self):
    x, phi, psi, _, encoder_apply, hypernet_apply = _setup()
    psi_zero = dict(psi, W=jnp.zeros_like(psi["W"]), b=jnp.zeros_like(psi["b"]))
    encode = self.variant(lambda p, x: adaptive.instance_adaptive_encode(
        encoder_apply, hypernet_apply, phi, p, x))
    # Every example's parameters are exactly phi_AVI ...
    per_example = jax.vmap(lambda xi: adaptive.adaptive_encoder_params(
        hypernet_apply, phi, psi_zero, xi))(x)
    chex.assert_trees_all_equal(per_example, jax.tree.map(lambda a: jnp.stack([a] * 7), phi))
    # ... so the outputs are the base encoder's (up to float32 summation order: a batched
    # per-example matmul against one shared matmul).
    mean, log_var = encode(psi_zero, x)
    base_mean, base_log_var = encoder_apply(phi, x)
    chex.assert_shape((mean, log_var), ((7, 2), (7, 2)))
    chex.assert_trees_all_close((mean, log_var), (base_mean, base_log_var), atol=1e-6, rtol=0)
    # At the paper's initialisation (W ~ N(0, 1e-3^2), b = 0) the encoder is near, not at, it.
    mean_init, _ = encode(psi, x)
    self.assertGreater(float(jnp.abs(mean_init - base_mean).max()), 0.0)
    self.assertLess(float(jnp.abs(mean_init - base_mean).max()), 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmapped_encoder_equals_python_loop(self):
    x, phi, psi, _, encoder_apply, hypernet_apply = _setup()
    psi = dict(psi, W=psi["W"] * 300.0)   # deltas large enough to matter
    mean, log_var = self.variant(lambda x: adaptive.instance_adaptive_encode(
        encoder_apply, hypernet_apply, phi, psi, x))(x)
    for i in range(x.shape[0]):
      phi_i = adaptive.modulate(phi, hypernet_apply(psi, x[i]))
      m_i, lv_i = encoder_apply(phi_i, x[i])
      chex.assert_trees_all_close((mean[i], log_var[i]), (m_i, lv_i), atol=1e-5)
    # And a different example really gets a different encoder.
    phi_0 = adaptive.adaptive_encoder_params(hypernet_apply, phi, psi, x[0])
    phi_1 = adaptive.adaptive_encoder_params(hypernet_apply, phi, psi, x[1])
    self.assertFalse(np.allclose(phi_0["Dense_0"]["kernel"], phi_1["Dense_0"]["kernel"]))

  def test_pad_hidden_is_the_same_function(self):
    x, phi, _, _, encoder_apply, _ = _setup()
    wide = encoders.pad_hidden(phi, 6)
    chex.assert_shape(wide["Dense_0"]["kernel"], (3, 6))
    wide_apply = lambda p, xi: encoders.MLPEncoder(6).apply({"params": p}, xi)
    chex.assert_trees_all_close(wide_apply(wide, x), encoder_apply(phi, x), atol=1e-6)
    with self.assertRaisesRegex(ValueError, "smaller"):
      encoders.pad_hidden(phi, 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_examples_last_forms_compute_the_per_example_modules(self):
    # The populations train with these (faster on CPU); evaluation uses the Flax modules.
    x, phi, psi, layout, encoder_apply, hypernet_apply = _setup()
    psi = dict(psi, W=psi["W"] * 300.0)   # deltas large enough to matter
    deltas = self.variant(lambda p, x: hypernets.linear_hypernet_deltas_examples_last(
        p, layout, x))(psi, x.T)
    chex.assert_trees_all_close(deltas, jax.tree.map(
        lambda a: jnp.moveaxis(a, 0, -1), jax.vmap(lambda xi: hypernet_apply(psi, xi))(x)),
        atol=1e-6)

    def losses(p):   # a scalar function of the outputs and its gradient, both ways
      mean, log_var = adaptive.instance_adaptive_encode(encoder_apply, hypernet_apply, phi, p, x)
      mean_t, log_var_t = encoders.mlp_encode_examples_last(adaptive.modulate_examples_last(
          phi, hypernets.linear_hypernet_deltas_examples_last(p, layout, x.T)), x.T)
      chex.assert_shape((mean_t, log_var_t), ((2, 7), (2, 7)))
      return (jnp.sum(jnp.sin(mean) + log_var ** 2),
              jnp.sum(jnp.sin(mean_t) + log_var_t ** 2))
    (value, value_t), grads = self.variant(
        lambda p: (losses(p), jax.jacrev(losses)(p)))(psi)
    np.testing.assert_allclose(value, value_t, rtol=1e-6)
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)

  def test_examples_last_encoder_takes_shared_or_padded_parameters(self):
    x, phi, _, _, encoder_apply, _ = _setup()
    for params in (phi, encoders.pad_hidden(phi, 6)):
      mean_t, log_var_t = encoders.mlp_encode_examples_last(params, x.T)
      chex.assert_trees_all_close((mean_t.T, log_var_t.T), encoder_apply(phi, x), atol=1e-6)
