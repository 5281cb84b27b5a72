"""Slow, obvious per-image and per-box implementations that the batched code is checked against."""

import math

import torch
import torch.nn.functional as F


def iou_by_hand(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def match_one_image(gt: torch.Tensor, defaults_xyxy: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-box loops: best ground truth per default box above threshold, then forced best matches."""
    gt_list, default_list = gt.tolist(), defaults_xyxy.tolist()
    matched = []
    for d in default_list:
        ious = [iou_by_hand(g, d) for g in gt_list]
        best = max(range(len(ious)), key=lambda j: ious[j]) if ious else -1
        matched.append(best if ious and ious[best] >= threshold else -1)
    for j, g in enumerate(gt_list):
        ious = [iou_by_hand(g, d) for d in default_list]
        matched[max(range(len(ious)), key=lambda i: ious[i])] = j
    return torch.tensor(matched)


def encode_one(box: list[float], default: list[float], variances) -> list[float]:
    gx, gy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    gw, gh = box[2] - box[0], box[3] - box[1]
    cx, cy, w, h = default
    return [
        (gx - cx) / (w * variances[0]),
        (gy - cy) / (h * variances[0]),
        math.log(gw / w) / variances[1],
        math.log(gh / h) / variances[1],
    ]


def ssd_loss_one_image_at_a_time(loc, logits, gt_boxes, gt_labels, defaults, matched_per_image, variances, ratio=3):
    """The SSD loss with a Python loop over images and an explicit sort per image."""
    total_loc = total_conf = 0.0
    total_pos = 0
    for b in range(loc.shape[0]):
        matched = matched_per_image[b]
        positive = matched >= 0
        num_pos = int(positive.sum())
        total_pos += num_pos
        targets = torch.zeros(loc.shape[1], dtype=torch.int64)
        for a in torch.nonzero(positive).flatten().tolist():
            j = int(matched[a])
            targets[a] = gt_labels[b, j]
            offsets = torch.tensor(encode_one(gt_boxes[b, j].tolist(), defaults[a].tolist(), variances))
            total_loc = total_loc + F.smooth_l1_loss(loc[b, a].double(), offsets.double(), reduction="sum")
        ce = F.cross_entropy(logits[b].double(), targets, reduction="none")
        negatives = sorted(ce[~positive].tolist(), reverse=True)
        total_conf = total_conf + ce[positive].sum() + sum(negatives[: ratio * num_pos])
    n = max(1, total_pos)
    return total_loc / n, total_conf / n
