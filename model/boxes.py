"""Box math against the default boxes: encoding, decoding and matching, batched over images.

Ground truth and predictions are ``(x1, y1, x2, y2)``; default boxes are ``(cx, cy, w, h)``.
All coordinates here are relative to the network input side (0-1), so they hold for any
image size; callers scale to pixels at the boundary.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_convert, box_iou

# Largest log-scale a decoded box may grow by (as torchvision's BoxCoder): exp() of an
# untrained network's raw output would otherwise overflow to inf.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(matched: torch.Tensor, defaults: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Offsets that turn each default box into its matched ground-truth box (SSD eq. 2).

    Args:
        matched: Tensor[..., A, 4] ``(x1, y1, x2, y2)``, one box per default box.
        defaults: Tensor[A, 4] ``(cx, cy, w, h)``.
        variances: (centre, size) variances, SSD's (0.1, 0.2).

    Returns:
        Tensor[..., A, 4] of ``((gx - dx) / (dw v0), (gy - dy) / (dh v0), log(gw / dw) / v1, log(gh / dh) / v1)``.
    """
    centre_var, size_var = variances
    matched = box_convert(matched, "xyxy", "cxcywh")
    centre = (matched[..., :2] - defaults[:, :2]) / (centre_var * defaults[:, 2:])
    size = torch.log(matched[..., 2:] / defaults[:, 2:]) / size_var
    return torch.cat([centre, size], dim=-1)


def decode(offsets: torch.Tensor, defaults: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Inverse of :func:`encode`: boxes from predicted offsets.

    Args:
        offsets: Tensor[..., A, 4] as produced by ``encode`` or the regression head.
        defaults: Tensor[A, 4] ``(cx, cy, w, h)``.

    Returns:
        Tensor[..., A, 4] ``(x1, y1, x2, y2)``, not clipped.
    """
    centre_var, size_var = variances
    defaults = defaults.to(offsets.dtype)
    centre = defaults[:, :2] + offsets[..., :2] * centre_var * defaults[:, 2:]
    size = defaults[:, 2:] * torch.exp((offsets[..., 2:] * size_var).clamp(max=_MAX_LOG_SCALE))
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def match(
    gt_boxes: torch.Tensor, gt_valid: torch.Tensor, defaults_xyxy: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Assign each default box the ground-truth box it must predict, for a whole batch.

    A default box is positive for the ground truth it overlaps most when that IoU is at
    least ``iou_threshold``; in addition every ground-truth box is forced onto the default
    box that overlaps it most, so that no object goes unlearnt (SSD section 2.2). When two
    objects share a best default box, the later one wins (as torchvision's SSDMatcher on CPU).

    Args:
        gt_boxes: Tensor[B, M, 4] ``(x1, y1, x2, y2)``, padded to M per image.
        gt_valid: bool Tensor[B, M], False on padding rows.
        defaults_xyxy: Tensor[A, 4] default boxes as ``(x1, y1, x2, y2)``.

    Returns:
        int64 Tensor[B, A]: index into M of the matched box, or -1 for background.
    """
    batch, max_boxes, _ = gt_boxes.shape
    num_defaults = defaults_xyxy.shape[0]
    iou = box_iou(gt_boxes.reshape(-1, 4), defaults_xyxy).view(batch, max_boxes, num_defaults)
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)

    best_iou, matched = iou.max(dim=1)  # per default box: [B, A]
    matched = torch.where(best_iou >= iou_threshold, matched, -1)

    # Force each valid ground truth onto its best default box; ties between objects go to
    # the highest index, as a deterministic scatter (amax) on every device.
    best_default = iou.argmax(dim=2)  # [B, M]
    gt_index = torch.arange(max_boxes, device=gt_boxes.device).expand(batch, max_boxes)
    forced = torch.full((batch, num_defaults), -1, dtype=torch.int64, device=gt_boxes.device)
    forced.scatter_reduce_(1, best_default, torch.where(gt_valid, gt_index, -1), reduce="amax")
    return torch.where(forced >= 0, forced, matched)
