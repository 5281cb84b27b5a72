"""Detection accuracy: COCO-style mean average precision through torchmetrics, with faster-coco-eval
(the same evaluation as pycocotools, about three times faster: it counts in every epoch's validation)
where installed, else pycocotools.

Overall and per-class figures come from one COCO evaluation: the per-class ones are read off
its precision array (``extended_summary``) the way ``COCOeval.summarize`` reads the overall
ones, so they cost no second evaluation (``class_metrics=True`` would run one per class, and
gives no per-class AP@0.5 at all).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypedDict

import torch
from torch.nn.utils.rnn import pad_sequence
from torchmetrics.detection import MeanAveragePrecision

from .postprocess import Detections

COCO_BACKEND: Literal["faster_coco_eval", "pycocotools"] = (
    "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
)
# faster-coco-eval logs its summary table at INFO after every evaluation (a dozen lines an epoch in the
# worker's log); the figures are in the epoch records.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
# What COCO scores with: every detection down to a low score, at most 100 per image.
SCORE_THRESHOLD = 0.01
MAX_DETECTIONS = 100


class ClassScores(TypedDict):
    """One class's figures: AP at IoU 0.5 and averaged over IoU 0.5:0.95, and its ground-truth boxes.

    An AP is None where the class has no ground truth to score against.
    """

    ap50: float | None
    ap: float | None
    num_boxes: int


class Scores(TypedDict):
    """``map50`` and ``map`` (None with no ground truth at all) and ``per_class``: every class id 1..K."""

    map50: float | None
    map: float | None
    per_class: dict[int, ClassScores]


class MeanAP:
    """Accumulates detections and ground truth over a split; ``compute`` gives mAP@0.5 and @0.5:0.95,
    overall and per class.

    Boxes are ``(x1, y1, x2, y2)`` in any consistent unit (pixels of each image, or relative).

    Args:
        num_classes: foreground classes K; class ids run 1..K.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend=COCO_BACKEND, extended_summary=True
        )
        self._boxes_per_class = torch.zeros(num_classes + 1, dtype=torch.int64)
        self._updated = False

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
        if bool((gt_labels > self.num_classes).any()):
            raise ValueError(f"ground-truth labels go up to {int(gt_labels.max())}; this metric has {self.num_classes}")
        target = [{"boxes": gt_boxes[i][valid[i]], "labels": gt_labels[i][valid[i]]} for i in range(len(preds))]
        self._metric.update(preds, target)
        self._boxes_per_class += torch.bincount(gt_labels[valid], minlength=self.num_classes + 1)
        self._updated = True

    def compute(self) -> Scores:
        per_class: dict[int, ClassScores] = {
            class_id: {"ap50": None, "ap": None, "num_boxes": int(self._boxes_per_class[class_id])}
            for class_id in range(1, self.num_classes + 1)
        }
        if not self._updated:  # no images: nothing to score (and torchmetrics would warn)
            return {"map50": None, "map": None, "per_class": per_class}
        result = self._metric.compute()
        precision = result.get("precision")  # absent when no image had a box or a detection
        if precision is not None:
            # [T IoU thresholds, R recall points, K classes seen, A areas ("all" first), M max-detections (100 last)]
            precision = precision[:, :, :, 0, -1]
            at_50 = self._metric.iou_thresholds.index(0.5)
            for k, class_id in enumerate(result["classes"].reshape(-1).tolist()):  # 0-d for one class
                if class_id in per_class:
                    per_class[class_id]["ap50"] = _mean_precision(precision[at_50, :, k])
                    per_class[class_id]["ap"] = _mean_precision(precision[:, :, k])
        return {"map50": _or_none(result["map_50"]), "map": _or_none(result["map"]), "per_class": per_class}


def _mean_precision(precision: torch.Tensor) -> float | None:
    """``COCOeval.summarize``'s average: the mean over the entries that were scored (-1 marks the others)."""
    scored = precision[precision > -1]
    return float(scored.mean()) if scored.numel() else None


