"""IA-VAE stage 2 on your own Flax encoder, in a plain Optax loop: python examples/own_encoder.py

Stage 1 trains a VAE of our own (MLP encoder and decoder; toy 28x28 images of random rows and
columns; load yours instead). Stage 2 freezes its encoder parameters as phi_AVI and trains only a
hypernetwork psi giving every image its own encoder, phi(x) = phi_AVI + h(x; psi) (the paper also
fine-tunes the decoder), with the image experiments' defaults (the "mlp" design, its initial scale,
the normalised image as its input, learning rate 1e-4), on the modulated path (no example's
parameters formed). Then the same with the decoder's feedback: the hypernetwork also sees the
encoder's current guess and the ELBO's gradient there, over two passes; and with the deltas on
the encoder's output layers only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from iavae_jax import adaptive, blocks, distributions, feedback, hypernets, modulated, objectives

LATENT, BATCH = 8, 64


class Encoder(nn.Module):  # images [..., 28, 28] -> mean [..., LATENT], log_var [..., LATENT]
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(16)(x.reshape(*x.shape[:-2], -1)))
    return nn.Dense(LATENT)(h), nn.Dense(LATENT)(h)


class Decoder(nn.Module):  # z [..., LATENT] -> Bernoulli logits [..., 28, 28]
  @nn.compact
  def __call__(self, z):
    return nn.Dense(28 * 28)(nn.relu(nn.Dense(128)(z))).reshape(*z.shape[:-1], 28, 28)


encoder, decoder = Encoder(), Decoder()
rows, cols = jax.random.bernoulli(jax.random.PRNGKey(0), 0.1, (2, 2560, 28))
images = (rows[:, :, None] | cols[:, None, :]).astype(jnp.float32)  # [N, 28, 28] in {0, 1}
train, test = images[:2048], images[2048:]


def log_likelihood_fn(theta, x):  # z [S, B, LATENT] -> log p(x | z) [S, B] for x [B, 28, 28]
  return lambda z: distributions.bernoulli_log_likelihood(
      x, decoder.apply({"params": theta}, z), event_ndim=2)


def elbo(encode, theta, x, key, num_samples=1):  # encode: x [B, 28, 28] -> mean, log_var [B, k]
  mean, log_var = encode(x)
  eps = jax.random.normal(key, (num_samples, *mean.shape))
  return objectives.elbo(eps, mean, log_var, log_likelihood_fn(theta, x)).elbo.mean()


def fit(loss, params, steps, learning_rate):  # loss(params, x, key) -> scalar; Adam on batches
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def train_step(params, opt_state, step, key):
    x = jax.lax.dynamic_slice_in_dim(train, step * BATCH % len(train), BATCH)
    updates, opt_state = optimizer.update(jax.grad(loss)(params, x, key), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for step, key in enumerate(jax.random.split(jax.random.PRNGKey(2), steps)):
    params, opt_state = train_step(params, opt_state, step, key)
  return params


# Stage 1: the VAE, its batched encoder the per-example one vmapped.
vae_encode = lambda phi: jax.vmap(lambda x_i: encoder.apply({"params": phi}, x_i))
vae = {"encoder": encoder.init(jax.random.PRNGKey(3), train[0])["params"],
       "decoder": decoder.init(jax.random.PRNGKey(4), jnp.zeros(LATENT))["params"]}
vae = fit(lambda p, x, key: -elbo(vae_encode(p["encoder"]), p["decoder"], x, key), vae, 1000, 1e-3)
phi_avi, theta = vae["encoder"], vae["decoder"]
# Stage 2: phi_AVI and the decoder frozen; the default design sees the normalised image. The
# deltas are applied without forming any example's parameters (modulated_encode); the same
# encoder with every example's parameters formed and vmapped, the paper's literal form, is
# adaptive.instance_adaptive_encode(lambda phi, x_i: encoder.apply({"params": phi}, x_i),
# lambda psi, c_i: hypernet.apply({"params": psi}, c_i), phi_avi, psi, x, context): equal to
# float rounding, a little slower on this small encoder and far slower on wide ones.
hypernet = hypernets.make_hypernet("mlp", blocks.BlockLayout.from_tree(phi_avi))
iavae_encode = lambda psi: lambda x: modulated.modulated_encode(
    lambda phi, x: encoder.apply({"params": phi}, x), hypernet, phi_avi, psi, x,
    context=adaptive.normalized_context(x))
test_elbo = jax.jit(lambda psi: elbo(iavae_encode(psi), theta, test, jax.random.PRNGKey(5), 10))
psi = hypernet.init(jax.random.PRNGKey(6), jnp.zeros(28 * 28))["params"]
before = float(test_elbo(psi))  # = the VAE's, up to the ~1e-5 initial deltas (Proposition 1)
psi = fit(lambda psi, x, key: -elbo(iavae_encode(psi), theta, x, key), psi, 500, 1e-4)
print(f"test ELBO before stage 2 (the VAE): {before:.2f} nats per image")
print(f"test ELBO after stage 2 (IA-VAE):   {float(test_elbo(psi)):.2f} nats per image")

# Stage 2 with the decoder's feedback: at each of 2 passes the hypernetwork sees [the normalised
# image; the current mean and log-variance; the ELBO's gradient there, 8 fixed samples,
# preprocessed], and adds a delta to every image's encoder parameters.
eps = jax.random.normal(jax.random.PRNGKey(7), (8, LATENT))


def feedback_context(x):  # (pass t, mean, log_var [B, LATENT]) -> the hypernetwork's input
  def context(t, mean, log_var):
    grads = feedback.elbo_gradient(log_likelihood_fn(theta, x), mean, log_var, eps)
    return feedback.context(adaptive.normalized_context(x), mean, log_var,
                            feedback.preprocess_gradient(jnp.concatenate(grads, axis=-1)))
  return context


def feedback_stage_2(layout):  # a hypernetwork laid out over `layout` trained; its test ELBO
  hypernet = hypernets.make_hypernet("mlp", layout)
  encode = lambda psi: lambda x: modulated.iterative_encode(
      lambda phi, x: encoder.apply({"params": phi}, x), hypernet, phi_avi, psi, x,
      feedback_context(x), num_passes=2)
  psi = hypernet.init(jax.random.PRNGKey(8), jnp.zeros(28 * 28 + 6 * LATENT))["params"]
  psi = fit(lambda psi, x, key: -elbo(encode(psi), theta, x, key), psi, 500, 1e-4)
  return float(jax.jit(lambda psi: elbo(encode(psi), theta, test, jax.random.PRNGKey(5), 10))(psi))


print(f"test ELBO after stage 2 with the decoder's feedback (2 passes, 32 decoder passes per "
      f"image): {feedback_stage_2(blocks.BlockLayout.from_tree(phi_avi)):.2f} nats per image")
# The same with deltas on the encoder's output layers only (mean and log-variance; the hidden
# layer keeps phi_AVI's weights): a hypernetwork laid out over a selection of the blocks.
output_layers = blocks.BlockLayout.from_tree(blocks.select(phi_avi, "^Dense_[12]/"))
print(f"test ELBO after stage 2 with the decoder's feedback, deltas on "
      f"{', '.join(output_layers.paths)} only: {feedback_stage_2(output_layers):.2f} nats per "
      "image")
