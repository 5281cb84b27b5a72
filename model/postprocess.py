"""From raw head outputs to final detections, batched over images and classes."""

from __future__ import annotations

from typing import TypedDict

import torch

from .boxes import decode
from .nms import grouped_nms


class Detections(TypedDict):
    """One image's detections, sorted by descending score.

    boxes: float32 Tensor[K, 4] ``(x1, y1, x2, y2)`` in the image's own pixels.
    scores: float32 Tensor[K].
    labels: int64 Tensor[K], 1-based class ids.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def postprocess(
    loc: torch.Tensor,
    logits: torch.Tensor,
    defaults: torch.Tensor,
    image_sizes: torch.Tensor,
    *,
    variances: tuple[float, float] = (0.1, 0.2),
    score_threshold: float = 0.01,
    topk_candidates: int = 400,
    nms_threshold: float = 0.45,
    max_detections: int = 200,
) -> list[Detections]:
    """Softmax, per-class score threshold and top-k, class-wise NMS, best ``max_detections``.

    Every (image, class) pair is one NMS group, all suppressed at once (``grouped_nms``, equal
    to ``torchvision.ops.batched_nms``), with no Python loop over images or classes.

    Args:
        loc: Tensor[B, A, 4] predicted offsets against ``defaults``.
        logits: Tensor[B, A, C] class scores; class 0 is background.
        defaults: Tensor[A, 4] default boxes ``(cx, cy, w, h)`` relative to the input side.
        image_sizes: Tensor[B, 2] each original image's ``(width, height)`` in pixels; boxes
            are scaled to it, so non-square originals get their own x and y scale.
        score_threshold: drop class scores at or below this.
        topk_candidates: at most this many boxes per class and image enter NMS.
        nms_threshold: IoU above which a lower-scoring box of the same class is suppressed.
        max_detections: at most this many detections per image.

    Returns:
        One :class:`Detections` per image.
    """
    _, num_defaults, num_classes = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)[..., 1:]  # [B, A, C-1], background dropped
    boxes = decode(loc.float(), defaults.float(), variances).clamp(0, 1)  # [B, A, 4] relative

    # Top-k per (image, class), then the threshold: the same set as thresholding first, but
    # the survivors form a prefix of each sorted row, so rows can be cut to the longest.
    top_scores, top_index = scores.transpose(1, 2).topk(min(topk_candidates, num_defaults), dim=2)  # [B, C-1, k]
    valid = top_scores > score_threshold
    longest = int(valid.sum(dim=2).max()) if valid.numel() else 0
    top_scores, top_index, valid = top_scores[..., :longest], top_index[..., :longest], valid[..., :longest]
    cand_boxes = torch.gather(
        boxes[:, None].expand(-1, num_classes - 1, -1, -1), 2, top_index[..., None].expand(-1, -1, -1, 4)
    )  # [B, C-1, k, 4]

    # IoU is unchanged by scaling x and y, so NMS runs in relative coordinates.
    keep = grouped_nms(cand_boxes.flatten(0, 1), valid.flatten(0, 1), nms_threshold).view_as(valid)

    # Best max_detections per image across classes, in descending score order.
    kept_scores = torch.where(keep, top_scores, -1.0).flatten(1)  # [B, (C-1) * k]
    best_scores, best = kept_scores.topk(min(max_detections, kept_scores.shape[1]), dim=1)
    found = best_scores >= 0  # a prefix of each row
    labels = best // max(longest, 1) + 1
    best_boxes = torch.gather(cand_boxes.flatten(1, 2), 1, best[..., None].expand(-1, -1, 4))
    best_boxes = best_boxes * image_sizes.to(best_boxes).repeat(1, 2)[:, None, :]  # (w, h, w, h) per image

    counts = found.sum(dim=1).tolist()
    out_boxes, out_scores, out_labels = (t[found].split(counts) for t in (best_boxes, best_scores, labels))
    return [
        Detections(boxes=b, scores=s, labels=lab) for b, s, lab in zip(out_boxes, out_scores, out_labels, strict=True)
    ]
