"""Backbones that take their convolution operators as injected factories, and the model registry."""

from .mobilenetv2 import MobileNetV2
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model
from .resnet import ResNet

__all__ = ["MobileNetV2", "ModelSpec", "ResNet", "create_model", "get_model_spec", "list_models", "register_model"]
