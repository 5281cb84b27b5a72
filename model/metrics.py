"""Detection accuracy: COCO-style mean average precision through torchmetrics (pycocotools)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils.rnn import pad_sequence
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


def evaluate_detector(
    detector, images: list, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
) -> dict[str, float | None]:
    """mAP of a ``Detector`` on annotated images, compared in each image's own pixels.

    Args:
        detector: a ``model.detector.Detector``.
        images: ``AnnotatedImage`` records (boxes in pixels, 1-based labels).
        on_batch: called with the number of images done after each batch (progress bars).
    """
    from .data.images import open_rgb  # the data layer is only needed when evaluating files

    metric = MeanAP()
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        found = detector.predict([open_rgb(r.path) for r in chunk], score_threshold=0.01, max_detections=100)
        gt_boxes = pad_sequence([r.boxes for r in chunk], batch_first=True)  # [B, M, 4]
        gt_labels = pad_sequence([r.labels for r in chunk], batch_first=True)  # [B, M], 0 = padding
        metric.update(found, gt_boxes, gt_labels)
        if on_batch is not None:
            on_batch(len(chunk))
    return metric.compute()
