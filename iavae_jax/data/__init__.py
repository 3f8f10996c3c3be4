"""Data sets: the synthetic oracle model (image sets follow)."""
