"""Whether one detector gives the same detections in two arithmetics (float32 against bf16 or fp16).

A detection of the reference run is *partnered* when the other run has one of the same class whose box
overlaps it with IoU >= ``PARTNER_IOU`` and whose score is within ``PARTNER_SCORE_GAP``.

Hard NMS keeps one of two overlapping boxes of a class by their score order. Where a network puts two
default boxes on one object with scores closer than the other arithmetic's error (a few thousandths in
bf16), that order can swap: each run keeps the box the other suppressed. Such a miss is a *near tie*:
the other run's boxes before NMS hold a partner (its *twin*) for the reference detection, the kept box
that suppressed the twin (same class, IoU above the NMS threshold, a score no lower) scores within
``PARTNER_SCORE_GAP`` of it, and the reference run did not keep that box. No change of arithmetic can
rule near ties out. Other misses may still be arithmetic alone (an IoU a hair either side of a
threshold), but they are not told apart here: they count as misses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torchvision.ops import box_iou

from .postprocess import Detections

PARTNER_IOU = 0.9
PARTNER_SCORE_GAP = 0.03


class Partners(NamedTuple):
    """Per reference detection (Tensor[K] each): whether it has a partner, the IoU of its best-overlapping
    same-class candidate (0 where none) and that candidate's score gap (1 where none)."""

    partnered: torch.Tensor
    best_iou: torch.Tensor
    score_gap: torch.Tensor


def partners(reference: Detections, candidates: Detections) -> Partners:
    """Matches the K detections of ``reference`` against ``candidates`` (boxes ``(x1, y1, x2, y2)`` in the
    same pixels): same class, IoU >= ``PARTNER_IOU``, score within ``PARTNER_SCORE_GAP``."""
    count = len(reference["scores"])
    if not len(candidates["scores"]):
        return Partners(torch.zeros(count, dtype=torch.bool), torch.zeros(count), torch.ones(count))
    same_class = reference["labels"][:, None] == candidates["labels"][None, :]  # [K, M]
    iou = torch.where(same_class, box_iou(reference["boxes"], candidates["boxes"]), 0.0)
    gap = (reference["scores"][:, None] - candidates["scores"][None, :]).abs()
    partnered = ((iou >= PARTNER_IOU) & (gap <= PARTNER_SCORE_GAP)).any(dim=1)
    best_iou, best = torch.where(same_class, iou, -1.0).max(dim=1)
    has_same_class = same_class.any(dim=1)
    best_gap = torch.where(has_same_class, gap.gather(1, best[:, None])[:, 0], 1.0)
    return Partners(partnered, best_iou.clamp(min=0), best_gap)


@dataclass(frozen=True)
class Miss:
    """Why one reference detection has no partner among the other run's kept detections.

    score, box: the reference detection (``box`` ``(x1, y1, x2, y2)`` in the image's pixels).
    best_kept_iou: its IoU with the other run's closest kept detection of the same class (0 if none).
    partner_before_nms: the other run's boxes before NMS hold a partner, its twin (``twin_score``).
    closest_before_nms_iou, closest_before_nms_score_gap: the same-class box before NMS that overlaps
        it most, and their score gap (0 and 1 where there is none).
    nms_threshold: the IoU above which the other run's NMS suppressed.
    suppressor_score, suppressor_iou: the kept detection that suppressed the twin (the highest-scoring
        one of the same class that overlaps it above ``nms_threshold`` and scores no lower) and its IoU
        with the twin; None without a twin or such a detection.
    suppressor_kept_by_reference: the reference run kept a partner of that suppressor too.
    """

    score: float
    box: tuple[float, float, float, float]
    best_kept_iou: float
    partner_before_nms: bool
    closest_before_nms_iou: float
    closest_before_nms_score_gap: float
    nms_threshold: float
    twin_score: float | None = None
    suppressor_score: float | None = None
    suppressor_iou: float | None = None
    suppressor_kept_by_reference: bool = False

    @property
    def near_tie(self) -> bool:
        """Each run kept the box the other suppressed, and the two scored within ``PARTNER_SCORE_GAP``."""
        if self.twin_score is None or self.suppressor_score is None:
            return False
        close = self.suppressor_score - self.twin_score <= PARTNER_SCORE_GAP
        return close and not self.suppressor_kept_by_reference


def explain_miss(
    reference: Detections, index: int, kept: Detections, before_nms: Detections, nms_threshold: float
) -> Miss:
    """Explains the unpartnered detection ``index`` of ``reference`` (the reference run's kept detections of
    one image) with the other run's ``kept`` detections of that image and its boxes ``before_nms`` (the same
    network and score threshold, NMS off); the other run's NMS suppressed above ``nms_threshold`` IoU."""
    detection = _row(reference, index)
    twin, closest_iou, closest_gap = partners(detection, before_nms)
    miss = Miss(
        score=float(detection["scores"][0]),
        box=_box(detection["boxes"][0]),
        best_kept_iou=float(partners(detection, kept).best_iou[0]),
        partner_before_nms=bool(twin[0]),
        closest_before_nms_iou=float(closest_iou[0]),
        closest_before_nms_score_gap=float(closest_gap[0]),
        nms_threshold=nms_threshold,
    )
    if not twin[0]:
        return miss
    label, score = detection["labels"][0], detection["scores"][0]
    # The twin: of the boxes before NMS within the score gap, the one that overlaps the detection most.
    eligible = (before_nms["labels"] == label) & ((before_nms["scores"] - score).abs() <= PARTNER_SCORE_GAP)
    twin_index = int(torch.where(eligible, box_iou(detection["boxes"], before_nms["boxes"])[0], -1.0).argmax())
    twin_score = before_nms["scores"][twin_index]
    # Greedy NMS drops a box at the first kept box, in score order, that overlaps it above the threshold.
    overlap = box_iou(before_nms["boxes"][twin_index, None], kept["boxes"])[0]
    could_suppress = (kept["labels"] == label) & (overlap > nms_threshold) & (kept["scores"] >= twin_score)
    if not could_suppress.any():
        return replace(miss, twin_score=float(twin_score))
    suppressor = int(torch.where(could_suppress, kept["scores"], -1.0).argmax())
    return replace(
        miss,
        twin_score=float(twin_score),
        suppressor_score=float(kept["scores"][suppressor]),
        suppressor_iou=float(overlap[suppressor]),
        suppressor_kept_by_reference=bool(partners(_row(kept, suppressor), reference).partnered[0]),
    )


def _row(detections: Detections, index: int) -> Detections:
    """Detection ``index`` alone, as a one-row :class:`Detections`."""
    return Detections(
        boxes=detections["boxes"][index, None],
        scores=detections["scores"][index, None],
        labels=detections["labels"][index, None],
    )


def _box(box: torch.Tensor) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box.tolist()
    return (x1, y1, x2, y2)
