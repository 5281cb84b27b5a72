"""In-memory form of a labelled detection dataset, shared by every reader and writer.

Boxes are absolute pixel ``[x1, y1, x2, y2]`` in the image as displayed (EXIF orientation
applied; see ``model.data.images``), in continuous coordinates: a box covering the whole of
a W x H image is ``[0, 0, W, H]``. Class ids are 1-based; 0 is reserved for the background
class of the detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


class DatasetError(ValueError):
    """A dataset that cannot be used as it is.

    ``problems`` lists each problem found, each naming the file, the annotation and
    what is wrong, so a user can fix all of them in one go.
    """

    def __init__(self, problems: list[str] | str, *, limit: int = 20):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:limit]
        more = len(self.problems) - len(shown)
        message = "; ".join(shown) + (f"; and {more} more problem(s)" if more > 0 else "")
        super().__init__(message)


@dataclass(frozen=True)
class AnnotatedImage:
    """One image and its ground truth.

    Attributes:
        path: the image file.
        width, height: the image's size in pixels once decoded with ``orientation``.
        boxes: float32 Tensor[N, 4], absolute ``[x1, y1, x2, y2]`` pixels, x2 > x1, y2 > y1,
            inside ``[0, width] x [0, height]``. N may be 0 (an image with no objects).
        labels: int64 Tensor[N], 1-based class ids into ``DetectionData.classes``.
        orientation: the EXIF orientation (1-8) applied when the file is decoded, which the
            reader chose once (``model.data.images.annotated_frame``): the file's own, or 1
            to use the pixels as stored. None reads the file's own each time it is decoded.
    """

    path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    orientation: int | None = None


@dataclass(frozen=True)
class DetectionData:
    """A whole dataset: class names (index i holds class id i + 1), its images, and what its reader noticed.

    ``warnings`` are things the reader did not refuse but a person should know (each naming
    the file), such as an image used as stored against its EXIF orientation.
    """

    classes: list[str]
    images: list[AnnotatedImage] = field(default_factory=list)
    format: str = "coco"
    warnings: list[str] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return sum(int(image.boxes.shape[0]) for image in self.images)
