"""gpurnn: fused GPU kernels for recurrent networks, drop-in for torch.nn."""
__version__ = "0.1.0"
