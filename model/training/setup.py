"""Setting up a training run: the network with its starting weights and frozen layers, the optimiser and
its schedule, the loaders, and the precision; everything ``fit`` trains with, in a ``TrainingRun``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from ..config import ModelConfig, TrainConfig, parse_init
from ..data.annotations import DetectionData
from ..data.dataset import DetectionDataset, SeededSampler, collate_detections, split_train_val
from ..data.transforms import eval_transforms, train_transforms
from ..device import Precision, amp_dtype, memory_format, precision_name, resolve_device
from ..initialisation import Start
from ..loss import SSDLoss
from ..network import SSD300


class WarmupSchedule:
    """Learning-rate factor per step: linear warm-up from 1%, then cosine decay to 1% or constant.

    A plain object (not a lambda) so ``LambdaLR`` can save and restore it in checkpoints.
    """

    def __init__(self, total_steps: int, warmup_steps: int, cosine: bool):
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(warmup_steps, self.total_steps // 5)
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.01 + 0.99 * step / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(model_config: ModelConfig, config: TrainConfig, load: Callable[[SSD300], None] | None = None) -> SSD300:
    """The network with its starting weights (``load``: see ``Start``; None: random) and frozen layers."""
    torch.manual_seed(config.seed)
    model = SSD300(model_config)
    if load is not None:
        load(model)
    elif config.resolved_frozen_layers and parse_init(config.init)[0] in ("scratch", "auto"):
        warnings.warn(
            f"freezing {config.resolved_frozen_layers} VGG layers of a randomly initialised backbone: "
            "they will stay random. Freezing is meant for pretrained weights.",
            stacklevel=2,
        )
    model.freeze_vgg_layers(config.resolved_frozen_layers)
    return model


def build_optimizer(model: SSD300, config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with two groups: conv blocks 1-2 at ``learning_rate * early_block_lr_factor``, the rest at
    ``learning_rate``. Frozen parameters are left out."""
    early_ids = {id(p) for p in model.early_block_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in early_ids], "lr": config.learning_rate},
        {
            "params": [p for p in trainable if id(p) in early_ids],
            "lr": config.learning_rate * config.early_block_lr_factor,
        },
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.Adam(
        groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )


def build_loaders(
    data: DetectionData, config: TrainConfig, model_config: ModelConfig, device: torch.device
) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (augmented, shuffled by a per-epoch seed) and validation loader (resize only).

    The training loader's ``SeededSampler`` draws the order and each image's augmentation seed
    in this process, so the loader's workers can live for the whole run (no start-up at each
    epoch) and their number changes nothing but speed.
    """
    train_idx, val_idx = split_train_val(len(data.images), config.val_fraction, config.seed)
    if config.max_train_images is not None:
        train_idx = train_idx[: config.max_train_images]
    red, green, blue = (round(255 * m) for m in model_config.image_mean)
    fill = (red, green, blue)
    augment = train_transforms(config.image_size, fill) if config.augment else eval_transforms(config.image_size)
    common: dict[str, Any] = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "collate_fn": collate_detections,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    train_set = DetectionDataset([data.images[i] for i in train_idx], augment)
    train_loader = DataLoader(train_set, sampler=SeededSampler(len(train_set)), **common)
    val_loader = None
    if val_idx:
        val_set = DetectionDataset([data.images[i] for i in val_idx], eval_transforms(config.image_size))
        val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader


@dataclass
class TrainingRun:
    """Everything one run of ``fit`` trains with, built from the config and the data.

    Benchmarks build one by hand (with ``train_loader`` and ``val_loader`` unused) to time
    ``train_step``, the exact step ``fit`` takes.
    """

    device: torch.device
    model: SSD300
    loss_fn: SSDLoss
    train_loader: DataLoader | None
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    distort_colours: bool = False  # SSD's photometric distortion on each training batch (config.augment)

    @property
    def precision(self) -> Precision:
        return precision_name(self.autocast_dtype)

    @property
    def training_loader(self) -> DataLoader:
        """``train_loader``, which every run that trains epochs has."""
        if self.train_loader is None:
            raise ValueError("this run has no training data loader: it can only time train_step")
        return self.train_loader


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in a whole pass over ``loader``'s dataset (the last one may be short)."""
    # A loader without a batch size gives one sample a step.
    return math.ceil(len(cast(Sized, loader.dataset)) / (loader.batch_size or 1))


def build_training_run(
    model: SSD300,
    config: TrainConfig,
    device: torch.device,
    train_loader: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    total_steps: int | None = None,
    precision: torch.dtype | None = None,
) -> TrainingRun:
    """Loss, optimiser, schedule and precision for ``model`` (already on ``device``) as ``fit`` uses them.

    ``total_steps`` (the schedule's length) defaults to ``config.epochs`` passes over ``train_loader``.
    ``precision`` picks the mixed-precision dtype where ``config.amp`` turns it on and the device has
    one (default: ``amp_dtype``'s, see ``model.device``).
    """
    model_config = model.config
    loss_fn = SSDLoss(model.defaults, model_config.variances, model_config.iou_threshold, model_config.neg_pos_ratio)
    optimizer = build_optimizer(model, config, device)
    if total_steps is None and train_loader is None:
        raise ValueError("a training run needs total_steps or a train_loader to count them from")
    steps = total_steps if total_steps is not None else config.epochs * steps_per_epoch(cast(DataLoader, train_loader))
    schedule = WarmupSchedule(steps, config.warmup_steps, config.lr_schedule == "cosine")
    dtype = amp_dtype(device, config.amp)
    if dtype is not None and precision is not None:
        dtype = precision
    return TrainingRun(
        device=device,
        model=model,
        loss_fn=loss_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        autocast_dtype=dtype,
        distort_colours=config.augment,
    )


def training_precision(config: TrainConfig) -> tuple[torch.device, Precision]:
    """Where ``fit`` trains ``config`` on this machine, and in which precision.

    Raises:
        ValueError: CUDA asked for where there is none.
    """
    device = resolve_device(config.device)
    return device, precision_name(amp_dtype(device, config.amp))


def build_run(start: Start, data: DetectionData) -> TrainingRun:
    config = start.config
    device = resolve_device(config.device)
    model_config = start.model_config(num_classes=len(data.classes) + 1)
    layout = memory_format(device, amp_dtype(device, config.amp))
    # Module.to takes memory_format (as Tensor.to does); torch's stubs leave it out of every overload.
    model = build_model(model_config, config, start.load).to(device, memory_format=layout)  # type: ignore[call-overload]
    train_loader, val_loader = build_loaders(data, config, model_config, device)
    return build_training_run(model, config, device, train_loader, val_loader)
