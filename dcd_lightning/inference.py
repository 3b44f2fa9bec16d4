"""`optimize_for_inference(model)`: put a model in eval mode with every DCD layer's constants folded."""

from __future__ import annotations

from torch import nn


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Switch `model` to eval mode and fold each DCD layer's eval-mode constants; returns `model`.

    Outputs are unchanged (to rounding): each DCD layer's latent batch norms, gate range and the
    two heads of its dynamic branch are folded into a few tensors (see ops/_folded.py), which
    forward() uses under torch.no_grad() or torch.inference_mode(). Layers choose per call between
    forming each sample's kernel and applying Q, Phi, P to the activations, by multiply-adds; one
    sample runs as one plain convolution. Call it again after changing the weights; .train()
    drops the folds. Other layers are left as they are.
    """
    model.eval()
    for module in model.modules():
        fold = getattr(module, "fold_for_inference", None)
        if callable(fold):
            fold()
    return model
