"""From raw head outputs to final detections, batched over images and classes."""

from __future__ import annotations

from typing import TypedDict

import torch
from torchvision.ops import batched_nms

from .boxes import decode


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

    The whole batch goes through one ``batched_nms`` call (boxes of different images or
    classes never suppress each other), with no Python loop over images or classes.

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
    batch, num_defaults, num_classes = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)[..., 1:]  # [B, A, C-1], background dropped
    boxes = decode(loc.float(), defaults.float(), variances).clamp(0, 1)  # [B, A, 4] relative

    # Top-k per (image, class) first, then the threshold: the same set as thresholding first,
    # but with a fixed shape.
    k = min(topk_candidates, num_defaults)
    top_scores, top_index = scores.transpose(1, 2).topk(k, dim=2)  # [B, C-1, k]
    keep = top_scores > score_threshold
    image_index, class_index, slot = keep.nonzero(as_tuple=True)
    cand_scores = top_scores[image_index, class_index, slot]
    cand_boxes = boxes[image_index, top_index[image_index, class_index, slot]]

    scale = image_sizes.to(cand_boxes).repeat(1, 2)[image_index]  # (w, h, w, h) per candidate
    cand_boxes = cand_boxes * scale
    group = image_index * num_classes + class_index
    kept = batched_nms(cand_boxes, cand_scores, group, nms_threshold)  # sorted by score

    kept = kept[_rank_within_image(image_index[kept], batch) < max_detections]
    # Stable sort by image keeps each image's detections in descending score order.
    kept = kept[torch.sort(image_index[kept], stable=True).indices]
    counts = torch.bincount(image_index[kept], minlength=batch).tolist()
    out_boxes, out_scores, out_labels = (t[kept].split(counts) for t in (cand_boxes, cand_scores, class_index + 1))
    return [
        Detections(boxes=b, scores=s, labels=lab) for b, s, lab in zip(out_boxes, out_scores, out_labels, strict=True)
    ]


def _rank_within_image(image_index: torch.Tensor, batch: int) -> torch.Tensor:
    """Position of each entry among the entries of its own image, in the order given.

    Args:
        image_index: int64 Tensor[K] image of each entry (entries already in score order).

    Returns:
        int64 Tensor[K]: 0 for an image's first entry, 1 for its second, ...
    """
    order = torch.sort(image_index, stable=True).indices
    sorted_images = image_index[order]
    counts = torch.bincount(sorted_images, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(len(order), device=image_index.device) - starts[sorted_images]
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
