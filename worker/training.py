"""Running one training job: from a job id in Redis to a ``fit`` call and back into Redis.

Nothing here knows about Celery: ``worker.tasks`` calls ``run_job`` with a ``dispatch``
function that sends the job's task again. The job's lease is the single-runner guarantee:
``run_job`` trains only while it holds it, and a job whose runner vanished is put back by
``worker.reaper`` once the lease has expired.

The training thread never waits on Redis. A ``JobMonitor`` thread renews the lease (and
takes it back if it lapsed while Redis was away and nobody else took it), reads the cancel
flag, writes progress and appends epoch records in order, each best-effort and retried: a
Redis restart in the middle of a job delays its records but neither fails nor stalls it.

A worker told to shut down (SIGTERM: ``shutdown`` is set) pauses the job at the next batch:
the engine writes a mid-epoch checkpoint, the job goes back to the queue with its lease
released, and the next free worker carries on from that batch.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import atomic_write
from model.config import TrainConfig
from model.data import read_dataset
from model.engine import Callbacks, FitResult, StepProgress, fit
from worker.reaper import JOB_FILE, send_quietly
from worker.settings import Settings
from worker.store import ACTIVE, CANCELLED, FAILED, QUEUED, SUCCEEDED, Lease, Store

log = logging.getLogger(__name__)


class _QuietLog:
    """Logs the first failure of a kind, then at most one line per ``every`` seconds until it works again."""

    def __init__(self, what: str, every: float = 30.0):
        self.what, self.every = what, every
        self._failing_since: float | None = None
        self._last_logged = -float("inf")

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_logged >= self.every:
            self._last_logged = now
            log.warning("%s failed (for %.0fs now; will retry): %s", self.what, now - self._failing_since, error)

    def worked(self) -> None:
        if self._failing_since is not None:
            log.info("%s works again after %.0fs", self.what, time.monotonic() - self._failing_since)
        self._failing_since = None
        self._last_logged = -float("inf")


class JobMonitor:
    """The bridge between a running ``fit`` and Redis, on a thread of its own.

    The training thread calls ``on_step``, ``on_epoch``, ``on_resume`` (which only queue
    work) and ``should_stop`` (which only reads flags). The thread, every
    ``cancel_interval`` seconds: reads the cancel flag, renews the lease every third of its
    TTL, appends the pending epoch records in epoch order (each exactly once: the stream
    refuses an epoch it has) and writes the newest progress at most every
    ``progress_interval`` seconds. Whatever fails is retried at the next tick.
    """

    def __init__(
        self,
        store: Store,
        lease: Lease,
        cancel_interval: float,
        progress_interval: float,
        best_val_loss: float | None = None,
    ):
        self.store = store
        self.lease = lease
        self.job_id = lease.job_id
        self.cancel_interval = cancel_interval
        self.progress_interval = progress_interval
        self.best_val_loss = best_val_loss
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self.progress: dict[str, Any] | None = None
        self._progress_written = True
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _pending and the progress fields
        self._flush_lock = threading.Lock()  # one flush at a time (the thread, or drain())
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._training_done = False
        self._thread = threading.Thread(target=self._run, name=f"ssd-monitor-{self.job_id}", daemon=True)
        self._logs = {name: _QuietLog(f"{name} of job {self.job_id}") for name in ("lease", "cancel", "records")}

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    # --- called from the training thread: none of these touches Redis -------------------------

    def callbacks(self, should_pause: Callable[[], bool]) -> Callbacks:
        return Callbacks(
            on_step=self.on_step,
            on_epoch=self.on_epoch,
            on_resume=self.on_resume,
            should_stop=self.should_stop,
            should_pause=should_pause,
        )

    def on_step(self, progress: StepProgress) -> None:
        with self._lock:
            self.progress = {
                "epoch": progress.epoch,
                "step": progress.step,
                "steps_per_epoch": progress.steps_per_epoch,
                "eta_seconds": round(float(progress.eta_seconds), 1),
                "loss": float(progress.loss),
                "images_per_second": round(float(progress.images_per_second), 2),
            }
            self._progress_written = False

    def on_epoch(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append(dict(record))
        self._wake.set()

    def on_resume(self, history: list[dict[str, Any]]) -> None:
        """The resumed checkpoint's epochs: those the loss stream lacks are appended (a crash may
        have come between the checkpoint and the stream entry)."""
        with self._lock:
            self._pending[:0] = [dict(record) for record in history]
        self._wake.set()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        renew_every = self.lease.ttl_ms / 3000
        next_renew = time.monotonic() + renew_every
        next_progress = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_renew:
                next_renew = now + (renew_every if self.renew() else min(renew_every, 1.0))
                if self.lost.is_set():
                    log.error("job %s is no longer this runner's (requeued or taken over): stopping", self.job_id)
                    return
            self._check_cancel()
            self.flush()
            if not self._training_done and now >= next_progress and self._write_progress():
                next_progress = now + self.progress_interval
            self._wake.wait(self.cancel_interval)
            self._wake.clear()

    def renew(self) -> bool:
        """Renew (or take back) the lease; sets ``lost`` if another runner has it. False if Redis failed."""
        try:
            if not self.store.renew_lease(self.lease):
                self.lost.set()
        except Exception as error:  # Redis away: the TTL decides, keep trying
            self._logs["lease"].failed(error)
            return False
        self._logs["lease"].worked()
        return True

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            return
        try:
            if self.store.cancel_requested(self.job_id):
                self.cancelled.set()
        except Exception as error:
            self._logs["cancel"].failed(error)
        else:
            self._logs["cancel"].worked()

    def _write_progress(self) -> bool:
        with self._lock:
            if self._progress_written or self.progress is None:
                return False
            progress = dict(self.progress)
            self._progress_written = True
        try:
            self.store.update_job(self.job_id, epoch=progress["epoch"], progress=progress)
        except Exception as error:  # best-effort: the next one will do
            self._logs["records"].failed(error)
        return True

    def flush(self) -> bool:
        """Append the pending epoch records in order and update the job's epoch fields; True when none is left."""
        with self._flush_lock:
            with self._lock:
                records = list(self._pending)
            if not records:
                return True
            try:
                last = self.store.last_epoch(self.job_id)
                for record in records:
                    if record["epoch"] > last:
                        self.store.append_epoch(self.job_id, record)
                        last = record["epoch"]
                    val_loss = record.get("val_loss")
                    if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
                        self.best_val_loss = float(val_loss)
                newest = records[-1]["epoch"]
                self.store.update_job(
                    self.job_id, epoch=newest, epochs_completed=newest, best_val_loss=self.best_val_loss
                )
            except Exception as error:
                self._logs["records"].failed(error)
                return False
            self._logs["records"].worked()
            with self._lock:
                del self._pending[: len(records)]
                return not self._pending

    def drain(self, timeout: float) -> bool:
        """After training: no more progress; wait until every epoch record is in Redis, or ``timeout``."""
        self._training_done = True
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not self.flush():
            if time.monotonic() + delay > deadline or self.lost.is_set():
                return False
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return True


