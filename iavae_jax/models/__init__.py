"""Encoders and decoders. Modules return distribution parameters; losses live in objectives."""

__all__ = []   # the modules: decoders, encoders, oracle, pixelcnn
