"""Folding each batch norm into the convolution before it, for inference.

In eval mode a batch norm is a fixed per-channel affine map, so it can live in the
preceding convolution's weight and bias: the same outputs (to float rounding) without a
separate pass over every activation map, which on a GPU is memory-bound work as long as
the convolution itself.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(model: nn.Module) -> int:
    """Replace every ``Conv2d`` directly followed by ``BatchNorm2d`` inside an ``nn.Sequential``
    by one fused ``Conv2d`` (and the batch norm by ``nn.Identity``), in place.

    The model must be in eval mode: folding uses the running statistics, so a folded model
    can no longer train its batch norms.

    Returns:
        How many batch norms were folded.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode")
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = nn.Identity()
                folded += 1
    return folded
