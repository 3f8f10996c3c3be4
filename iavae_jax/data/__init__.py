"""Data sets: the synthetic oracle model; MNIST, Fashion-MNIST and Omniglot from TFDS or local files."""
