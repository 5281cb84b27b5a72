"""A run's life: ``fit`` starts a run (or resumes one from its last checkpoint), runs its epochs, writes
each one's checkpoints and history into the run folder, and ends it: completed, stopped early (patience),
cancelled or paused."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from ..checkpoint import RunCheckpoint, read_checkpoint
from ..config import ModelConfig, TrainConfig
from ..data.annotations import DetectionData
from ..device import Precision
from ..initialisation import Initialisation, Start, WeightsSource, plan_start, resumed_start
from ..plots import plot_losses
from ..run_folder import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, LOSS_PLOT, METRICS_FILE, RunFolder
from .loop import Callbacks, EpochState, run_epoch
from .setup import TrainingRun, build_run

log = logging.getLogger(__name__)


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


# Fields a resumed run may change: how long it runs and where, not what it trains.
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "amp")


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
    checkpoint = read_checkpoint(last) if last.exists() else None
    start = resumed_start(config, checkpoint) if checkpoint else plan_start(config, data.classes, weights)
    if callbacks.on_start is not None:
        callbacks.on_start(start)
    run = build_run(start, data)
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
        outcome, epoch_result = run_epoch(run, config, data.classes, epoch, validation_seconds, callbacks, partial)
        partial = None
        if outcome == "paused":
            paused_at = cast(EpochState, epoch_result)  # run_epoch's state to carry on from
            _save_checkpoints(folder, run, config, data.classes, history, best, start.init, paused_at=paused_at)
            return result(outcome, paused_at=(epoch, paused_at.steps_done))
        if outcome != "done":
            return result(outcome)
        record = cast(dict, epoch_result)  # run_epoch's record of a finished epoch
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
    scores = [float(r["val_map50"]) if r.get("val_map50") is not None else -1.0 for r in history]
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
        if loader is None:
            continue
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            try:
                iterator._shutdown_workers()
            except Exception:  # never hide what ended the run; the collector stops them later
                log.warning("could not stop the data loader's workers", exc_info=True)
            loader._iterator = None


def _selection_score(record: dict) -> float:
    """What ``best.pt`` minimises: the validation loss, or the training loss without validation."""
    return record["val_loss"] if record["val_loss"] is not None else record["train_loss"]


def _config_json(config: TrainConfig, model_config: ModelConfig, classes: list[str], init: Initialisation) -> bytes:
    payload = {
        "train_config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "classes": classes,
        "init": init.to_dict(),
    }
    return json.dumps(payload, indent=2).encode()


def _resume(
    path: Path, checkpoint: RunCheckpoint, config: TrainConfig, data: DetectionData, run: TrainingRun
) -> tuple[list[dict], float | None, EpochState | None]:
    """Restore a run from its last checkpoint (read from ``path``): its history, best selection score,
    and the state of an epoch paused half-way (None after a whole epoch)."""
    if checkpoint.classes != data.classes:
        raise ValueError(
            f"{path} was trained on classes {checkpoint.classes}, not this dataset's {data.classes}: "
            "use a new run folder"
        )
    saved, current = checkpoint.train_config, config.to_dict()
    # Settings a checkpoint predates are not changes; the synonym's meaning is in init.
    compared = [k for k in current if k in saved and k not in RESUMABLE_CHANGES and k != "pretrained_backbone"]
    changed = sorted(k for k in compared if saved[k] != current[k])
    if changed:
        raise ValueError(
            f"{path} belongs to a run with different settings ({', '.join(changed)}); "
            f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}: use a new run folder"
        )
    run.model.load_state_dict(checkpoint.model)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    scheduler_state = dict(checkpoint.scheduler)
    # Keep this run's schedule (its length follows the current epochs), only the step count carries over.
    scheduler_state["lr_lambdas"] = [None] * len(run.scheduler.lr_lambdas)
    run.scheduler.load_state_dict(scheduler_state)
    if checkpoint.scaler:
        run.scaler.load_state_dict(checkpoint.scaler)
    paused = checkpoint.paused_epoch
    partial = EpochState(paused["steps_done"], tuple(paused["loss_sums"])) if paused else None
    return list(checkpoint.history), checkpoint.best_score, partial


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
    checkpoint = RunCheckpoint(
        epoch=len(history),
        classes=list(classes),
        model_config=run.model.config.to_dict(),
        model=run.model.state_dict(),
        train_config=config.to_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        best_score=best,
        history=history,
        init=init.to_dict(),
        paused_epoch=None
        if paused_at is None
        else {"steps_done": paused_at.steps_done, "loss_sums": list(paused_at.loss_sums)},
    )
    folder.replace(LAST_CHECKPOINT, checkpoint.writer())
    if improved:
        folder.replace(BEST_CHECKPOINT, checkpoint.for_serving().writer())


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
