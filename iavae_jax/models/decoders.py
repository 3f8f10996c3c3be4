"""A dense Bernoulli decoder p(x|z) for binarised images (the autoregressive one is pixelcnn.py)."""

import math

import flax.linen as nn
import jax

__all__ = ["MLPDecoder"]


class MLPDecoder(nn.Module):
  """Independent Bernoulli pixels given z: z [B, k] -> a ReLU layer per width in ``hidden`` ->
  logits [B, H, W, C] shaped like the images x.

  Called as GatedPixelCNN is, decoder(x, z); x gives only the output's shape, since the pixels
  are independent given z (so the logits do not depend on x's values).
  """
  hidden: tuple[int, ...] = (200, 200)

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    h = z
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(math.prod(x.shape[1:]))(h).reshape(x.shape)
