"""Neural-network building blocks: ``Module``, ``Parameter``, the layers, ``functional``
and ``init``, with PyTorch's names and constructors."""
from . import functional, init, utils
from .layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, BatchNormReLU2d, Conv2d,
                     CrossEntropyLoss, Dropout, Flatten, GlobalAvgPool2d, Identity, Linear,
                     LogSoftmax, MaxPool2d, ModuleDict, ModuleList, MSELoss, ReLU, ReLU6, Sequential,
                     Sigmoid, Softmax, Tanh)
from .module import Module, Parameter
from .fusion import fuse_bn_relu

__all__ = ["Module", "Parameter", "Sequential", "ModuleList", "ModuleDict", "Conv2d",
           "BatchNorm2d", "BatchNormReLU2d", "Linear", "ReLU", "ReLU6", "Sigmoid", "Tanh", "Softmax",
           "LogSoftmax", "AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d", "GlobalAvgPool2d",
           "Dropout", "Identity", "Flatten", "CrossEntropyLoss", "MSELoss", "fuse_bn_relu",
           "functional", "init", "utils"]
