"""vectorlay: an overlay network for GPU inference on machines other people own."""

__version__ = "0.1.0"
