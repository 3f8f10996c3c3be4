r"""Parameter counts of the image hypernetwork designs, for a tier's encoder.

  python -m benchmarks.hypernet_params                  # the paper and cpu tiers
  python -m benchmarks.hypernet_params --tiers=smoke

For each tier's ResNet encoder and each design (iavae_jax.hypernets.HYPERNETS, with its default
fields; plus ha with block gains, and ha on a learned 16-number projection of the context),
counts the hypernetwork's parameters for three contexts: the
flattened image (784 numbers), the frozen encoder's [mean; log-variance] (2 x latent_dim) and its
penultimate feature (the input of its output layers). Shapes only (jax.eval_shape): nothing is
initialised. Prints a table, then one JSON object.
"""

import json

from absl import app, flags

from experiments import configs

FLAGS = flags.FLAGS
flags.DEFINE_list("tiers", ["paper", "cpu"], "Which tiers' encoders.")

# label -> (design, its fields besides the configuration's embedding sizes, projection size or 0)
DESIGNS = {"paper": ("paper", {}, 0), "ha": ("ha", {}, 0),
           "ha+gains": ("ha", {"block_gains": True}, 0), "ha+proj16": ("ha", {}, 16),
           "mlp": ("mlp", {}, 0)}


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from iavae_jax import adaptive, blocks, hypernets
  from iavae_jax.models import encoders

  result = {}
  for tier in FLAGS.tiers:
    config = configs.image_config("mnist", tier)
    encoder = encoders.ResNetEncoder(config.encoder_channels, config.latent_dim)
    x = jnp.zeros((1, 28, 28, 1))
    variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x)
    feature = jax.eval_shape(lambda v: adaptive.submodule_input(encoder, v, "mean", x), variables)
    layout = blocks.BlockLayout.from_tree(variables["params"])
    contexts = {"image": 28 * 28, "encoder": 2 * config.latent_dim,
                "penultimate": feature.shape[-1]}
    counts = {}
    for label, (name, fields, projection) in DESIGNS.items():
      if name != "ha":
        fields = dict(fields, input_embed_dim=config.input_embed_dim)
      hypernet = hypernets.make_hypernet(name, layout, block_embed_dim=config.block_embed_dim,
                                         **fields)
      if projection:
        hypernet = hypernets.ProjectedContext(hypernet, projection)
      counts[label] = {context: hypernets.num_params(hypernet, size)
                       for context, size in contexts.items()}
    result[tier] = {"encoder": layout.num_params, "encoder_blocks": layout.num_blocks,
                    "context_sizes": contexts, "hypernetwork": counts}
    print(f"{tier} tier: encoder {layout.num_params:,} parameters in {layout.num_blocks} blocks")
    print(f"  {'design':<10}" + "".join(f"{f'{c} ({n})':>20}" for c, n in contexts.items()))
    for label, row in counts.items():
      print(f"  {label:<10}" + "".join(f"{n:>20,}" for n in row.values()))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
