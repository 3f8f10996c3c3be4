"""Gated PixelCNN decoder p(x|z) for binarised images: the decoder of Kim et al.'s (2018)
semi-amortized VAE image model (harvardnlp/sa-vae, models_img.py), after van den Oord et al.
(2016), "Conditional Image Generation with PixelCNN Decoders".

Masking is done by shifted convolutions (explicit one-sided padding plus a one-pixel shift), so
no kernel entry is ever multiplied by a constant zero. Writing r, c for row and column and p = k//2
for a layer of kernel size k:

* vertical stack: a (p+1) x k kernel padded p rows above and none below, so v at (r, c) sees the
  previous v at rows r-p..r, columns c-p..c+p. It sees its own row; that is harmless because v is
  handed to the horizontal stack only after a one-row shift down (rows < r).
* horizontal stack: a 1 x (p+1) kernel padded p columns on the left, so h at (r, c) sees the
  previous h at columns c-p..c of row r. In the first layer (mask A) the image part of this conv
  is shifted one column right (columns c-p-1..c-1: the current pixel is not visible); later layers
  (mask B) see the current position, which by induction carries no information about x[r, c].

No blind spot: after L layers with P = p_1 + ... + p_L, v at (r, c) covers the full rectangle
rows r-P..r x columns c-P..c+P (a composition of rectangles is a rectangle), so the logit at
(r, c) sees every pixel of rows r-1-P..r-1 within columns c-P..c+P (including those up and to the
right, which a single masked stack misses) plus row r at columns c-1-P..c-1. Once P covers the
image, that is every earlier pixel in raster order and nothing else.

Two deliberate departures from sa-vae, both keeping its parameter count:
* sa-vae shifts the vertical stack itself down a row in every layer, so layer l's vertical stack
  only reaches rows <= r-l and the pixel just above-right of the first kernel's reach, e.g.
  (r-1, c+p_1+1), is never visible however deep the stack; here the shift is applied only on the
  vertical -> horizontal link, as in van den Oord et al.
* mask A applies to the image channel only. The latent feature maps are not autoregressive
  variables, so the first horizontal conv sees them at the current pixel too; otherwise the logit
  of pixel (0, 0) would depend on neither x nor z.

``sa_vae_masking=True`` undoes both, for numbers comparable with Kim et al.'s: the vertical stack
is shifted in every layer, and mask A covers the latent maps too (one h_conv over the image and
the maps, shifted right), so the logit of pixel (0, 0) is a constant. Its receptive field, with
P_l = p_1 + ... + p_l and P = P_L: row r at columns c-1-P..c-1, and for each layer l the rows
r-l-P_l..r-l at columns c-P..c+P_l; the pixels above-right outside that (the blind spot) are
never seen. Same parameters, same shapes.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GatedMaskedConv", "GatedPixelCNN"]


def _shift_down(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C]: row r holds row r-1 of x, row 0 is zero."""
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def _shift_right(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C]: column c holds column c-1 of x, column 0 is zero."""
  return jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def _gate(x: jax.Array) -> jax.Array:
  """[..., 2F] -> [..., F]: tanh(first half) * sigmoid(second half)."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * nn.sigmoid(b)


