"""iavae_jax: instance-adaptive variational autoencoders in JAX/Flax.

Pure functions over PyTrees; no flags (``experiments/`` holds the command lines), and files are
read or written only where that is the job: ``checkpoints`` (Orbax), ``stages`` and ``progress``
(a training stage's checkpoints, progress lines and metrics.jsonl), ``runs`` (a run's directory
and its results files) and ``data`` (the data sets).
Every module lists its public names in ``__all__``; CHANGELOG.md records their changes.
"""

__all__ = ["__version__"]

__version__ = "0.4.0"
