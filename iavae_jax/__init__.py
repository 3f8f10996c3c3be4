"""iavae_jax: instance-adaptive variational autoencoders in JAX/Flax.

The library is pure functions over PyTrees: no flags, no file I/O (see ``experiments/``).
"""

__version__ = "0.2.0"
