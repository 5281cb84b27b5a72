"""The two typed configs that describe a run: the model's shape and the training recipe.

Both are plain dataclasses of JSON-friendly values, so they are stored verbatim inside
checkpoints (``asdict``) and rebuilt with ``from_dict`` when serving or resuming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

BACKBONES = ("vgg16", "vgg16_bn")
# Where a run's weights start (``TrainConfig.init``): these, or "job:<id>" (an earlier run's model).
INIT_CHOICES = ("auto", "scratch", "imagenet", "coco")
PRETRAINED_INITS = ("imagenet", "coco")  # torchvision's published weights
JOB_INIT_PREFIX = "job:"
MAX_JOB_REFERENCE = 1000
# torchvision's COCO SSD300 spaces its default boxes' centres by these many pixels of its 300-pixel
# input (``DefaultBoxGenerator(steps=...)``), not by each map's cell: its box head expects them.
TORCHVISION_STEPS = (8, 16, 32, 64, 100, 300)

# SSD300's smallest input for which every one of its six feature maps is at least 1x1:
# conv4_3 must be >= 34 cells wide so that conv11_2 (two valid 3x3 convs later) is 1x1.
MIN_IMAGE_SIZE = 268
MAX_IMAGE_SIZE = 1024


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, ignoring unknown keys and turning lists back into tuples."""
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            continue
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an SSD network and its default boxes.

    Args:
        num_classes: object classes plus one for the background (class id 0).
        backbone: ``"vgg16"`` (the paper's) or ``"vgg16_bn"`` (batch norm after every conv,
            which trains from scratch far more reliably).
        image_size: side of the square network input in pixels (300 for SSD300).
        width_multiplier: scales every layer's channel count. 1.0 is the paper's network;
            smaller values give a cheaper network with the same topology and default boxes
            (CPU demos and tests). Pretrained backbone weights need 1.0.
        scales: default box scale per feature map, plus one extra for the last map's s'_k
            (SSD paper, section 2.2; these are the COCO values torchvision uses).
        aspect_ratios: extra aspect ratios per feature map; each r adds boxes r:1 and 1:r.
        variances: SSD's centre and size variances used to encode box offsets.
        iou_threshold: a default box whose IoU with a ground-truth box is at least this is
            a positive (SSD paper: 0.5).
        neg_pos_ratio: hard negatives kept per positive in the classification loss (3:1).
        steps: pixels between default box centres on each feature map, at an ``image_size`` of 300
            (torchvision's COCO SSD300 and models trained on from it: ``TORCHVISION_STEPS``). None
            centres them in each map's cells, which is the same except on maps whose side does
            not divide the input (38 x 8 = 304).
    """

    num_classes: int
    backbone: Literal["vgg16", "vgg16_bn"] = "vgg16_bn"
    image_size: int = 300
    width_multiplier: float = 1.0
    scales: tuple[float, ...] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    variances: tuple[float, float] = (0.1, 0.2)
    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class, got {self.num_classes}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if not 0 < self.width_multiplier <= 4:
            raise ValueError(f"width_multiplier must be in (0, 4], got {self.width_multiplier}")
        if len(self.scales) != len(self.aspect_ratios) + 1:
            raise ValueError("scales needs one entry per feature map plus one")
        if len(self.aspect_ratios) != 6:
            raise ValueError("SSD300 has six feature maps: aspect_ratios needs six entries")
        if self.steps is not None and (len(self.steps) != 6 or self.image_size != 300):
            raise ValueError("steps needs six entries and an image_size of 300 (the size they are in pixels of)")

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean subtracted from 0-1 RGB inputs, matching the backbone's weights."""
        # torchvision's vgg16 IMAGENET1K_FEATURES weights are Caffe-style; vgg16_bn's are not.
        return (0.48235, 0.45882, 0.40784) if self.backbone == "vgg16" else (0.485, 0.456, 0.406)

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel divisor applied after the mean, matching the backbone's weights."""
        return (1 / 255, 1 / 255, 1 / 255) if self.backbone == "vgg16" else (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: the one argument that describes a run of ``fit``.

    Args:
        epochs: passes over the training split.
        batch_size: images per optimisation step.
        learning_rate: Adam's learning rate for everything but the first two conv blocks.
        early_block_lr_factor: the first and second VGG conv blocks learn at
            ``learning_rate * early_block_lr_factor``: their generic edge and colour filters
            need the least change and are the easiest to destabilise.
        weight_decay: Adam's L2 penalty.
        lr_schedule: ``"cosine"`` (linear warm-up, then cosine decay to 1% over the run) or
            ``"constant"`` (warm-up only).
        warmup_steps: steps of linear learning-rate warm-up from 1% (caps at a fifth of the run).
        val_fraction: share of the images held out for validation, split by ``seed``.
        image_size: network input side in pixels (see ``ModelConfig``).
        seed: seeds the split, the augmentations and the weight initialisation.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: mixed precision where the device computes it natively: bf16 on CUDA where supported,
            else fp16 with loss scaling; bf16 on a CPU with AVX512-BF16 or AMX (``model.device``).
            Weights, optimiser state, loss and checkpoints stay float32.
        init: where the weights start (``model.initialisation``): ``"scratch"`` (random),
            ``"imagenet"`` (torchvision's ImageNet backbone), ``"coco"`` (torchvision's
            COCO-trained SSD300; classes named as a COCO category start from its row),
            ``"job:<id>"`` (an earlier run's model; classes matched by name), or ``"auto"``:
            coco where its weights can be had, else imagenet, else scratch.
        backbone: ``"vgg16"`` or ``"vgg16_bn"`` (see ``ModelConfig``); None follows the weights
            (vgg16 for COCO's, the earlier run's for a job, else vgg16_bn).
        width_multiplier: see ``ModelConfig``; pretrained weights need 1.0.
        pretrained_backbone: ``"imagenet"`` is a synonym of ``init="imagenet"``, kept for one release.
        frozen_layers: leading VGG layers (torchvision's ``vgg16().features`` numbering, where
            conv, ReLU and pool each count one; 10 = conv blocks 1 and 2) kept frozen. ``None``
            means 10 when starting from ImageNet or COCO weights, 0 otherwise.
        augment: SSD's zoom out, IoU crop and flip on training images (in the loader), and its
            photometric distortion on each training batch (on the training device).
        num_workers: data-loading worker processes (0 loads in the training process).
        max_train_images: use at most this many training images (quick experiments).
        patience: stop early (the run completes) after this many epochs without a better
            validation mAP@0.5; None trains every epoch. Needs a validation split.
    """

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    early_block_lr_factor: float = 0.1
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    val_fraction: float = 0.1
    image_size: int = 300
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    init: str = "auto"
    backbone: Literal["vgg16", "vgg16_bn"] | None = None
    width_multiplier: float = 1.0
    pretrained_backbone: Literal["imagenet"] | None = None
    frozen_layers: int | None = None
    augment: bool = True
    num_workers: int = 2
    max_train_images: int | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.pretrained_backbone is not None:
            if self.pretrained_backbone != "imagenet":
                raise ValueError(
                    f"pretrained_backbone takes only 'imagenet' (see init), not {self.pretrained_backbone!r}"
                )
            if self.init not in ("auto", "imagenet"):
                raise ValueError(f"pretrained_backbone 'imagenet' contradicts init {self.init!r}: give init only")
            object.__setattr__(self, "init", "imagenet")  # the synonym: the record shows what it means
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.early_block_lr_factor <= 1, "early_block_lr_factor must be in [0, 1]"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.frozen_layers is None or 0 <= self.frozen_layers <= 31, "frozen_layers must be in [0, 31]"),
            (self.max_train_images is None or self.max_train_images >= 1, "max_train_images must be >= 1"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (
                self.patience is None or self.val_fraction > 0,
                "patience needs a validation split (val_fraction > 0): it watches the validation mAP@0.5",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        kind, _ = parse_init(self.init)
        if kind in PRETRAINED_INITS and self.width_multiplier != 1.0:
            raise ValueError(
                f"init {kind!r} needs width_multiplier 1.0 (the weights have VGG16's widths), "
                f"got {self.width_multiplier}"
            )
        if kind == "coco" and self.backbone == "vgg16_bn":
            raise ValueError("init 'coco' needs the vgg16 backbone (torchvision's COCO SSD300 has no batch norm)")
        self.model_config(num_classes=2)  # validates backbone, image size and width

    @property
    def resolved_backbone(self) -> Literal["vgg16", "vgg16_bn"]:
        """The backbone this recipe builds: the one asked for, else vgg16 for COCO's weights, else vgg16_bn."""
        if self.backbone is not None:
            return self.backbone
        return "vgg16" if self.init == "coco" else "vgg16_bn"

    @property
    def resolved_frozen_layers(self) -> int:
        """Frozen leading VGG layers: 10 from ImageNet or COCO weights, none otherwise, unless set."""
        if self.frozen_layers is not None:
            return self.frozen_layers
        return 10 if self.init in PRETRAINED_INITS else 0

    def model_config(self, num_classes: int, steps: tuple[int, ...] | None = None) -> ModelConfig:
        return ModelConfig(
            num_classes=num_classes,
            backbone=self.resolved_backbone,
            image_size=self.image_size,
            width_multiplier=self.width_multiplier,
            steps=steps,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def parse_init(init: str) -> tuple[str, str | None]:
    """``("job", reference)`` for ``"job:<reference>"``, else ``(init, None)``.

    Raises:
        ValueError: not one of ``INIT_CHOICES`` nor a ``job:`` with a reference (no spaces).
    """
    if not isinstance(init, str):
        raise ValueError(f"init must be a string, got {init!r}")
    if init.startswith(JOB_INIT_PREFIX):
        reference = init[len(JOB_INIT_PREFIX) :]
        if not reference or len(reference) > MAX_JOB_REFERENCE or any(c.isspace() for c in reference):
            raise ValueError(f"init {init!r}: 'job:' must be followed by a job id")
        return "job", reference
    if init not in INIT_CHOICES:
        choices = ", ".join(repr(c) for c in INIT_CHOICES)
        raise ValueError(f"init must be one of {choices} or 'job:<id>', got {init!r}")
    return init, None
