"""Backbones that take their convolution operators as injected factories."""

from .resnet import ResNet

__all__ = ["ResNet"]
