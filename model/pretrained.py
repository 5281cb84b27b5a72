"""torchvision's published SSD300 and VGG16 weights: their files, and their tensors in this network's layout.

The files are torchvision's own, under their published names (``PUBLISHED``), whose part after
the last dash is the start of the file's SHA-256 (as ``torch.hub`` checks it). Nothing here
downloads or knows where the files are kept: the caller finds them and passes their paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchvision.models import VGG16_BN_Weights, VGG16_Weights
from torchvision.models.detection import SSD300_VGG16_Weights

from .config import TORCHVISION_STEPS, ModelConfig
from .network import SSD300

# torch.hub's rule: "-<hex>." in a file name holds the first hex digits of its SHA-256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


class WeightsError(ValueError):
    """A weights file that cannot start this network: unreadable, not a state dict, wrong keys or shapes."""


@dataclass(frozen=True)
class PublishedWeights:
    """One of torchvision's weight files: what it holds and where torchvision publishes it."""

    kind: Literal["coco", "imagenet"]
    backbone: Literal["vgg16", "vgg16_bn"]
    url: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The start of the file's SHA-256 hex digest, as its name gives it."""
        found = _HASH_IN_NAME.search(self.file_name)
        if found is None:
            raise ValueError(f"{self.file_name} does not carry a hash in its name")
        return found.group(1)


COCO_WEIGHTS = PublishedWeights("coco", "vgg16", SSD300_VGG16_Weights.COCO_V1.url)
IMAGENET_WEIGHTS = {
    # The Caffe-style weights SSD was trained from (inputs 0-255 less the mean); vgg16_bn's are torchvision's.
    "vgg16": PublishedWeights("imagenet", "vgg16", VGG16_Weights.IMAGENET1K_FEATURES.url),
    "vgg16_bn": PublishedWeights("imagenet", "vgg16_bn", VGG16_BN_Weights.IMAGENET1K_V1.url),
}
PUBLISHED = (COCO_WEIGHTS, *IMAGENET_WEIGHTS.values())

# The 91 class ids of torchvision's COCO models: 0 is the background, "N/A" marks ids COCO left unused.
COCO_CATEGORY_IDS: tuple[str, ...] = tuple(SSD300_VGG16_Weights.COCO_V1.meta["categories"])
UNUSED_CATEGORY = "N/A"
# The 80 category names, in class id order.
COCO_CLASSES: tuple[str, ...] = tuple(name for name in COCO_CATEGORY_IDS[1:] if name != UNUSED_CATEGORY)


def published_by_name(file_name: str) -> PublishedWeights | None:
    """The published weights with this file name, if any."""
    return next((w for w in PUBLISHED if w.file_name == file_name), None)


def class_key(name: str) -> str:
    """A class name as it is matched across datasets and weights: case and spaces ignored."""
    return "".join(name.split()).casefold()