def retry_redis(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """``call()``, retried with backoff on errors for up to ``timeout`` seconds (then its error)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return call()
        except Exception as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, error)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def training_config(job: dict[str, Any], settings: Settings) -> TrainConfig:
    """The job's ``TrainConfig``; a job that leaves the device to the service gets ``SSD_DEVICE``."""
    values = dict(job["config"])
    if values.get("device", "auto") == "auto":
        values["device"] = settings.device
    return TrainConfig.from_dict(values)


def write_job_file(run_dir: Path, record: dict[str, Any]) -> None:
    """The job's record as ``run_dir/job.json`` (atomic), from which ``worker.reaper`` rebuilds a lost one."""
    data = json.dumps(record, indent=2, default=str).encode()
    atomic_write(run_dir / JOB_FILE, lambda f: f.write(data))


@dataclass
class _Outcome:
    status: str  # succeeded, failed, cancelled, or paused (requeued to carry on elsewhere)
    fields: dict[str, Any] = field(default_factory=dict)


def run_job(
    job_id: str,
    store: Store,
    settings: Settings,
    worker_name: str,
    dispatch: Callable[[str], None] | None = None,
    shutdown: threading.Event | None = None,
    task_id: str | None = None,
) -> str:
    """Train job ``job_id`` if it is queued (or running with a free lease): to its end, or until paused.

    Args:
        dispatch: sends the job's task again (after a pause); None leaves that to the reaper.
        shutdown: set when the worker must stop: the job pauses at the next batch and is requeued.
        task_id: the id of the message being run, to tell the store it arrived.

    Returns:
        What happened, for the task's log line: the final status or why nothing was done.
    """
    shutdown = shutdown or threading.Event()
    grace = settings.lease_seconds

    def take() -> dict[str, Any] | None:
        if task_id is not None:
            store.clear_dispatch(job_id, task_id)
        return store.get_job(job_id)

    job = retry_redis(take, grace, f"reading job {job_id}")
    if job is None:
        log.warning("job %s does not exist; nothing to do", job_id)
        return "missing"
    if job["status"] not in ACTIVE:
        log.info("job %s is %s; not starting it", job_id, job["status"])
        return f"skipped: {job['status']}"
    token = f"{worker_name}/{secrets.token_hex(4)}"
    lease = store.acquire_lease(job_id, token, settings.lease_seconds)
    if lease is None:
        log.info("job %s is leased by %s; not running it twice", job_id, store.lease_holder(job_id))
        return "skipped: leased"
    before = store.start_job(job_id, worker_name, token)
    if before not in ACTIVE:
        store.release_lease(lease)
        return f"skipped: {before}"
    job = store.get_job(job_id) or job
    log.info("job %s: training on %s (it was %s, restarts %s)", job_id, worker_name, before, job.get("restarts", 0))
    run_dir = settings.runs_dir / job_id
    write_job_file(run_dir, job)

    monitor = JobMonitor(
        store, lease, settings.cancel_check_seconds, settings.progress_interval_seconds, job.get("best_val_loss")
    )
    with monitor:
        try:
            result = _train(job, store, settings, run_dir, monitor.callbacks(shutdown.is_set))
            outcome = _outcome(result, monitor, shutdown)
        except Exception as error:
            log.exception("job %s failed", job_id)
            outcome = _Outcome(FAILED, {"error": f"{type(error).__name__}: {error}"})
        if monitor.lost.is_set():
            return "lease lost"  # someone else runs the job now: its record is theirs to write
        if not monitor.drain(grace):
            log.error("job %s: epoch records could not be written; the reaper will resume the job", job_id)
            return "unrecorded"
    return _record(job, outcome, store, lease, settings, worker_name, dispatch, run_dir)


def _train(job: dict[str, Any], store: Store, settings: Settings, run_dir: Path, callbacks: Callbacks) -> FitResult:
    dataset = store.get_dataset(job["dataset_id"])
    if dataset is None:
        raise ValueError(f"dataset {job['dataset_id']} was deleted")
    data = read_dataset(settings.datasets_dir / dataset["id"] / dataset["root"])
    return fit(training_config(job, settings), data, run_dir, callbacks)


def _outcome(result: FitResult, monitor: JobMonitor, shutdown: threading.Event) -> _Outcome:
    checkpoint = result.best_checkpoint or result.last_checkpoint
    fields: dict[str, Any] = {
        "epoch": result.epochs_completed,
        "epochs_completed": result.epochs_completed,
        "checkpoint": checkpoint.name if checkpoint is not None else None,
        "best_val_loss": result.best_val_loss if result.best_val_loss is not None else monitor.best_val_loss,
    }
    if result.status == "completed":
        if monitor.progress is not None:
            fields["progress"] = {**monitor.progress, "eta_seconds": 0.0}
        return _Outcome(SUCCEEDED, fields)
    if monitor.cancelled.is_set():
        return _Outcome(CANCELLED, fields)
    if result.status == "paused" or shutdown.is_set():
        return _Outcome("paused", {"epochs_completed": result.epochs_completed, "paused_at": result.paused_at})
    return _Outcome(CANCELLED, fields)


def _record(
    job: dict[str, Any],
    outcome: _Outcome,
    store: Store,
    lease: Lease,
    settings: Settings,
    worker_name: str,
    dispatch: Callable[[str], None] | None,
    run_dir: Path,
) -> str:
    """Write the outcome to Redis (retried within the lease's TTL) and to the run folder's job.json."""
    job_id = job["id"]
    if outcome.status == "paused":
        epoch, step = outcome.fields["paused_at"] or (outcome.fields["epochs_completed"] + 1, None)
        where = f"epoch {epoch}" if step is None else f"epoch {epoch} after step {step}"
        reason = f"{worker_name} was shut down in {where}; the job carries on from there"
        try:
            requeued = retry_redis(lambda: store.requeue_job(job_id, reason, lease), settings.lease_seconds, "requeue")
        except Exception as error:  # the lease expires and the reaper requeues the job
            log.error("job %s could not be requeued (%s); the reaper will", job_id, error)
            return "paused"
        if not requeued:
            return "lease lost"
        write_job_file(run_dir, {**job, "status": QUEUED, "restart_reason": reason})
        if dispatch is not None:
            send_quietly(dispatch, job_id)
        log.info("job %s paused and requeued: %s", job_id, reason)
        return "paused"

    def finish() -> bool:
        return store.finish_job(job_id, outcome.status, lease=lease, **outcome.fields)

    try:
        written = retry_redis(finish, settings.lease_seconds, f"recording the end of job {job_id}")
    except Exception as error:  # the lease expires; the reaper requeues the job and a resume records it
        log.error("job %s ended %s but Redis could not record it: %s", job_id, outcome.status, error)
        return "unrecorded"
    if not written:
        return "lease lost"
    record = {**job, **outcome.fields, "status": outcome.status}
    try:
        write_job_file(run_dir, record)
    except OSError as error:
        log.warning("could not update %s: %s", run_dir / JOB_FILE, error)
    return outcome.status
