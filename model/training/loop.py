"""The loop, one pass at a time (torchvision's detection references' ``engine.py``): the training step, a
training epoch and validation, and one epoch of a run (train, then validate, into the epoch's record).

``Callbacks`` are how a caller watches and steers it: progress, epoch records, cancel and pause.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data import photometric
from ..data.dataset import SeededSampler
from ..device import autocast, memory_format
from ..initialisation import Start
from ..loss import SSDLoss, SSDLossOutput
from ..metrics import MeanAP
from ..network import SSD300
from ..postprocess import postprocess
from .setup import TrainingRun, steps_per_epoch

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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run is diverging (learning rate too high?)."""


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
    steps = steps_per_epoch(run.training_loader)
    if start.steps_done >= steps:  # paused during validation: training is already done
        return "done", start
    sums = torch.tensor(start.loss_sums, device=run.device, dtype=torch.float64)
    first_bad_step = torch.full((), -1, device=run.device, dtype=torch.int64)
    reporter = _Reporter(callbacks, epoch, epochs, steps, validation_seconds)
    # The sampler skips the steps done before a pause (see _run_epoch): the rest come as they would have.
    for step, batch in enumerate(run.training_loader, start=start.steps_done + 1):
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


def _step_seed(seed: int, step: int) -> int:
    """The seed of one training step's batch augmentation (steps count from 1 in each epoch)."""
    return (seed * 1_000_003 + step) % 2**63


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


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct seed per epoch, so a resumed run draws the same data order and augmentation."""
    return (seed * 100_003 + epoch) % 2**63


class _Interruption:
    """``evaluate``'s interrupt check that remembers why it fired."""

    def __init__(self, callbacks: Callbacks):
        self.callbacks = callbacks
        self.reason: Literal["cancelled", "paused"] | None = None

    def __call__(self) -> bool:
        self.reason = self.callbacks.interruption()
        return self.reason is not None


def run_epoch(
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
    seed = epoch_seed(config.seed, epoch)
    loader = run.training_loader
    cast(SeededSampler, loader.sampler).set_epoch(seed, skip=done * (loader.batch_size or 1))
    torch.manual_seed(seed)  # anything else random draws the same on resume
    started = time.perf_counter()
    outcome, state = train_one_epoch(run, epoch, config.epochs, callbacks, validation_seconds, start, augment_seed=seed)
    if outcome != "done":
        return outcome, state if outcome == "paused" else None
    validation_started = time.perf_counter()
    val = _no_validation()
    if run.val_loader is not None:
        interruption = _Interruption(callbacks)
        scored = evaluate(run.model, run.loss_fn, run.val_loader, run.device, run.autocast_dtype, interruption, classes)
        if scored is None:  # when paused here, the resumed epoch goes straight to validation
            reason = cast(Literal["cancelled", "paused"], interruption.reason)  # evaluate stops only when interrupted
            return reason, state if reason == "paused" else None
        val = scored
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


def _no_validation() -> dict[str, Any]:
    return dict.fromkeys(("val_loss", "val_loc_loss", "val_conf_loss", "val_map50", "val_map", "val_ap50_per_class"))
