"""dcd-lightning: Dynamic Convolution Decomposition (Li et al., ICLR 2021) on PyTorch Lightning."""

from .inference import optimize_for_inference
from .models import create_model, list_models, load_official_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_official_checkpoint", "optimize_for_inference"]
