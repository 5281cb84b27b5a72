"""Whether one detector gives the same detections in two arithmetics (float32 against bf16 or fp16).

A detection of the reference run is *partnered* when the other run has one of the same class whose box
overlaps it with IoU >= ``PARTNER_IOU`` and whose score is within ``PARTNER_SCORE_GAP``.

Hard NMS keeps one of two overlapping boxes of a class by their score order. Where a network puts two
default boxes on one object with scores closer than the other arithmetic's error (a few thousandths in
bf16), that order can swap: the other run keeps the neighbour and suppresses the reference's box, which
its network did give. Such a miss is a *near tie*: the other run's boxes before NMS hold a partner for
the reference detection, and the box kept in its place overlaps that partner above the NMS threshold
with a score within ``PARTNER_SCORE_GAP`` of it. No change of arithmetic can rule near ties out; a
faithful lower precision has no other kind of miss.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    best_iou, best = iou.max(dim=1)
    return Partners(partnered, best_iou, gap.gather(1, best[:, None])[:, 0])


@dataclass(frozen=True)
class Miss:
    """Why one reference detection has no partner among the other run's kept detections.

    ``partner_before_nms``: the other run's boxes before NMS hold a partner (``twin_score`` is its score).
    ``kept_score`` and ``kept_iou``: the kept detection of the same class that overlaps that partner most,
    and their IoU (None where the other run kept nothing of the class).
    """

    score: float
    box: tuple[float, float, float, float]
    best_kept_iou: float
    partner_before_nms: bool
    closest_before_nms_iou: float
    closest_before_nms_score_gap: float
    twin_score: float | None = None
    kept_score: float | None = None
    kept_iou: float | None = None
    nms_threshold: float = 0.45

    @property
    def near_tie(self) -> bool:
        """NMS kept a neighbour of near-equal score over the partner: the order of a near tie swapped."""
        if self.twin_score is None or self.kept_score is None or self.kept_iou is None:
            return False
        return self.kept_iou > self.nms_threshold and abs(self.kept_score - self.twin_score) <= PARTNER_SCORE_GAP


def explain_miss(detection: Detections, kept: Detections, before_nms: Detections, nms_threshold: float) -> Miss:
    """Explains an unpartnered reference ``detection`` (one row) with the other run's ``kept`` detections and
    its boxes ``before_nms`` (the same network and threshold, NMS off), for a run whose NMS suppressed
    above ``nms_threshold`` IoU."""
    twin, closest_iou, closest_gap = partners(detection, before_nms)
    twin_score = kept_score = kept_iou = None
    label, score = detection["labels"][0], detection["scores"][0]
    if twin[0]:
        # The partner before NMS: the closest in IoU among those within the score gap.
        eligible = (before_nms["labels"] == label) & ((before_nms["scores"] - score).abs() <= PARTNER_SCORE_GAP)
        partner = int(torch.where(eligible, box_iou(detection["boxes"], before_nms["boxes"])[0], -1.0).argmax())
        twin_score = float(before_nms["scores"][partner])
        overlap = torch.where(
            kept["labels"] == label, box_iou(before_nms["boxes"][partner, None], kept["boxes"])[0], -1.0
        )
        if len(overlap) and overlap.max() >= 0:
            rival = int(overlap.argmax())
            kept_score, kept_iou = float(kept["scores"][rival]), float(overlap[rival])
    x1, y1, x2, y2 = detection["boxes"][0].tolist()
    return Miss(
        score=float(score),
        box=(x1, y1, x2, y2),
        best_kept_iou=float(partners(detection, kept).best_iou[0]),
        partner_before_nms=bool(twin[0]),
        closest_before_nms_iou=float(closest_iou[0]),
        closest_before_nms_score_gap=float(closest_gap[0]),
        twin_score=twin_score,
        kept_score=kept_score,
        kept_iou=kept_iou,
        nms_threshold=nms_threshold,
    )
