"""Detection accuracy: COCO-style mean average precision through torchmetrics (pycocotools)."""

from __future__ import annotations

import torch
from torchmetrics.detection import MeanAveragePrecision

from .postprocess import Detections


class MeanAP:
    """Accumulates detections and ground truth over a split; ``compute`` gives mAP@0.5 and @0.5:0.95.

    Boxes are ``(x1, y1, x2, y2)`` in any consistent unit (pixels of each image, or relative).
    """

    def __init__(self) -> None:
        self._metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, detections: list[Detections], gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> None:
        """Add one batch.

        Args:
            detections: per image, as returned by ``postprocess``.
            gt_boxes: float Tensor[B, M, 4] ``(x1, y1, x2, y2)`` in the detections' unit, padded.
            gt_labels: int64 Tensor[B, M] 1-based classes; 0 marks a padding row.
        """
        preds = [{k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")} for d in detections]
        gt_boxes, gt_labels = gt_boxes.cpu(), gt_labels.cpu()
        valid = gt_labels > 0
        target = [{"boxes": gt_boxes[i][valid[i]], "labels": gt_labels[i][valid[i]]} for i in range(len(preds))]
        self._metric.update(preds, target)

    def compute(self) -> dict[str, float | None]:
        """``{"map50": ..., "map": ...}``; None where there was no ground truth to score against."""
        result = self._metric.compute()
        return {key: _or_none(result[name]) for key, name in (("map50", "map_50"), ("map", "map"))}


def _or_none(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if value < 0 else value  # torchmetrics reports -1 when nothing could be scored
