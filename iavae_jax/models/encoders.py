"""Encoders mapping x to the mean and log-variance of a diagonal Gaussian q(z|x)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from iavae_jax.blocks import PyTree

__all__ = ["MLPEncoder", "mlp_encode_examples_last", "pad_hidden", "conv_as_matmul", "Conv",
           "ResidualBlock", "ResNetEncoder", "MLPImageEncoder"]


class MLPEncoder(nn.Module):
  """One hidden ReLU layer of width ``hidden``, one output layer giving mean and log-variance.

  x: [..., d] -> (mean [..., k], log_var [..., k]). Parameters: (d + 1) h + (h + 1) 2k;
  for d = 3, k = 2 that is 8h + 4 (h = 2: the paper's 20-parameter encoder).
  """
  hidden: int
  latent_dim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.relu(nn.Dense(self.hidden)(x))
    out = nn.Dense(2 * self.latent_dim)(h)
    return out[..., :self.latent_dim], out[..., self.latent_dim:]


def mlp_encode_examples_last(params: PyTree, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MLPEncoder's function on a batch whose examples lie along the last axis.

  x: [d, B] -> (mean [k, B], log_var [k, B]). ``params`` is an MLPEncoder's tree; each leaf is
  either shared by the batch (kernel [d_in, d_out], bias [d_out]) or one per example, with a
  trailing batch axis (kernel [d_in, d_out, B], bias [d_out, B]: instance-adaptive parameters).

  The same function as ``MLPEncoder.apply`` (up to float rounding), written for populations of
  small models on CPU: each layer is a broadcast product summed over its few input features, so
  XLA:CPU runs it as elementwise loops vectorised over the examples, where vmapped small matmuls
  become per-model library calls with tiny operands (benchmarks/synthetic_step.py).
  """
  def dense(h, layer):
    kernel = layer["kernel"] if layer["kernel"].ndim == 3 else layer["kernel"][..., None]
    bias = layer["bias"] if layer["bias"].ndim == 2 else layer["bias"][:, None]
    return jnp.sum(h[:, None, :] * kernel, axis=0) + bias
  out = dense(nn.relu(dense(x, params["Dense_0"])), params["Dense_1"])
  latent_dim = out.shape[0] // 2
  return out[:latent_dim], out[latent_dim:]


def pad_hidden(params: PyTree, width: int) -> PyTree:
  """Embed an MLPEncoder's params in a wider one by appending zero hidden units.

  A zero unit has zero input weights, bias and output weights, so its activation is relu(0) = 0
  and every gradient reaching its weights is zero: the padded network computes the same function,
  and under Adam (zero gradient -> zero update) it trains exactly as the narrow one. This lets
  encoders of different widths train side by side in one vmap.
  """
  hidden = params["Dense_0"]["kernel"].shape[-1]
  if width < hidden:
    raise ValueError(f"pad_hidden: width {width} is smaller than the encoder's {hidden}.")
  pad = width - hidden
  return {
      "Dense_0": {"kernel": jnp.pad(params["Dense_0"]["kernel"], ((0, 0), (0, pad))),
                  "bias": jnp.pad(params["Dense_0"]["bias"], (0, pad))},
      "Dense_1": {"kernel": jnp.pad(params["Dense_1"]["kernel"], ((0, pad), (0, 0))),
                  "bias": params["Dense_1"]["bias"]},
  }


# The SA-VAE image encoder (Kim et al. 2018, the paper's [20]) -----------------------------------

def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: str | tuple) -> jax.Array:
  """The convolution of x [N, H, W, C_in] with kernel [kh, kw, C_in, C_out], as patches @ kernel.

  Same result as ``lax.conv_general_dilated`` (NHWC/HWIO), but vmapping it over a batch of
  kernels gives a batched matmul rather than a grouped convolution, whose backward pass is far
  slower on CPU (docs/devices.md). The patches are strided slices of the padded input, so their
  gradient is slicing and padding too (``lax.conv_general_dilated_patches`` has a convolution
  as its gradient, and made the vmapped encoder's backward pass slower too). The
  instance-adaptive encoder uses this form.
  """
  kh, kw, c_in, c_out = kernel.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  (sh, sw), (h, w) = strides, x.shape[1:3]
  out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
  patches = jnp.concatenate(
      [x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
       for i in range(kh) for j in range(kw)], axis=-1)   # [N, out_h, out_w, kh * kw * C_in]
  return patches @ kernel.reshape(kh * kw * c_in, c_out)


# PyTorch's default init, as in the reference code: kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The reference code's He init for its dense layers: N(0, 2 / fan_in).
_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's parameters (kernel [kh, kw, C_in, C_out], bias [C_out]
  unless ``use_bias`` is False).

  ``as_matmul`` selects the implementation: XLA's convolution (fast for shared weights) or
  ``conv_as_matmul`` (fast when vmapped over per-example weights). Same parameters, same result.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str | tuple = "SAME"
  as_matmul: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _torch_conv_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    if self.as_matmul:
      y = conv_as_matmul(x, kernel, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class ResidualBlock(nn.Module):
  """relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)); the shortcut is a 1x1 conv when the
  channel count changes, else the identity."""
  features: int
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    conv = lambda k: Conv(self.features, (k, k), padding="SAME", as_matmul=self.as_matmul)
    h = nn.relu(norm()(conv(3)(x)))
    h = norm()(conv(3)(h))
    shortcut = x if x.shape[-1] == self.features else conv(1)(x)
    return nn.relu(h + shortcut)


class ResNetEncoder(nn.Module):
  """SA-VAE's image encoder: for each width c in ``channels``, a residual block then a 2x2
  stride-2 convolution (28 -> 14 -> 7 -> 3); then dense maps to the mean and log-variance.

  x: [B, H, W, 1] -> (mean [B, k], log_var [B, k]). ``train`` uses batch statistics and updates
  the running averages (call with ``mutable=["batch_stats"]``); ``train=False`` uses the running
  averages, which is how stage 2 freezes them.
  """
  channels: tuple[int, ...] = (64, 64, 64)
  latent_dim: int = 32
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    h = x
    for c in self.channels:
      h = ResidualBlock(c, self.as_matmul)(h, train)
      h = Conv(c, (2, 2), strides=(2, 2), padding="VALID", as_matmul=self.as_matmul)(h)
    h = h.reshape(h.shape[0], -1)
    mean = nn.Dense(self.latent_dim, kernel_init=_he_normal, name="mean")(h)
    log_var = nn.Dense(self.latent_dim, kernel_init=_he_normal, name="log_var")(h)
    return mean, log_var


class MLPImageEncoder(nn.Module):
  """A dense image encoder (the kind Cremer et al. 2018 measured the inference gaps of): the
  image flattened, a ReLU layer per width in ``hidden``, then dense maps to the mean and
  log-variance (named as ResNetEncoder's).

  x: [B, H, W, C] -> (mean [B, k], log_var [B, k]). ``train`` is accepted for ResNetEncoder's
  call and unused (no batch norm).
  """
  hidden: tuple[int, ...] = (200,)
  latent_dim: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    del train
    h = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      h = nn.relu(nn.Dense(width, kernel_init=_he_normal)(h))
    mean = nn.Dense(self.latent_dim, kernel_init=_he_normal, name="mean")(h)
    log_var = nn.Dense(self.latent_dim, kernel_init=_he_normal, name="log_var")(h)
    return mean, log_var
