"""The training loop: ``fit`` trains, validates after every epoch, checkpoints and reports.

Plain functions in the manner of torchvision's detection references: ``train_one_epoch``
and ``evaluate`` do one pass each; ``fit`` wires them with the data, the optimiser, the
checkpoints and the caller's callbacks (progress, epoch records, cancellation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from .checkpoint import checkpoint_writer, load_checkpoint
from .config import ModelConfig, TrainConfig, parse_init
from .data import photometric
from .data.dataset import DetectionDataset, SeededSampler, collate_detections, split_train_val
from .data.records import DetectionData
from .data.transforms import eval_transforms, train_transforms
from .device import Precision, amp_dtype, autocast, memory_format, precision_name, resolve_device
from .initialisation import Initialisation, Start, WeightsSource, plan_start, resumed_start
from .layout import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, LOSS_PLOT, METRICS_FILE
from .loss import SSDLoss, SSDLossOutput
from .metrics import MeanAP
from .network import SSD300
from .plots import plot_losses
from .postprocess import postprocess
from .storage import RunFolder

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5


@dataclass
class StepProgress:
    """Where training stands, reported at most every ``PROGRESS_INTERVAL_SECONDS`` and at epoch ends."""

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    loss: float
    images_per_second: float
    eta_seconds: float


@dataclass
class Callbacks:
    """Hooks into ``fit``; each is optional.

    on_step: progress within an epoch.
    on_epoch: the epoch record, called after the epoch's checkpoint is on disk.
    should_stop: checked before every training and validation batch; True stops the run
        (cancelled: the last epoch's checkpoint stays).
    should_pause: checked likewise; True writes a mid-epoch checkpoint and returns (paused):
        ``fit`` on the same run folder later carries on from the next batch (worker shutdown).
    on_resume: the history of the checkpoint a run resumes from (its epoch records), before
        training continues: the records a crash may have kept from reaching ``on_epoch``.
    on_start: how the run starts (``Start.init``: what the weights start from, what was asked and
        why they differ; ``Start.config``: the recipe as it runs), before the first batch; a resumed
        run reports its first start again.
    """

    on_step: Callable[[StepProgress], None] | None = None
    on_epoch: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    should_pause: Callable[[], bool] | None = None
    on_resume: Callable[[list[dict]], None] | None = None
    on_start: Callable[[Start], None] | None = None

    def interruption(self) -> Literal["cancelled", "paused"] | None:
        """Why the run must stop before the next batch, if it must."""
        if self.should_stop is not None and self.should_stop():
            return "cancelled"
        if self.should_pause is not None and self.should_pause():
            return "paused"
        return None


@dataclass
class EpochState:
    """A training epoch's running totals, saved in a mid-epoch checkpoint to carry on later."""

    steps_done: int = 0
    loss_sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # total, loc, conf


@dataclass
class FitResult:
    status: Literal["completed", "cancelled", "paused"]
    epochs_completed: int
    best_val_loss: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict]
    paused_at: tuple[int, int] | None = None  # (epoch, training steps done in it) of a paused run
    device: str = "cpu"  # where it trained: cpu or cuda
    precision: Precision = "fp32"  # what its convolutions computed in (see model.device)
    init: Initialisation | None = None  # what the weights started from
    note: str | None = None  # why a completed run stopped before its last epoch (patience)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run is diverging (learning rate too high?)."""


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
    fill = tuple(round(255 * m) for m in model_config.image_mean)
    augment = train_transforms(config.image_size, fill) if config.augment else eval_transforms(config.image_size)
    common = {
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


class _Reporter:
    """Throttles progress reports; the loss is read off the device only when reporting.

    The ETA counts the remaining training steps at this epoch's pace, plus one validation
    pass (as long as the last one took) for each epoch still to validate.
    """

    def __init__(self, callbacks: Callbacks, epoch: int, epochs: int, steps: int, validation_seconds: float):
        self.callbacks, self.epoch, self.epochs, self.steps = callbacks, epoch, epochs, steps
        self.validation_seconds = validation_seconds
        self.started = self.last_report = time.perf_counter()
        self.images = 0

    def due(self, step: int) -> bool:
        return step == self.steps or time.perf_counter() - self.last_report >= PROGRESS_INTERVAL_SECONDS

    def report(self, step: int, mean_loss: float) -> None:
        now = time.perf_counter()
        self.last_report = now
        if self.callbacks.on_step is None:
            return
        elapsed = max(now - self.started, 1e-9)
        remaining_steps = (self.steps - step) + (self.epochs - self.epoch) * self.steps
        remaining_validations = self.epochs - self.epoch + 1
        self.callbacks.on_step(
            StepProgress(
                epoch=self.epoch,
                step=step,
                steps_per_epoch=self.steps,
                epochs=self.epochs,
                loss=mean_loss,
                images_per_second=self.images / elapsed,
                eta_seconds=remaining_steps * elapsed / step + remaining_validations * self.validation_seconds,
            )
        )


def train_one_epoch(
    run: TrainingRun,
    epoch: int,
    epochs: int,
    callbacks: Callbacks,
    validation_seconds: float = 0.0,
    start: EpochState | None = None,
    *,
    augment_seed: int,
) -> tuple[Literal["done", "cancelled", "paused"], EpochState]:
    """One pass over the training loader, or the rest of one from ``start``.

    Each step's batch augmentation is drawn from ``augment_seed`` and the step's number, so a
    resumed epoch draws what the interrupted one would have.

    Returns the outcome and the epoch's totals so far (all of its steps when "done").
    """
    start = start or EpochState()
    run.model.train()
    steps = steps_per_epoch(run.train_loader)
    if start.steps_done >= steps:  # paused during validation: training is already done
        return "done", start
    sums = torch.tensor(start.loss_sums, device=run.device, dtype=torch.float64)
    first_bad_step = torch.full((), -1, device=run.device, dtype=torch.int64)
    reporter = _Reporter(callbacks, epoch, epochs, steps, validation_seconds)
    # The sampler skips the steps done before a pause (see _run_epoch): the rest come as they would have.
    for step, batch in enumerate(run.train_loader, start=start.steps_done + 1):
        interruption = callbacks.interruption()
        if interruption is not None:
            _raise_if_diverged(first_bad_step, epoch)
            return interruption, EpochState(step - 1, tuple(sums.tolist()))
        losses = train_step(run, batch, _step_seed(augment_seed, step))
        # Accumulated on the device: reading a loss each step would stall the GPU queue.
        sums += torch.stack([losses.total.detach(), losses.loc.detach(), losses.conf.detach()]).double()
        bad = ~torch.isfinite(losses.total.detach())
        first_bad_step = torch.where(bad & (first_bad_step < 0), step, first_bad_step)
        reporter.images += batch[0].shape[0]
        if reporter.due(step):
            _raise_if_diverged(first_bad_step, epoch)
            reporter.report(step, float(sums[0]) / step)
    _raise_if_diverged(first_bad_step, epoch)
    return "done", EpochState(steps, tuple(sums.tolist()))


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in a whole pass over ``loader``'s dataset (the last one may be short)."""
    return math.ceil(len(loader.dataset) / loader.batch_size)


def train_step(
    run: TrainingRun, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], augment_seed: int | None = None
) -> SSDLossOutput:
    """Forward, loss, backward and optimiser step on one batch.

    Args:
        batch: images uint8/float Tensor[B, 3, S, S], boxes Tensor[B, M, 4] relative
            ``(x1, y1, x2, y2)``, labels int64 Tensor[B, M] (0 = padding), on any device.
        augment_seed: where ``run.distort_colours``, the seed of this batch's photometric
            distortion, applied on ``run.device``; None leaves the images as they come.
    """
    images, gt_boxes, gt_labels = batch
    images = images.to(run.device, non_blocking=True)
    if run.distort_colours and augment_seed is not None:
        draws = photometric.draw_params(images.shape[0], torch.Generator().manual_seed(augment_seed))
        images = photometric.distort(images, draws.to(run.device))
    images = images.contiguous(memory_format=memory_format(run.device, run.autocast_dtype))
    gt_boxes, gt_labels = gt_boxes.to(run.device, non_blocking=True), gt_labels.to(run.device, non_blocking=True)
    with autocast(run.device, run.autocast_dtype):
        loc, logits = run.model(images)
    losses = run.loss_fn(loc, logits, gt_boxes, gt_labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses.total).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return losses


