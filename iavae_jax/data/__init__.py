"""Data sets: the synthetic oracle model; MNIST, Fashion-MNIST and Omniglot from TFDS or local
files.

The names ``images.load`` accepts live here, free of JAX, so that command lines can list them
before importing it.
"""

__all__ = ["DATASETS", "SOURCES"]

DATASETS = ("mnist", "fashion_mnist", "omniglot", "binarized_mnist")   # images.load's data sets
SOURCES = ("auto", "local", "tfds")   # where images.load reads them (see images.load)
