"""SSD's training augmentation and the evaluation resize, as ``torchvision.transforms.v2`` pipelines.

Every pipeline is called as ``transforms(image, {"boxes": boxes, "labels": labels})`` with
``image`` a uint8 ``tv_tensors.Image[3, H, W]`` and ``boxes`` a ``tv_tensors.BoundingBoxes``
``[N, 4]`` in absolute XYXY pixels, and returns the same structure. Images stay uint8:
normalisation happens on the device. All classes are module-level, so DataLoader workers
can pickle the pipelines.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def _has_no_boxes(value: Any) -> bool:
    """True if ``value`` (an input or a tuple/list/dict of inputs) holds an empty ``BoundingBoxes``."""
    if isinstance(value, tv_tensors.BoundingBoxes):
        return value.shape[0] == 0
    if isinstance(value, dict):
        return any(_has_no_boxes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_has_no_boxes(v) for v in value)
    return False


class IoUCropWithBoxes(v2.RandomIoUCrop):
    """``RandomIoUCrop`` with its trials drawn and tested all at once, and a pass-through for images
    without boxes.

    torchvision's transform tries up to 40 crops per drawn IoU threshold one by one, each
    with a handful of small tensor operations: about 4 ms of a loader worker's time per
    image, most of its augmentation cost. Here the 40 candidates of a threshold are drawn as
    one tensor and checked together (the same draws, tests and first-accepted rule, so the
    same distribution of crops), in a fraction of that.

    It only accepts a crop that keeps the centre of at least one box. With no boxes it
    never does, and would spin until it draws its "keep the whole image" option; this skips
    straight to that outcome.
    """

    def forward(self, *inputs: Any) -> Any:
        if _has_no_boxes(inputs):
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        found = next(value for value in flat_inputs if isinstance(value, tv_tensors.BoundingBoxes))
        height, width = found.canvas_size  # the image's: the transforms keep the two in step
        boxes = F.convert_bounding_box_format(
            found.as_subclass(torch.Tensor), found.format, tv_tensors.BoundingBoxFormat.XYXY
        )
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2]
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:  # the "leave as is" option
                return {}
            params = self._first_accepted_crop(height, width, boxes, centres, min_iou)
            if params is not None:
                return params

    def _first_accepted_crop(
        self, height: int, width: int, boxes: torch.Tensor, centres: torch.Tensor, min_iou: float
    ) -> dict[str, Any] | None:
        """The first of ``self.trials`` random crops (as torchvision draws them) that has the centre of
        some box inside it and, among those boxes, one with IoU >= ``min_iou``; None if none does."""
        scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)
        new_w, new_h = (width * scale[:, 0]).long(), (height * scale[:, 1]).long()
        aspect = new_w / new_h  # inf or nan for an empty crop: refused below either way
        valid = (self.min_aspect_ratio <= aspect) & (aspect <= self.max_aspect_ratio) & (new_w > 0) & (new_h > 0)
        position = torch.rand(self.trials, 2)
        left, top = ((width - new_w) * position[:, 0]).long(), ((height - new_h) * position[:, 1]).long()
        crops = torch.stack([left, top, left + new_w, top + new_h], dim=1)  # [T, 4] xyxy
        cx, cy = centres[:, 0], centres[:, 1]
        inside = (  # [T, N]: the box's centre is strictly inside the crop
            (crops[:, :1] < cx) & (cx < crops[:, 2:3]) & (crops[:, 1:2] < cy) & (cy < crops[:, 3:])
        )
        ious = box_iou(crops.to(boxes.dtype), boxes)  # [T, N]
        accepted = valid & (inside & (ious >= min_iou)).any(dim=1)
        if not bool(accepted.any()):
            return None
        t = int(accepted.nonzero()[0])
        return {
            "top": int(top[t]),
            "left": int(left[t]),
            "height": int(new_h[t]),
            "width": int(new_w[t]),
            "is_within_crop_area": inside[t],
        }


def train_transforms(image_size: int, fill: tuple[int, int, int]) -> v2.Compose:
    """SSD's geometric data augmentation (SSD paper, sections 2.2 and 3.6), then a square resize.

    Zoom out onto a canvas up to 4x the image's side, filled with ``fill`` (uint8 RGB,
    normally the dataset's mean colour, so it normalises to about 0) half of the time; a
    random crop keeping a minimum IoU with some box; horizontal flip; resize to
    ``image_size`` x ``image_size``; then boxes that became degenerate (under 1 px wide or
    high) are dropped with their labels. Images without boxes get every step except the
    crop. The photometric distortion comes after, on the batch (``model.data.photometric``).
    """
    return v2.Compose(
        [
            v2.RandomZoomOut(fill=list(fill), side_range=(1.0, 4.0), p=0.5),
            IoUCropWithBoxes(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def eval_transforms(image_size: int) -> v2.Compose:
    """Resize to ``image_size`` x ``image_size`` (aspect not kept, as SSD300 trains); boxes scale with it."""
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True)])
