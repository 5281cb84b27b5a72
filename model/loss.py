"""The SSD training loss (Liu et al., 2016, section 2.2), batched over the whole batch."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from .boxes import encode, match


class SSDLossOutput(NamedTuple):
    """Scalar losses of one batch, each already divided by the number of positives (at least 1)."""

    total: torch.Tensor
    loc: torch.Tensor
    conf: torch.Tensor
    num_positives: torch.Tensor


class SSDLoss(nn.Module):
    """Smooth L1 on positives' box offsets + cross-entropy with 3:1 hard negative mining.

    Args:
        defaults: Tensor[A, 4] default boxes ``(cx, cy, w, h)``, relative (0-1).
        variances: SSD's (centre, size) variances.
        iou_threshold: minimum IoU for a default box to be a positive.
        neg_pos_ratio: negatives kept per positive, the hardest (highest loss) first.
    """

    defaults: torch.Tensor
    defaults_xyxy: torch.Tensor

    def __init__(
        self,
        defaults: torch.Tensor,
        variances: tuple[float, float] = (0.1, 0.2),
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
    ):
        super().__init__()
        self.register_buffer("defaults", defaults, persistent=False)
        self.register_buffer("defaults_xyxy", box_convert(defaults, "cxcywh", "xyxy"), persistent=False)
        self.variances = variances
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio

    def forward(
        self, loc: torch.Tensor, logits: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> SSDLossOutput:
        """Loss of one batch.

        Args:
            loc: Tensor[B, A, 4] predicted offsets.
            logits: Tensor[B, A, C] class scores, class 0 = background.
            gt_boxes: Tensor[B, M, 4] ``(x1, y1, x2, y2)`` relative (0-1), padded.
            gt_labels: int64 Tensor[B, M], 1-based classes; 0 marks a padding row.
        """
        # Half-precision logits would lose the small differences hard negative mining ranks by.
        loc, logits = loc.float(), logits.float()
        with torch.no_grad():
            matched = match(gt_boxes.float(), gt_labels > 0, self.defaults_xyxy, self.iou_threshold)
            positive = matched >= 0  # [B, A]
            safe_index = matched.clamp(min=0)
            target_labels = torch.where(positive, torch.gather(gt_labels, 1, safe_index), 0)
            matched_boxes = torch.gather(gt_boxes.float(), 1, safe_index[..., None].expand(-1, -1, 4))
            # Background rows may gather a padding box whose log-size is -inf: zero them.
            target_offsets = torch.where(positive[..., None], encode(matched_boxes, self.defaults, self.variances), 0.0)

        num_pos_per_image = positive.sum(dim=1)  # [B]
        normaliser = num_pos_per_image.sum().clamp(min=1)

        # Masks instead of boolean indexing: no device-to-host sync in the training step.
        loc_loss = F.smooth_l1_loss(loc, target_offsets, reduction="none").sum(dim=2)
        loc_loss = torch.where(positive, loc_loss, 0.0).sum()

        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_labels.reshape(-1), reduction="none")
        ce = ce.view_as(target_labels)
        conf_loss = torch.where(positive, ce, 0.0).sum() + self._hard_negative_sum(ce, positive, num_pos_per_image)

        loc_loss, conf_loss = loc_loss / normaliser, conf_loss / normaliser
        return SSDLossOutput(loc_loss + conf_loss, loc_loss, conf_loss, num_pos_per_image.sum())

    def _hard_negative_sum(
        self, ce: torch.Tensor, positive: torch.Tensor, num_pos_per_image: torch.Tensor
    ) -> torch.Tensor:
        """Sum of the ``neg_pos_ratio * positives`` largest background losses in each image.

        The sum of the k largest values does not depend on how ties are broken, so one sort
        per image row suffices (no rank-of-rank double sort).
        """
        negative_losses = ce.masked_fill(positive, float("-inf"))
        ranked, _ = negative_losses.sort(dim=1, descending=True)
        num_neg = torch.minimum(
            torch.ceil(self.neg_pos_ratio * num_pos_per_image).long(), positive.shape[1] - num_pos_per_image
        )
        keep = torch.arange(ranked.shape[1], device=ce.device)[None, :] < num_neg[:, None]
        return torch.where(keep, ranked, 0.0).sum()
