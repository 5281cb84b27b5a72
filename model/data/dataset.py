"""The torch ``Dataset`` of annotated images, its seeded sampler, its batch collation and the
train/validation split."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from model.data.annotations import AnnotatedImage, DatasetError
from model.data.images import open_rgb

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
SeededIndex = tuple[int, int]  # (image index, the seed of its augmentation draws)


class DetectionDataset(Dataset):
    """Images decoded on demand (``model.data.images.open_rgb``, in each record's orientation) and passed
    through ``transforms`` (see ``model.data.transforms``).

    Args:
        images: the annotated images (absolute xyxy pixel boxes, 1-based labels).
        transforms: called as ``transforms(image, {"boxes": ..., "labels": ...})``; it must
            resize to a square ``S`` x ``S`` (``train_transforms`` and ``eval_transforms`` do).

    An item is ``(image, boxes, labels)``: image uint8 Tensor[3, S, S]; boxes float32
    Tensor[N, 4], xyxy normalised to [0, 1] by the output size; labels int64 Tensor[N].
    N may be 0, and may be smaller than the image's box count after augmentation.

    Indexed by ``(index, seed)`` (what ``SeededSampler`` yields), the transforms draw their
    random numbers from a generator seeded with ``seed`` alone: the same augmentation in any
    process, with any number of loader workers, persistent or not, and on resume.
    """

    def __init__(self, images: list[AnnotatedImage], transforms: Callable[..., Any]):
        self.images = list(images)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | SeededIndex) -> Sample:
        if isinstance(index, tuple):
            index, seed = index
            # The transforms draw from torch's CPU generator only: that one is seeded (not the CUDA
            # ones, which torch.manual_seed would reseed too) and given back as it was.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self._sample(index)
        return self._sample(index)

    def _sample(self, index: int) -> Sample:
        image, target = self.transforms(*load_annotated(self.images[index]))
        out_height, out_width = image.shape[-2:]
        scale = torch.tensor([out_width, out_height, out_width, out_height], dtype=torch.float32)
        boxes = target["boxes"].as_subclass(torch.Tensor).to(torch.float32) / scale
        return image.as_subclass(torch.Tensor), boxes, target["labels"].to(torch.int64)


def load_annotated(record: AnnotatedImage) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """A record's image and target as torchvision's v2 transforms take them: uint8 ``Image[3, H, W]``
    (in the record's orientation) and ``{"boxes": BoundingBoxes[N, 4] XYXY pixels, "labels": int64 [N]}``
    (copies: transforms may change them in place).

    Raises:
        DatasetError: the decoded image is not the size it was annotated at.
    """
    # The reader chose the orientation once; no EXIF is read here (None, for records built
    # by hand, reads it from the header: microseconds against the decode's milliseconds).
    image = tv_tensors.Image(F.pil_to_tensor(open_rgb(record.path, record.orientation)))
    height, width = image.shape[-2:]
    if (width, height) != (record.width, record.height):
        raise DatasetError(
            f"{record.path}: image is {width}x{height} but was annotated as {record.width}x{record.height}"
        )
    target = {
        "boxes": tv_tensors.BoundingBoxes(record.boxes.clone(), format="XYXY", canvas_size=(height, width)),
        "labels": record.labels.clone(),
    }
    return image, target


class SeededSampler(Sampler[SeededIndex]):
    """Shuffled ``(index, augmentation seed)`` pairs, drawn in the loading process from ``set_epoch``'s
    seed: the order and every sample's augmentation follow from the epoch's seed alone.

    ``set_epoch(seed, skip)`` also skips the first ``skip`` pairs of the epoch, without loading
    them: a run resumed mid-epoch goes on with the same data and draws as the interrupted one.
    """

    def __init__(self, size: int):
        self.size = size
        self._seed = 0
        self._skip = 0

    def set_epoch(self, seed: int, skip: int = 0) -> None:
        self._seed, self._skip = seed, skip

    def __len__(self) -> int:
        return max(0, self.size - self._skip)

    def __iter__(self) -> Iterator[SeededIndex]:
        generator = torch.Generator().manual_seed(self._seed)
        order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        for position in range(self._skip, self.size):
            yield int(order[position]), int(seeds[position])


def collate_detections(batch: Sequence[Sample]) -> Sample:
    """Stack samples into a batch, padding each image's boxes to the batch's largest count.

    Returns:
        images uint8 Tensor[B, 3, S, S]; boxes float32 Tensor[B, M, 4]; labels int64
        Tensor[B, M], where M = max(1, largest N). Padding rows have zero boxes and label 0,
        which the loss ignores (0 is the background id, never a real object's label).
    """
    images = torch.stack([image for image, _, _ in batch])
    most = max([1] + [int(boxes.shape[0]) for _, boxes, _ in batch])
    padded_boxes = torch.zeros((len(batch), most, 4), dtype=torch.float32)
    padded_labels = torch.zeros((len(batch), most), dtype=torch.int64)
    for row, (_, boxes, labels) in enumerate(batch):
        padded_boxes[row, : boxes.shape[0]] = boxes
        padded_labels[row, : labels.shape[0]] = labels
    return images, padded_boxes, padded_labels


def split_train_val(num_images: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split image indices ``0..num_images-1`` into training and validation, by a seeded permutation.

    Validation gets ``round(val_fraction * num_images)`` images, at least 1 when
    ``val_fraction > 0`` and there are 2 or more images, and never all of them: at least
    one image is left for training. Both lists are sorted; the same arguments always give
    the same split.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_count = round(val_fraction * num_images)
    if val_fraction > 0 and num_images >= 2:
        val_count = max(val_count, 1)
    val_count = min(val_count, max(num_images - 1, 0))
    order = np.random.default_rng(seed).permutation(num_images)
    return sorted(int(i) for i in order[val_count:]), sorted(int(i) for i in order[:val_count])
