"""torchvision's published weight files, made by its own constructors with ``weights=None``: the exact
layout under the published names (``model.pretrained.PUBLISHED``), and nothing downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchvision.models import vgg16, vgg16_bn
from torchvision.models.detection import ssd300_vgg16

from model.pretrained import PublishedWeights


def published_state(weights: PublishedWeights, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the model ``weights`` holds, randomly initialised by torchvision."""
    torch.manual_seed(seed)
    if weights.kind == "coco":
        return ssd300_vgg16(weights=None, weights_backbone=None).state_dict()
    return (vgg16 if weights.backbone == "vgg16" else vgg16_bn)(weights=None).state_dict()


def write_published(folder: Path, weights: PublishedWeights, state: dict | None = None) -> Path:
    """``state`` (default: ``published_state``) saved in ``folder`` under the published name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weights.file_name
    torch.save(published_state(weights) if state is None else state, path)
    return path


def named_by_hash(weights: PublishedWeights, path: Path) -> PublishedWeights:
    """``weights`` under a name carrying ``path``'s real SHA-256 prefix (as torchvision names its files),
    so a download of ``path`` under that name passes the hash check."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    stem = weights.file_name.rsplit("-", 1)[0]
    return PublishedWeights(weights.kind, weights.backbone, f"http://unused/{stem}-{digest}.pth")


class PublishedFiles:
    """The published files in one folder, each made on first use (the VGG16 ones are 528 MB each)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, weights: PublishedWeights) -> Path:
        path = self.folder / weights.file_name
        if not path.exists():
            write_published(self.folder, weights)
        return path

    def folder_with(self, folder: Path, *which: PublishedWeights) -> Path:
        """``folder`` holding links to ``which`` of the files (a weights folder with just those)."""
        folder.mkdir(parents=True, exist_ok=True)
        for weights in which:
            (folder / weights.file_name).symlink_to(self.path(weights))
        return folder
