"""Neural-network building blocks: ``Module``, ``Parameter`` and the layers."""
from . import init
from .layers import (AvgPool2d, BatchNorm2d, BatchNormReLU2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Identity,
                     Linear, MaxPool2d, ModuleList, ReLU, ReLU6, Sequential)
from .module import Module, Parameter
from .fusion import fuse_bn_relu

__all__ = ["Module", "Parameter", "Sequential", "ModuleList", "Conv2d", "BatchNorm2d",
           "BatchNormReLU2d", "Linear",
           "ReLU", "ReLU6", "AvgPool2d", "MaxPool2d", "GlobalAvgPool2d", "Dropout", "Identity", "Flatten",
           "fuse_bn_relu", "init"]
