"""SSD's training augmentation and the evaluation resize, as ``torchvision.transforms.v2`` pipelines.

Every pipeline is called as ``transforms(image, {"boxes": boxes, "labels": labels})`` with
``image`` a uint8 ``tv_tensors.Image[3, H, W]`` and ``boxes`` a ``tv_tensors.BoundingBoxes``
``[N, 4]`` in absolute XYXY pixels, and returns the same structure. Images stay uint8:
normalisation happens on the device. All classes are module-level, so DataLoader workers
can pickle the pipelines.
"""

from __future__ import annotations

from typing import Any

from torchvision import tv_tensors
from torchvision.transforms import v2


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
    """``RandomIoUCrop`` that passes images with no boxes through unchanged.

    RandomIoUCrop only accepts a crop that keeps the centre of at least one box. With no
    boxes it never does, and spins (40 trials per draw) until it draws its "keep the
    whole image" option; this skips straight to that outcome.
    """

    def forward(self, *inputs: Any) -> Any:
        if _has_no_boxes(inputs):
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


def train_transforms(image_size: int, fill: tuple[int, int, int]) -> v2.Compose:
    """SSD's data augmentation (SSD paper, sections 2.2 and 3.6), then a square resize.

    Photometric distortion; zoom out onto a canvas up to 4x the image's side, filled with
    ``fill`` (uint8 RGB, normally the dataset's mean colour, so it normalises to about 0)
    half of the time; a random crop keeping a minimum IoU with some box; horizontal flip;
    resize to ``image_size`` x ``image_size``; then boxes that became degenerate (under
    1 px wide or high) are dropped with their labels. Images without boxes get every
    step except the crop.
    """
    return v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
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
