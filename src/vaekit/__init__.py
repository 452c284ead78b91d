"""vaekit: variational autoencoders in PyTorch."""
__version__ = "0.1.0"
