"""Where a run's weights start (``TrainConfig.init``): choosing them, and loading them into a new network.

``plan_start`` turns what was asked (``auto``, ``scratch``, ``imagenet``, ``coco``,
``job:<id>``) into what is used, with the reason when they differ. It reads files through a
``WeightsSource`` the caller provides: the service's weights folder (with downloads) and
earlier jobs, or ``LocalWeights`` (a folder and run folders) for the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import CheckpointError, RunCheckpoint, read_checkpoint
from .config import TORCHVISION_STEPS, ModelConfig, TrainConfig, parse_init
from .network import SSD300
from .pretrained import (
    COCO_CATEGORY_IDS,
    COCO_WEIGHTS,
    IMAGENET_WEIGHTS,
    PublishedWeights,
    WeightsError,
    load_ssd_weights,
    match_class_rows,
    read_state_dict,
    ssd_state_from_torchvision,
)
from .run_folder import BEST_CHECKPOINT


class WeightsUnavailable(LookupError):
    """Weights that cannot be had here (the message says why: not in the folder, a refused download...).

    ``network_down``: a download failed to reach its server, so trying others now is pointless.
    """

    def __init__(self, message: str, network_down: bool = False):
        super().__init__(message)
        self.network_down = network_down


class WeightsSource(Protocol):
    """Where ``plan_start`` finds weight files."""

    def published(self, weights: PublishedWeights, may_download: bool) -> AbstractContextManager[Path]:
        """The file of torchvision's ``weights``, fetched first if missing and ``may_download`` (and
        the source allows it). Raises WeightsUnavailable saying why it cannot be had."""
        ...

    def checkpoint(self, reference: str) -> AbstractContextManager[Path]:
        """The best checkpoint of the earlier run ``reference`` names. Raises WeightsUnavailable."""
        ...


@dataclass(frozen=True)
class Initialisation:
    """What a run's weights started from: ``asked`` (its config's init), ``used``, and why they differ."""

    asked: str
    used: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """As the job record and the checkpoint keep it."""
        return {"init": self.asked, "init_used": self.used, "init_note": self.note}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Initialisation:
        return cls(asked=data["init"], used=data["init_used"], note=data.get("init_note"))


@dataclass(frozen=True)
class Start:
    """A planned start of a run.

    config: the recipe as it runs: ``init`` is the one used and ``backbone`` the one built.
    steps: the default boxes' steps the weights were trained with (``ModelConfig.steps``).
    load: puts the weights into a new network (built from ``model_config``); None: random.
    """

    init: Initialisation
    config: TrainConfig
    steps: tuple[int, ...] | None = None
    load: Callable[[SSD300], None] | None = None

    def model_config(self, num_classes: int) -> ModelConfig:
        return self.config.model_config(num_classes, steps=self.steps)


def plan_start(config: TrainConfig, classes: list[str], source: WeightsSource | None) -> Start:
    """Decide what ``config.init`` starts from for a dataset of ``classes``, and read those weights.

    ``auto`` takes COCO's SSD300 (vgg16), else the ImageNet backbone, else random weights,
    each where the recipe allows it (full width; a backbone it fits) and ``source`` has or
    can fetch it; after a download that could not reach its server it tries no other.

    Raises:
        WeightsUnavailable: an explicit choice whose weights cannot be had.
        WeightsError: a file that is there but does not fit (never a quiet fall back to random).
        ValueError: an earlier run that does not fit this recipe (another architecture or width).
    """
    kind, reference = parse_init(config.init)
    if kind == "scratch":
        return _scratch(config, None)
    if kind == "auto":
        return _auto(config, classes, source)
    if source is None:
        raise WeightsUnavailable(f"init {config.init!r} needs weights, and no weights folder was given")
    if kind == "job" and reference is not None:  # parse_init gives a job: init its reference
        return _from_run(config, classes, source, reference)
    backbone = "vgg16" if kind == "coco" else config.resolved_backbone
    weights = COCO_WEIGHTS if kind == "coco" else IMAGENET_WEIGHTS[backbone]
    return _from_published(config, classes, source, weights, may_download=True)


def resumed_start(config: TrainConfig, checkpoint: RunCheckpoint) -> Start:
    """The start of a run that carries on from ``checkpoint``: the one it recorded (older
    checkpoints: random, or ImageNet where they asked for it), and its weights come from the checkpoint."""
    saved = checkpoint.train_config
    if checkpoint.init:
        init = Initialisation.from_dict(checkpoint.init)
    else:
        used = "imagenet" if saved.get("pretrained_backbone") else "scratch"
        init = Initialisation(saved.get("init", used), used)
    model_config = checkpoint.model_config
    backbone = model_config.get("backbone", saved.get("backbone"))
    ran = replace(config, init=init.used, backbone=backbone, pretrained_backbone=None)
    return Start(init, ran, _steps(model_config.get("steps")))


def _steps(value: Any) -> tuple[int, ...] | None:
    return tuple(value) if value else None


def _scratch(config: TrainConfig, note: str | None) -> Start:
    init = Initialisation(config.init, "scratch", note)
    return Start(init, replace(config, init="scratch", backbone=config.resolved_backbone, pretrained_backbone=None))


def _auto(config: TrainConfig, classes: list[str], source: WeightsSource | None) -> Start:
    if config.width_multiplier != 1.0:
        return _scratch(config, f"pretrained weights need width_multiplier 1.0, this run has {config.width_multiplier}")
    if source is None:
        return _scratch(config, "no weights folder was given")
    candidates = [] if config.backbone == "vgg16_bn" else [COCO_WEIGHTS]
    candidates.append(IMAGENET_WEIGHTS[config.backbone or "vgg16_bn"])
    reasons, may_download = [], True
    for weights in candidates:
        try:
            start = _from_published(config, classes, source, weights, may_download)
        except WeightsUnavailable as error:
            reasons.append(f"{_describe(weights)}: {error}")
            may_download = may_download and not error.network_down
            continue
        return replace(start, init=replace(start.init, asked=config.init, note="; ".join(reasons) or None))
    return _scratch(config, "; ".join(reasons))


def _describe(weights: PublishedWeights) -> str:
    return "COCO weights" if weights.kind == "coco" else f"ImageNet {weights.backbone} weights"


def _from_published(
    config: TrainConfig, classes: list[str], source: WeightsSource, weights: PublishedWeights, may_download: bool
) -> Start:
    with source.published(weights, may_download) as path:
        state = read_state_dict(path)
    ran = replace(config, init=weights.kind, backbone=weights.backbone, pretrained_backbone=None)
    init = Initialisation(config.init, weights.kind)
    if weights.kind == "imagenet":
        return Start(init, ran, load=_file_error(path, lambda model: model.load_vgg_weights(state)))
    ours, num_classes = _in_file(path, lambda: ssd_state_from_torchvision(state))
    rows = match_class_rows(COCO_CATEGORY_IDS[1:], classes)
    steps = TORCHVISION_STEPS if config.image_size == 300 else None  # its steps are pixels of a 300 input
    return Start(init, ran, steps, _file_error(path, lambda model: load_ssd_weights(model, ours, num_classes, rows)))


def _from_run(config: TrainConfig, classes: list[str], source: WeightsSource, reference: str) -> Start:
    with source.checkpoint(reference) as path:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as error:
            raise WeightsError(str(error)) from None
    trained = ModelConfig.from_dict(checkpoint.model_config)
    conflicts = []
    if config.backbone is not None and config.backbone != trained.backbone:
        conflicts.append(f"backbone {trained.backbone}, not {config.backbone}")
    if config.width_multiplier != trained.width_multiplier:
        conflicts.append(f"width_multiplier {trained.width_multiplier}, not {config.width_multiplier}")
    if conflicts:
        raise ValueError(f"init {config.init!r}: that run's model has {' and '.join(conflicts)}")
    ran = replace(config, backbone=trained.backbone, pretrained_backbone=None)
    steps = trained.steps if config.image_size == trained.image_size else None
    rows = match_class_rows(checkpoint.classes, classes)
    state, num_classes = checkpoint.model, trained.num_classes
    load = _file_error(path, lambda model: load_ssd_weights(model, state, num_classes, rows))
    return Start(Initialisation(config.init, config.init), ran, steps, load)


def _in_file(path: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ValueError as error:
        raise WeightsError(f"{path}: {error}") from None


def _file_error(path: Path, load: Callable[[SSD300], None]) -> Callable[[SSD300], None]:
    """``load``, whose misfits name the file they came from."""

    def load_from_file(model: SSD300) -> None:
        _in_file(path, lambda: load(model))

    return load_from_file


class LocalWeights:
    """Weights already on this machine: torchvision's files in ``folder`` under their published names
    (by default torch.hub's cache, where torchvision keeps what it downloads), and earlier runs as
    run folders (``job:<run folder>`` starts from that folder's ``best.pt``). It downloads nothing."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else Path(torch.hub.get_dir()) / "checkpoints"

    @contextmanager
    def published(self, weights: PublishedWeights, may_download: bool) -> Iterator[Path]:
        path = self.folder / weights.file_name
        if not path.is_file():
            raise WeightsUnavailable(f"{weights.file_name} is not in {self.folder} (download it from {weights.url})")
        yield path

    @contextmanager
    def checkpoint(self, reference: str) -> Iterator[Path]:
        path = Path(reference)
        path = path / BEST_CHECKPOINT if path.is_dir() else path
        if not path.is_file():
            raise WeightsUnavailable(f"no checkpoint at {path} (give a run folder or a checkpoint file)")
        yield path