def match_class_rows(source_classes: Sequence[str], classes: Sequence[str]) -> list[int | None]:
    """Where each class of a new model starts: its row (class id) in the source model, or None.

    Args:
        source_classes: the source model's class names, class id i (1-based) being
            ``source_classes[i - 1]`` (``UNUSED_CATEGORY`` entries match nothing).
        classes: the new model's class names, in its order.

    Returns:
        ``[0, row of classes[0], row of classes[1], ...]``: background comes from background.
    """
    rows: dict[str, int] = {}
    for class_id, name in enumerate(source_classes, start=1):
        if name != UNUSED_CATEGORY:
            rows.setdefault(class_key(name), class_id)
    return [0, *(rows.get(class_key(name)) for name in classes)]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file of torchvision's kind (read with ``weights_only=True``).

    Raises:
        WeightsError: missing, truncated, not a mapping of names to tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as error:  # truncated zips, foreign pickles, random bytes
        raise WeightsError(f"{path} is not a readable weights file (truncated or corrupt?): {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def ssd_state_from_torchvision(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """torchvision's SSD300-VGG16 state dict in this network's layout, and its class count.

    The backbone's names carry over (``SSD300`` nests its modules as torchvision's
    ``SSDFeatureExtractorVGG`` does), the L2Norm scale is renamed, and each map's two heads
    (regression: boxes x 4 rows, classification: boxes x C rows) become one conv of
    boxes x (4 + C) rows, box by box: ``[4 offsets, C class scores]`` for each default box.

    Raises:
        WeightsError: not an SSD300-VGG16 state dict of torchvision's.
    """
    heads = [k for k in state if k.startswith("head.regression_head.module_list.") and k.endswith(".weight")]
    if "backbone.scale_weight" not in state or len(heads) != 6:
        raise WeightsError("not torchvision's SSD300-VGG16 state dict (no backbone.scale_weight or six box heads)")
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "backbone.scale_weight":
            ours["l2norm.weight"] = value
        elif key.startswith("backbone."):
            ours[key.removeprefix("backbone.")] = value
    num_classes = 0  # set by every head below
    for i in range(6):
        for name in ("weight", "bias"):
            try:
                reg = state[f"head.regression_head.module_list.{i}.{name}"]
                cls = state[f"head.classification_head.module_list.{i}.{name}"]
            except KeyError as error:
                raise WeightsError(f"torchvision's SSD300 state dict lacks {error.args[0]}") from None
            boxes = reg.shape[0] // 4
            if reg.shape[0] != 4 * boxes or cls.shape[0] % boxes:
                raise WeightsError(f"head {i}'s {name} has {reg.shape[0]} box rows and {cls.shape[0]} class rows")
            num_classes = cls.shape[0] // boxes
            fused = torch.cat([reg.view(boxes, 4, *reg.shape[1:]), cls.view(boxes, num_classes, *cls.shape[1:])], 1)
            ours[f"heads.{i}.{name}"] = fused.flatten(0, 1)
    return ours, num_classes


def load_ssd_weights(
    model: SSD300, state: Mapping[str, torch.Tensor], source_num_classes: int, class_rows: Sequence[int | None]
) -> None:
    """Load a whole SSD's weights (this network's layout) into ``model``, class rows picked by ``class_rows``.

    Everything but the heads' class rows must fit as it is: backbone, extra layers, L2Norm and
    the box offsets. Class c of ``model`` takes the source's row ``class_rows[c]`` (0 =
    background), or keeps its own initial row where that is None.

    Raises:
        WeightsError: the weights are of another architecture or width (naming the first misfits).
    """
    own = model.state_dict()
    head_keys = {f"heads.{i}.{name}" for i in range(len(model.heads)) for name in ("weight", "bias")}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    misshapen = sorted(k for k in (own.keys() & state.keys()) - head_keys if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        raise WeightsError(
            f"the weights do not fit {model.config.backbone} at width {model.config.width_multiplier}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {misshapen[:3]}"
        )
    if len(class_rows) != model.num_classes:
        raise ValueError(f"{len(class_rows)} class rows for a model of {model.num_classes} classes")
    loaded = {k: v for k, v in state.items() if k not in head_keys}
    for i, boxes in enumerate(model.boxes_per_location):
        for name in ("weight", "bias"):
            key = f"heads.{i}.{name}"
            if state[key].shape[0] != boxes * (4 + source_num_classes):
                raise WeightsError(f"head {i} of the weights does not hold {source_num_classes} classes")
            source = state[key].view(boxes, 4 + source_num_classes, *state[key].shape[1:])
            target = own[key].clone().view(boxes, 4 + model.num_classes, *own[key].shape[1:])
            if source.shape[2:] != target.shape[2:]:
                raise WeightsError(f"head {i} takes {tuple(target.shape[2:])} inputs, the weights' {source.shape[2:]}")
            target[:, :4] = source[:, :4]
            for row, source_row in enumerate(class_rows):
                if source_row is not None:
                    target[:, 4 + row] = source[:, 4 + source_row]
            loaded[key] = target.flatten(0, 1)
    model.load_state_dict(loaded)


def coco_model(state: Mapping[str, torch.Tensor]) -> SSD300:
    """torchvision's COCO-trained SSD300 as this network (eval mode), classes ``COCO_CLASSES`` in order.

    The unused ("N/A") class ids are left out, so the softmax runs over 81 classes where
    torchvision's runs over 91: the scores differ by what the trained head gives those ids,
    which it never saw as targets.

    Raises:
        WeightsError: ``state`` is not torchvision's COCO SSD300-VGG16 state dict.
    """
    ours, num_classes = ssd_state_from_torchvision(state)
    if num_classes != len(COCO_CATEGORY_IDS):
        raise WeightsError(f"COCO weights have {len(COCO_CATEGORY_IDS)} class ids, these {num_classes}")
    config = ModelConfig(num_classes=len(COCO_CLASSES) + 1, backbone="vgg16", steps=TORCHVISION_STEPS)
    model = SSD300(config)
    load_ssd_weights(model, ours, num_classes, match_class_rows(COCO_CATEGORY_IDS[1:], COCO_CLASSES))
    return model.eval()
