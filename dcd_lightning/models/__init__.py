"""Backbones that take their convolution operators as injected factories, and the model registry."""

from .factories import ConvFactory, LinearFactory
from .mobilenetv2 import MobileNetV2
from .registry import ModelSpec, OpSpec, create_model, get_model_spec, list_models, op, register_model
from .resnet import ResNet
from .weights import LoadReport, convert_official_state_dict, load_official_checkpoint, warm_start

__all__ = [
    "ConvFactory",
    "LinearFactory",
    "LoadReport",
    "MobileNetV2",
    "ModelSpec",
    "OpSpec",
    "ResNet",
    "convert_official_state_dict",
    "create_model",
    "get_model_spec",
    "list_models",
    "load_official_checkpoint",
    "op",
    "register_model",
    "warm_start",
]
