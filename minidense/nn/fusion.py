"""Fusion: a batch norm and the ReLU after it run as one op.

    self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU()
    ...
    fuse_bn_relu(self, ("norm1", "relu1"))     # at the end of __init__

    def forward(self, x):
        return self.conv1(self.relu1(self.norm1(x)))    # BN, then ReLU, then Conv

The forward keeps reading as the paper draws it.  What runs is one op
(``md.batch_norm_relu``): ``norm1`` becomes an ``nn.BatchNormReLU2d`` (the same
Parameters and buffers under the same names, so the state dict does not change) and
``relu1`` an ``nn.Identity``.  The fused op makes one pass over memory fewer each way
and keeps no ReLU output; on the GPU it is one kernel per pass.  This is PyTorch's
``torch.ao.quantization.fuse_modules`` for the (BatchNorm2d, ReLU) pair.

Only the module knows that its forward computes relu(norm(x)) and that nothing else
reads the BN's output, so it names the pairs itself.  Under ``md.plain_ops()`` the
fused module runs BN and ReLU as two ops again.
"""
from __future__ import annotations

from .layers import BatchNorm2d, BatchNormReLU2d, Identity, ReLU


def fuse_bn_relu(module, *pairs):
    """For each (bn_name, relu_name) of ``module``'s children: the BN becomes its fused
    version, the ReLU the identity, in place.  Returns ``module``."""
    for bn_name, relu_name in pairs:
        bn, relu = getattr(module, bn_name, None), getattr(module, relu_name, None)
        if not isinstance(bn, BatchNorm2d) or isinstance(bn, BatchNormReLU2d):
            raise TypeError(f"fuse_bn_relu: {type(module).__name__}.{bn_name} must be an unfused "
                            f"BatchNorm2d, got {type(bn).__name__}")
        if type(relu) is not ReLU:
            raise TypeError(f"fuse_bn_relu: {type(module).__name__}.{relu_name} must be a ReLU, "
                            f"got {type(relu).__name__}")
        bn.__class__ = fused_class(type(bn))   # the same object: its tensors stay as they are
        setattr(module, relu_name, Identity())
    return module


_FUSED = {BatchNorm2d: BatchNormReLU2d}   # minidense.distributed adds its SyncBatchNorm2d


def fused_class(bn_class):
    """The BN-ReLU class of a BN class (BatchNorm2d -> BatchNormReLU2d)."""
    if bn_class not in _FUSED:
        raise TypeError(f"fuse_bn_relu: no fused version of {bn_class.__name__}")
    return _FUSED[bn_class]