def _step_seed(epoch_seed: int, step: int) -> int:
    """The seed of one training step's batch augmentation (steps count from 1 in each epoch)."""
    return (epoch_seed * 1_000_003 + step) % 2**63


def _raise_if_diverged(first_bad_step: torch.Tensor, epoch: int) -> None:
    step = int(first_bad_step)
    if step >= 0:
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at epoch {epoch}, step {step}: training diverged. "
            "Try a lower learning_rate, or the vgg16_bn backbone."
        )


@torch.inference_mode()
def evaluate(
    model: SSD300,
    loss_fn: SSDLoss,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    interrupted: Callable[[], bool] | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Validation loss and mAP (boxes compared in relative coordinates: IoU does not change with
    scale), or None if ``interrupted`` said so before a batch.

    ``val_ap50_per_class`` maps each class name (``classes``; default: the class id as a string)
    to its AP@0.5, None for a class without boxes in the split; it comes from the same COCO
    evaluation as the mAPs. A JSON object of plain numbers, so the record stays one JSON line.
    """
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    num_classes = model.config.num_classes - 1
    names = list(classes) if classes is not None else [str(i) for i in range(1, num_classes + 1)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model of {num_classes} classes")
    metric = MeanAP(num_classes)
    for images, gt_boxes, gt_labels in loader:
        if interrupted is not None and interrupted():
            return None
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(device, autocast_dtype))
        gt_boxes, gt_labels = gt_boxes.to(device), gt_labels.to(device)
        with autocast(device, autocast_dtype):
            loc, logits = model(images)
        losses = loss_fn(loc, logits, gt_boxes, gt_labels)
        sums += torch.stack([losses.total, losses.loc, losses.conf]).double()
        unit_sizes = torch.ones(images.shape[0], 2, device=device)
        # COCO scores at most 100 detections per image.
        detections = postprocess(
            loc, logits, model.defaults, unit_sizes, variances=model.config.variances, max_detections=100
        )
        metric.update(detections, gt_boxes, gt_labels)
    means = (sums / max(1, len(loader))).tolist()
    scores = metric.compute()
    return {
        "val_loss": means[0],
        "val_loc_loss": means[1],
        "val_conf_loss": means[2],
        "val_map50": scores["map50"],
        "val_map": scores["map"],
        "val_ap50_per_class": {name: scores["per_class"][i]["ap50"] for i, name in enumerate(names, start=1)},
    }


# Fields a resumed run may change: how long it runs and where, not what it trains.
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "amp")


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
    steps = total_steps if total_steps is not None else config.epochs * steps_per_epoch(train_loader)
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


def _build_training(start: Start, data: DetectionData) -> TrainingRun:
    config = start.config
    device = resolve_device(config.device)
    model_config = start.model_config(num_classes=len(data.classes) + 1)
    layout = memory_format(device, amp_dtype(device, config.amp))
    model = build_model(model_config, config, start.load).to(device, memory_format=layout)
    train_loader, val_loader = build_loaders(data, config, model_config, device)
    return build_training_run(model, config, device, train_loader, val_loader)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A distinct seed per epoch, so a resumed run draws the same data order and augmentation."""
    return (seed * 100_003 + epoch) % 2**63


def fit(
    config: TrainConfig,
    data: DetectionData,
    run_dir: Path | RunFolder,
    callbacks: Callbacks | None = None,
    weights: WeightsSource | None = None,
) -> FitResult:
    """Train an SSD on ``data``; everything the run produces goes to ``run_dir``, each file replaced whole
    through ``RunFolder.replace`` (pass a ``RunFolder`` to decide how).

    The weights start as ``config.init`` says (``model.initialisation.plan_start``), read from
    ``weights``; without one, ``auto`` starts from random weights. Writes ``config.json``,
    ``metrics.jsonl`` (one epoch record a line), ``last.pt`` and ``best.pt`` (lowest
    validation loss; training loss without a validation split) and ``losses.png``. If
    ``run_dir/last.pt`` exists the run resumes where it left off (after its last epoch, or
    mid-epoch after a pause) with the same weights, optimiser, schedule and history
    (``callbacks.on_resume`` gets that history); only ``RESUMABLE_CHANGES`` may differ from
    the checkpoint's config. With ``config.patience``, the run completes early once the
    validation mAP@0.5 has not improved for that many epochs (``FitResult.note`` says so).

    Raises:
        ValueError: a dataset with no images, settings that cannot run here, a run folder
            holding a different run, or weights that do not fit (``WeightsError``).
        WeightsUnavailable: the weights ``config.init`` names explicitly cannot be had.
        NonFiniteLossError: a training or validation loss became NaN or infinite.
    """
    callbacks = callbacks or Callbacks()
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(Path(run_dir))
    folder.path.mkdir(parents=True, exist_ok=True)
    if not data.images:
        raise ValueError("the dataset has no images")
    last = folder.file(LAST_CHECKPOINT)
    checkpoint = load_checkpoint(last) if last.exists() else None
    start = resumed_start(config, checkpoint) if checkpoint else plan_start(config, data.classes, weights)
    if callbacks.on_start is not None:
        callbacks.on_start(start)
    run = _build_training(start, data)
    start = dataclasses.replace(start, load=None)  # the starting weights are in the model: not held for the whole run
    try:
        resumed = _resume(last, checkpoint, start.config, data, run) if checkpoint else None
        del checkpoint  # likewise
        result = _train(run, start, data, folder, callbacks, resumed)
    finally:
        _stop_loader_workers(run)
    return dataclasses.replace(result, device=run.device.type, precision=run.precision)


def _train(
    run: TrainingRun,
    start: Start,
    data: DetectionData,
    folder: RunFolder,
    callbacks: Callbacks,
    resumed: tuple[list[dict], float | None, EpochState | None] | None,
) -> FitResult:
    """``fit``'s body, once the run is built (and restored from ``last.pt``: ``resumed``, see ``_resume``)."""
    config = start.config
    history: list[dict] = []
    best: float | None = None  # the lowest selection score so far (see _selection_score)
    partial: EpochState | None = None
    if resumed is not None:
        history, best, partial = resumed
        log.info("resuming %s after epoch %d", folder.path, len(history))
        if callbacks.on_resume is not None:
            callbacks.on_resume(list(history))
    config_json = _config_json(config, run.model.config, data.classes, start.init)
    folder.replace(CONFIG_FILE, lambda f: f.write(config_json))

    def result(status, **details) -> FitResult:
        return _result(status, folder, history, best, init=start.init, **details)

    validation_seconds = history[-1].get("val_seconds", 0.0) if history else 0.0
    for epoch in range(len(history) + 1, config.epochs + 1):
        if partial is None and (note := _out_of_patience(history, config.patience)) is not None:
            return result("completed", note=note)  # resumed after the last epoch it needed
        outcome, epoch_result = _run_epoch(run, config, data.classes, epoch, validation_seconds, callbacks, partial)
        partial = None
        if outcome == "paused":
            _save_checkpoints(folder, run, config, data.classes, history, best, start.init, paused_at=epoch_result)
            return result(outcome, paused_at=(epoch, epoch_result.steps_done))
        if outcome != "done":
            return result(outcome)
        record = epoch_result
        validation_seconds = record["val_seconds"]
        history.append(record)
        score = _selection_score(record)
        improved = best is None or score < best
        best = score if improved else best
        _save_checkpoints(folder, run, config, data.classes, history, best, start.init, improved=improved)
        _write_history(folder, history)
        if callbacks.on_epoch is not None:
            callbacks.on_epoch(record)
        if epoch < config.epochs and (note := _out_of_patience(history, config.patience)) is not None:
            return result("completed", note=note)
        if epoch < config.epochs and (interruption := callbacks.interruption()) is not None:
            return result(interruption)
    return result("completed")


def _out_of_patience(history: list[dict], patience: int | None) -> str | None:
    """Why the run stops early, when the last ``patience`` epochs brought no better validation mAP@0.5
    than an earlier one (a tie is no better); None to go on."""
    if patience is None or not history:
        return None
    scores = [r.get("val_map50") if r.get("val_map50") is not None else -1.0 for r in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first epoch with the best score
    waited = len(history) - 1 - best
    if waited < patience:
        return None
    return (
        f"stopped early after epoch {history[-1]['epoch']}: no better validation mAP@0.5 than epoch "
        f"{history[best]['epoch']}'s {max(scores[best], 0.0):.4f} for {waited} epochs (patience {patience})"
    )


def _stop_loader_workers(run: TrainingRun) -> None:
    """Stop the loaders' persistent worker processes now, not when the loaders are collected: an
    exception's traceback keeps them (and every worker process) alive for as long as it is held."""
    for loader in (run.train_loader, run.val_loader):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            try:
                iterator._shutdown_workers()
            except Exception:  # never hide what ended the run; the collector stops them later
                log.warning("could not stop the data loader's workers", exc_info=True)
            loader._iterator = None


class _Interruption:
    """``evaluate``'s interrupt check that remembers why it fired."""

    def __init__(self, callbacks: Callbacks):
        self.callbacks = callbacks
        self.reason: Literal["cancelled", "paused"] | None = None

    def __call__(self) -> bool:
        self.reason = self.callbacks.interruption()
        return self.reason is not None


def _run_epoch(
    run: TrainingRun,
    config: TrainConfig,
    classes: list[str],
    epoch: int,
    validation_seconds: float,
    callbacks: Callbacks,
    start: EpochState | None,
) -> tuple[Literal["done", "cancelled", "paused"], dict | EpochState | None]:
    """Train and validate one epoch (from ``start`` when resuming mid-epoch).

    Returns ("done", the epoch record), ("paused", the state to carry on from) or ("cancelled", None).
    """
    # The epoch's order and augmentation follow from its seed; a resumed epoch skips what was done.
    done = start.steps_done if start is not None else 0
    seed = _epoch_seed(config.seed, epoch)
    run.train_loader.sampler.set_epoch(seed, skip=done * run.train_loader.batch_size)
    torch.manual_seed(seed)  # anything else random draws the same on resume
    started = time.perf_counter()
    outcome, state = train_one_epoch(run, epoch, config.epochs, callbacks, validation_seconds, start, augment_seed=seed)
    if outcome != "done":
        return outcome, state if outcome == "paused" else None
    validation_started = time.perf_counter()
    val = _no_validation()
    if run.val_loader is not None:
        interruption = _Interruption(callbacks)
        val = evaluate(run.model, run.loss_fn, run.val_loader, run.device, run.autocast_dtype, interruption, classes)
        if val is None:  # when paused here, the resumed epoch goes straight to validation
            return interruption.reason, state if interruption.reason == "paused" else None
        if not math.isfinite(val["val_loss"]):
            raise NonFiniteLossError(f"the validation loss became NaN or infinite at epoch {epoch}")
    now = time.perf_counter()
    means = [total / max(1, state.steps_done) for total in state.loss_sums]
    return "done", {
        "epoch": epoch,
        "train_loss": means[0],
        "train_loc_loss": means[1],
        "train_conf_loss": means[2],
        **val,
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": round(now - started, 3),
        "val_seconds": round(now - validation_started, 3),
    }


def _selection_score(record: dict) -> float:
    """What ``best.pt`` minimises: the validation loss, or the training loss without validation."""
    return record["val_loss"] if record["val_loss"] is not None else record["train_loss"]


def _no_validation() -> dict[str, None]:
    return dict.fromkeys(("val_loss", "val_loc_loss", "val_conf_loss", "val_map50", "val_map", "val_ap50_per_class"))


def _config_json(config: TrainConfig, model_config: ModelConfig, classes: list[str], init: Initialisation) -> bytes:
    payload = {
        "train_config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "classes": classes,
        "init": init.to_dict(),
    }
    return json.dumps(payload, indent=2).encode()


def _resume(
    path: Path, checkpoint: dict[str, Any], config: TrainConfig, data: DetectionData, run: TrainingRun
) -> tuple[list[dict], float | None, EpochState | None]:
    """Restore a run from its last checkpoint (read from ``path``): its history, best selection score,
    and the state of an epoch paused half-way (None after a whole epoch)."""
    if checkpoint["classes"] != data.classes:
        raise ValueError(
            f"{path} was trained on classes {checkpoint['classes']}, not this dataset's {data.classes}: "
            "use a new run folder"
        )
    saved, current = checkpoint.get("train_config", {}), config.to_dict()
    # Settings a checkpoint predates are not changes; the synonym's meaning is in init.
    compared = [k for k in current if k in saved and k not in RESUMABLE_CHANGES and k != "pretrained_backbone"]
    changed = sorted(k for k in compared if saved[k] != current[k])
    if changed:
        raise ValueError(
            f"{path} belongs to a run with different settings ({', '.join(changed)}); "
            f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}: use a new run folder"
        )
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler_state = dict(checkpoint["scheduler"])
    # Keep this run's schedule (its length follows the current epochs), only the step count carries over.
    scheduler_state["lr_lambdas"] = [None] * len(run.scheduler.lr_lambdas)
    run.scheduler.load_state_dict(scheduler_state)
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    paused = checkpoint.get("paused_epoch")
    partial = EpochState(paused["steps_done"], tuple(paused["loss_sums"])) if paused else None
    return list(checkpoint["history"]), checkpoint.get("best_score"), partial


def _save_checkpoints(
    folder: RunFolder,
    run: TrainingRun,
    config: TrainConfig,
    classes: list[str],
    history: list[dict],
    best: float | None,
    init: Initialisation,
    improved: bool = False,
    paused_at: EpochState | None = None,
) -> None:
    """``last.pt`` (and ``best.pt`` when ``improved``), each written atomically.

    ``last.pt`` is the commit point: its history is what a resumed run continues from. A
    paused run's ``last.pt`` also holds the unfinished epoch's totals (``paused_epoch``).
    """
    state = {
        "epoch": len(history),
        "classes": list(classes),
        "model_config": run.model.config.to_dict(),
        "train_config": config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "best_score": best,
        "history": history,
        "init": init.to_dict(),
        "paused_epoch": None
        if paused_at is None
        else {"steps_done": paused_at.steps_done, "loss_sums": list(paused_at.loss_sums)},
    }
    folder.replace(LAST_CHECKPOINT, checkpoint_writer(state))
    if improved:
        # Serving needs no optimiser state: keep the best checkpoint small.
        folder.replace(BEST_CHECKPOINT, checkpoint_writer({**state, "optimizer": {}, "scheduler": {}, "scaler": None}))


def _write_history(folder: RunFolder, history: list[dict]) -> None:
    """metrics.jsonl and losses.png, derived from the history (they may lag last.pt by an epoch after a crash)."""
    lines = "".join(json.dumps(record) + "\n" for record in history).encode()
    folder.replace(METRICS_FILE, lambda f: f.write(lines))
    png = plot_losses(history)
    folder.replace(LOSS_PLOT, lambda f: f.write(png))


def _result(
    status,
    folder: RunFolder,
    history: list[dict],
    best: float | None,
    paused_at: tuple[int, int] | None = None,
    init: Initialisation | None = None,
    note: str | None = None,
) -> FitResult:
    last, best_path = folder.file(LAST_CHECKPOINT), folder.file(BEST_CHECKPOINT)
    validated = bool(history) and history[-1]["val_loss"] is not None
    return FitResult(
        status=status,
        epochs_completed=history[-1]["epoch"] if history else 0,
        best_val_loss=best if validated else None,
        last_checkpoint=last if last.exists() else None,
        best_checkpoint=best_path if best_path.exists() else None,
        history=history,
        paused_at=paused_at,
        init=init,
        note=note,
    )
