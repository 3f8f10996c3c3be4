"""Encoders and decoders. Modules return distribution parameters; losses live in objectives."""