def _or_none(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if number < 0 else number  # torchmetrics reports -1 when nothing could be scored


class ClassMismatchError(ValueError):
    """A dataset whose class names are not the model's: ``missing`` from it, ``extra`` in it."""

    def __init__(self, missing: list[str], extra: list[str], duplicated: list[str] | None = None):
        self.missing, self.extra, self.duplicated = missing, extra, duplicated or []
        parts = []
        if missing:
            parts.append(f"missing from the dataset: {', '.join(missing)}")
        if extra:
            parts.append(f"not classes of the model: {', '.join(extra)}")
        if self.duplicated:
            parts.append(f"named more than once in the dataset: {', '.join(self.duplicated)}")
        super().__init__("the dataset's class names differ from the model's (" + "; ".join(parts) + ")")


def class_id_map(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> torch.Tensor:
    """The model's class id for each of the dataset's, matched by name in any order.

    Returns:
        int64 Tensor[len(dataset_classes) + 1]: index with a dataset label (0 stays 0, padding).

    Raises:
        ClassMismatchError: the two do not hold the same names.
    """
    duplicated = sorted({name for name in dataset_classes if list(dataset_classes).count(name) > 1})
    missing = [name for name in model_classes if name not in dataset_classes]
    extra = [name for name in dataset_classes if name not in model_classes]
    if missing or extra or duplicated:
        raise ClassMismatchError(missing, extra, duplicated)
    model_id = {name: class_id for class_id, name in enumerate(model_classes, start=1)}
    return torch.tensor([0, *(model_id[name] for name in dataset_classes)], dtype=torch.int64)


class DetectorEvaluation:
    """``evaluate_detector`` in steps, for callers that choose where each runs (the API: images read
    on its thread pool, forward passes on its inference thread, between requests for /detect).

    For each batch from ``batches``: ``load`` the images, ``detect`` in them, ``add`` the result;
    then ``result``.

    Args:
        model_classes: the detector's class names (class id i is ``model_classes[i - 1]``).
        dataset_classes: the images' class names, the same set in any order (default: the model's).

    Raises:
        ClassMismatchError: the dataset's class names are not the model's.
    """

    def __init__(self, model_classes: Sequence[str], dataset_classes: Sequence[str] | None = None):
        self.classes = list(model_classes)
        self._to_model = class_id_map(self.classes if dataset_classes is None else dataset_classes, self.classes)
        self._metric = MeanAP(len(self.classes))
        self.num_images = 0

    @staticmethod
    def batches(images: list, batch_size: int) -> Iterator[list]:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

    @staticmethod
    def load(batch: list) -> list:
        """The batch's pictures as RGB PIL images, pixels as stored (what the boxes refer to).

        Raises:
            DatasetError: naming a missing, corrupt or truncated file.
        """
        from .data.images import open_rgb  # the data layer is only needed when evaluating files

        return [open_rgb(record.path, record.orientation) for record in batch]  # as training saw them

    @staticmethod
    def detect(detector, pictures: list) -> list[Detections]:
        """``detector.predict`` with COCO's settings: boxes in each picture's own pixels."""
        return detector.predict(pictures, score_threshold=SCORE_THRESHOLD, max_detections=MAX_DETECTIONS)

    def add(self, batch: list, found: list[Detections]) -> None:
        """Score one batch's detections against its ground truth (labels moved to the model's ids)."""
        gt_boxes = pad_sequence([r.boxes for r in batch], batch_first=True)  # [B, M, 4]
        gt_labels = pad_sequence([r.labels for r in batch], batch_first=True)  # [B, M], 0 = padding
        self._metric.update(found, gt_boxes, self._to_model[gt_labels])
        self.num_images += len(batch)

    def result(self) -> dict:
        """``{"num_images", "map50", "map", "per_class": [{"label", "ap50", "ap", "num_boxes"}]}``,
        ``per_class`` in the model's class order."""
        scores = self._metric.compute()
        per_class = [{"label": name, **scores["per_class"][i]} for i, name in enumerate(self.classes, start=1)]
        return {"num_images": self.num_images, "map50": scores["map50"], "map": scores["map"], "per_class": per_class}


def evaluate_detector(
    detector,
    images: list,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    dataset_classes: Sequence[str] | None = None,
) -> dict:
    """mAP of a ``Detector`` on annotated images, compared in each image's own pixels, overall and per class.

    Args:
        detector: a ``model.detector.Detector``.
        images: ``AnnotatedImage`` records (boxes in pixels, 1-based labels into ``dataset_classes``).
        on_batch: called with the number of images done after each batch (progress bars).
        dataset_classes: the images' class names, matched to the detector's by name (default: the
            detector's own, in its order).

    Returns:
        ``DetectorEvaluation.result``: ``{"num_images", "map50", "map", "per_class"}``.

    Raises:
        ClassMismatchError: the dataset's class names are not the detector's.
        DatasetError: an image that cannot be read.
    """
    evaluation = DetectorEvaluation(detector.classes, dataset_classes)
    for batch in evaluation.batches(images, batch_size):
        evaluation.add(batch, evaluation.detect(detector, evaluation.load(batch)))
        if on_batch is not None:
            on_batch(len(batch))
    return evaluation.result()