class GatedMaskedConv(nn.Module):
  """One gated layer of both stacks. (v, h): [B, H, W, C_in] each -> [B, H, W, features] each.

  For mask "A", h must be the layer input (image and latent maps) and ``image_channels`` says how
  many leading channels of h are image channels (masked); the rest are conditioning maps
  (unmasked). Mask "B" adds h to the output (residual), so h must have ``features`` channels.
  ``shift_vertical_stack``: the vertical output is shifted down a row too, as sa-vae does (a
  blind spot; see the module docstring).
  Parameters: v_conv (p+1) k C_in 2F + 2F, vh_conv 4F^2 + 2F, h_conv (p+1) C_in 2F + 2F,
  h_res F^2 + F.
  """
  features: int
  kernel_size: int
  mask_type: str = "B"
  image_channels: int = 1
  shift_vertical_stack: bool = False

  @nn.compact
  def __call__(self, v: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.kernel_size < 1 or self.kernel_size % 2 != 1:
      raise ValueError(f"GatedMaskedConv: kernel_size must be odd, got {self.kernel_size}.")
    if self.mask_type not in ("A", "B"):
      raise ValueError(f"GatedMaskedConv: mask_type must be 'A' or 'B', got {self.mask_type!r}.")
    p = self.kernel_size // 2
    two_f = 2 * self.features

    v_pre = nn.Conv(two_f, (p + 1, self.kernel_size), padding=((p, 0), (p, p)), name="v_conv")(v)
    v_shifted = _shift_down(v_pre)
    # 1x1 after the shift (as sa-vae), so row 0 gets the bias only: nothing lies above it.
    vh = nn.Conv(two_f, (1, 1), name="vh_conv")(v_shifted)

    h_conv = lambda name, use_bias: nn.Conv(two_f, (1, p + 1), padding=((0, 0), (p, 0)),
                                            use_bias=use_bias, name=name)
    if self.mask_type == "A":
      image, cond = h[..., :self.image_channels], h[..., self.image_channels:]
      h_pre = _shift_right(h_conv("h_conv", True)(image))
      if cond.shape[-1]:
        # The bias lives in h_conv; together the two convs have sa-vae's h_conv shapes.
        h_pre = h_pre + h_conv("h_conv_cond", False)(cond)
    else:
      h_pre = h_conv("h_conv", True)(h)

    h_out = nn.Conv(self.features, (1, 1), name="h_res")(_gate(h_pre + vh))
    if self.mask_type == "B":
      h_out = h_out + h
    return _gate(v_shifted if self.shift_vertical_stack else v_pre), h_out


class GatedPixelCNN(nn.Module):
  """Gated PixelCNN decoder conditioned on z. (x [B, H, W, 1] in {0, 1}, z [B, k]) -> logits
  [B, H, W, 1] of independent Bernoullis, logit (r, c) a function of z and the pixels before
  (r, c) in raster order only.

  z enters as ``latent_feature_maps`` maps of H x W (a Dense layer, He-normal as sa-vae's
  he_init) concatenated to the image; ``latent_feature_maps = 0`` gives an unconditional model
  (z ignored). One GatedMaskedConv per entry of ``kernel_sizes`` (the first mask A), then a 1x1
  conv to one channel. The paper config (32 features, kernels (9,9,9,7,7,7,5,5,5,3,3,3), 4 maps,
  k = 32, 28 x 28) has 744,801 parameters: 641,280 in the gated layers, 103,488 in the Dense
  layer (3,136 (k + 1)), 33 in the output conv. ``sa_vae_masking``: Kim et al.'s masking
  exactly, blind spot included (see the module docstring); the same parameters.
  """
  features: int = 32
  kernel_sizes: Sequence[int] = (9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3)
  latent_feature_maps: int = 4
  sa_vae_masking: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f"GatedPixelCNN: expected x of shape [B, H, W, 1], got {x.shape}.")
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
      raise ValueError(f"GatedPixelCNN: expected z of shape [{x.shape[0]}, k], got {z.shape}.")
    if not self.kernel_sizes:
      raise ValueError("GatedPixelCNN: kernel_sizes is empty.")
    batch, height, width, _ = x.shape

    inputs = x
    if self.latent_feature_maps > 0:
      he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
      z_maps = nn.Dense(height * width * self.latent_feature_maps, kernel_init=he_normal,
                        name="z_dense")(z)
      z_maps = z_maps.reshape(batch, height, width, self.latent_feature_maps)
      inputs = jnp.concatenate([x, z_maps.astype(x.dtype)], axis=-1)

    # sa-vae's mask A hides the latent maps at the current pixel too: all channels are masked.
    masked = inputs.shape[-1] if self.sa_vae_masking else x.shape[-1]
    v = h = inputs
    for i, kernel_size in enumerate(self.kernel_sizes):
      v, h = GatedMaskedConv(self.features, kernel_size, "A" if i == 0 else "B",
                             image_channels=masked, shift_vertical_stack=self.sa_vae_masking,
                             name=f"layer_{i}")(v, h)
    return nn.Conv(1, (1, 1), name="logits")(h)
