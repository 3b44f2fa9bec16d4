"""dcd-lightning: Dynamic Convolution Decomposition (Li et al., ICLR 2021) on PyTorch Lightning."""

__version__ = "0.1.0"
