"""Running one training job: from a job id in Redis to a ``fit`` call and back into Redis.

Nothing here knows about Celery; ``worker.tasks`` calls ``run_job``. The job's lease is
the single-runner guarantee: ``run_job`` trains only while it holds the lease and renews
it from a background thread; if renewal fails, training stops at the next batch and the
job record is left to whoever holds the lease now.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from model.config import TrainConfig
from model.data import read_dataset
from model.engine import Callbacks, StepProgress, fit
from worker.settings import Settings
from worker.store import ACTIVE, CANCELLED, FAILED, SUCCEEDED, Lease, Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews a job lease every third of its TTL from a daemon thread; ``lost`` is set if it cannot."""

    def __init__(self, store: Store, lease: Lease):
        self.store = store
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssd-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.store.release_lease(self.lease)
        except Exception as error:  # it expires on its own
            log.warning("could not release lease %s: %s", self.lease.key, error)

    def renew(self) -> None:
        """Renew now; sets ``lost`` if the lease expired or another runner holds it."""
        try:
            if not self.store.renew_lease(self.lease):
                self.lost.set()
        except Exception as error:  # Redis away: keep trying until the TTL says otherwise
            log.warning("lease renewal failed: %s", error)

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_ms / 3000):
            self.renew()
            if self.lost.is_set():
                log.error("lost the lease %s: stopping at the next batch", self.lease.key)
                return


class JobReporter:
    """``fit``'s callbacks for one job: progress, epoch records and the stop signal, into Redis.

    Progress is written at most every ``progress_interval`` seconds (and on an epoch's first
    step); the cancel flag is read at most every ``cancel_interval`` seconds, so a batch
    costs no Redis round trip in between.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        keeper: LeaseKeeper,
        progress_interval: float,
        cancel_interval: float,
        best_val_loss: float | None = None,
    ):
        self.store = store
        self.job_id = job_id
        self.keeper = keeper
        self.progress_interval = progress_interval
        self.cancel_interval = cancel_interval
        self.best_val_loss = best_val_loss
        self._last_progress = -float("inf")
        self.progress: dict[str, Any] | None = None
        self._last_cancel_check = -float("inf")
        self._cancelled = False

    def callbacks(self) -> Callbacks:
        return Callbacks(on_step=self.on_step, on_epoch=self.on_epoch, should_stop=self.should_stop)

    def on_step(self, progress: StepProgress) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.progress_interval and progress.step > 1:
            return
        self._last_progress = now
        self.progress = {
            "epoch": progress.epoch,
            "step": progress.step,
            "steps_per_epoch": progress.steps_per_epoch,
            "eta_seconds": round(float(progress.eta_seconds), 1),
            "loss": float(progress.loss),
            "images_per_second": round(float(progress.images_per_second), 2),
        }
        self.store.update_job(self.job_id, epoch=progress.epoch, progress=self.progress)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.store.append_epoch(self.job_id, record)
        val_loss = record.get("val_loss")
        if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = float(val_loss)
        self.store.update_job(
            self.job_id, epoch=record["epoch"], epochs_completed=record["epoch"], best_val_loss=self.best_val_loss
        )
        self.keeper.renew()

    def should_stop(self) -> bool:
        if self.keeper.lost.is_set():
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= self.cancel_interval:
            self._last_cancel_check = now
            try:
                self._cancelled = self.store.cancel_requested(self.job_id)
            except Exception as error:  # Redis away: keep training, look again later
                log.warning("cancel check failed: %s", error)
        return self._cancelled


def backfill_losses(store: Store, job_id: str, run_dir: Path) -> int:
    """Append epochs from ``run_dir/metrics.jsonl`` that the loss stream lacks (a resumed job).

    A worker that died after writing an epoch's checkpoint and metrics line but before its
    stream entry leaves a gap that ``fit``'s resume would not fill. Returns the number appended.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    appended = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            appended += store.append_epoch(job_id, json.loads(line))
    return appended


def training_config(job: dict[str, Any], settings: Settings) -> TrainConfig:
    """The job's ``TrainConfig``; a job that leaves the device to the service gets ``SSD_DEVICE``."""
    values = dict(job["config"])
    if values.get("device", "auto") == "auto":
        values["device"] = settings.device
    return TrainConfig.from_dict(values)


def run_job(job_id: str, store: Store, settings: Settings, worker_name: str) -> str:
    """Train job ``job_id`` to its end if it is queued (or running with a free lease).

    Returns:
        What happened, for the task's log line: the final status or why nothing was done.
    """
    job = store.get_job(job_id)
    if job is None:
        log.warning("job %s does not exist; nothing to do", job_id)
        return "missing"
    if job["status"] not in ACTIVE:
        log.info("job %s is %s; not starting it", job_id, job["status"])
        return f"skipped: {job['status']}"
    lease = store.acquire_lease(job_id, f"{worker_name}/{secrets.token_hex(4)}", settings.lease_seconds)
    if lease is None:
        log.info("job %s is leased by %s; not running it twice", job_id, store.lease_holder(job_id))
        return "skipped: leased"
    with LeaseKeeper(store, lease) as keeper:
        before = store.start_job(job_id, worker_name)
        if before not in ACTIVE:
            return f"skipped: {before}"
        try:
            status, fields = _train(store.get_job(job_id) or job, store, settings, keeper)
        except Exception as error:
            log.exception("job %s failed", job_id)
            if keeper.lost.is_set():
                return "lease lost"
            store.finish_job(job_id, FAILED, error=f"{type(error).__name__}: {error}")
            return FAILED
        if keeper.lost.is_set():
            return "lease lost"  # someone else runs the job now: its record is theirs to write
        store.finish_job(job_id, status, **fields)
        return status


def _train(job: dict[str, Any], store: Store, settings: Settings, keeper: LeaseKeeper) -> tuple[str, dict[str, Any]]:
    dataset = store.get_dataset(job["dataset_id"])
    if dataset is None:
        raise ValueError(f"dataset {job['dataset_id']} was deleted")
    data = read_dataset(settings.datasets_dir / dataset["id"] / dataset["root"])
    config = training_config(job, settings)
    run_dir = settings.runs_dir / job["id"]
    backfill_losses(store, job["id"], run_dir)
    reporter = JobReporter(
        store,
        job["id"],
        keeper,
        settings.progress_interval_seconds,
        settings.cancel_check_seconds,
        best_val_loss=job.get("best_val_loss"),
    )
    result = fit(config, data, run_dir, reporter.callbacks())
    checkpoint = result.best_checkpoint or result.last_checkpoint
    fields: dict[str, Any] = {
        "epochs_completed": result.epochs_completed,
        "checkpoint": checkpoint.name if checkpoint is not None else None,
        "best_val_loss": result.best_val_loss if result.best_val_loss is not None else reporter.best_val_loss,
    }
    if result.status == "completed":
        if reporter.progress is not None:
            fields["progress"] = {**reporter.progress, "eta_seconds": 0.0}
        return SUCCEEDED, {**fields, "epoch": result.epochs_completed}
    return CANCELLED, fields
