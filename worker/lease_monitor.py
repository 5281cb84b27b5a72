"""A running job's monitor thread: the bridge between ``fit`` and Redis.

The training thread never waits on Redis. A ``JobMonitor`` thread renews the job's lease
(``core.lease``), reads the cancel flag, writes progress and the run's epoch records, each
retried at its next tick: a short Redis outage delays the records but neither fails nor stalls
the job. An outage longer than the lease's trusted part (``core.lease.TRUST_FRACTION``) stops
the run before its next batch; the reaper then puts the job back and it resumes from its
checkpoint. ``worker.job_runner`` starts one for each run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core.layout import BEST_CHECKPOINT
from core.lease import Lease, LostReason
from core.store import REDIS_ERRORS, Store
from model.initialisation import Start
from model.training import Callbacks, StepProgress

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
    work) and ``should_stop`` (which only reads flags and the clock). The thread, every
    ``cancel_interval`` seconds: reads the cancel flag, renews the lease every third of its
    TTL, makes the job's loss stream hold the run's history (appending new epochs, or
    rewriting a stream Redis lost an entry of) and writes the newest progress at most every
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
        self.cancelled = threading.Event()
        self.progress: dict[str, Any] | None = None
        self._progress_written = True
        self.start_fields: dict[str, Any] = {}  # how the run started (init_used...), for the record
        self._start_written = True
        self._history: list[dict[str, Any]] = []  # the run's epoch records, epochs 1 to n
        self.new_epochs = 0  # finished by this run (not resumed from its checkpoint)
        self._synced = 0  # how many of them Redis is known to hold
        self._lock = threading.Lock()  # guards _history, _synced and the progress fields
        self._sync_lock = threading.Lock()  # one sync at a time (the thread, or drain())
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
            on_start=self.on_start,
            should_stop=self.should_stop,
            should_pause=should_pause,
        )

    def on_start(self, start: Start) -> None:
        """Where the weights start and the backbone they fit: for the job's record at the next tick."""
        with self._lock:
            self.start_fields = {**start.init.to_dict(), "backbone": start.config.backbone}
            self._start_written = False
        self._wake.set()

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
            self._history.append(dict(record))
            self.new_epochs += 1
        self._wake.set()

    def on_resume(self, history: list[dict[str, Any]]) -> None:
        """The resumed checkpoint's epochs: the loss stream gets those it lacks (a crash may have come
        between the checkpoint and the stream entry, or Redis may have lost entries)."""
        with self._lock:
            self._history = [dict(record) for record in history]
            self._synced = 0
        self._wake.set()

    def should_stop(self) -> bool:
        """Cancelled, or the lease is lost or no longer trusted: stop before the next batch."""
        return self.cancelled.is_set() or not self.lease.trusted()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        renew_every = self.lease.ttl_ms / 3000
        next_renew = time.monotonic() + renew_every
        next_progress = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_renew:
                next_renew = now + (renew_every if self.renew() else min(renew_every, 1.0))
            if self.lease.lost is not None:
                return  # the training thread sees it before its next batch (should_stop)
            self._check_cancel()
            self.sync()
            self._write_start()
            if not self._training_done and now >= next_progress and self._write_progress():
                next_progress = now + self.progress_interval
            self._wake.wait(self.cancel_interval)
            self._wake.clear()

    def renew(self) -> bool:
        """Renew (or take back) the lease; ``lease.lost`` is set if another run has it. False if Redis failed."""
        try:
            self.store.leases.renew(self.lease)
        except REDIS_ERRORS as error:  # Redis away: the lease's trusted time decides
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
        except REDIS_ERRORS as error:
            self._logs["cancel"].failed(error)
        else:
            self._logs["cancel"].worked()

    def _write_start(self) -> None:
        with self._lock:
            if self._start_written:
                return
            fields, self._start_written = dict(self.start_fields), True
        try:
            self.store.update_running(self.lease, **fields)
        except REDIS_ERRORS as error:  # the job's last write carries them too
            self._logs["records"].failed(error)
            with self._lock:
                self._start_written = False

    def _write_progress(self) -> bool:
        with self._lock:
            if self._progress_written or self.progress is None:
                return False
            progress = dict(self.progress)
            self._progress_written = True
        try:
            self.store.update_running(self.lease, epoch=progress["epoch"], progress=progress)
        except REDIS_ERRORS as error:  # best-effort: the next one will do
            self._logs["records"].failed(error)
        return True

    def sync(self) -> bool:
        """Make the job's loss stream and epoch fields hold the run's history; True when Redis has it all."""
        with self._sync_lock:
            with self._lock:
                history, synced = list(self._history), self._synced
            if synced == len(history):
                return True
            for record in history[synced:]:
                val_loss = record.get("val_loss")
                if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
                    self.best_val_loss = float(val_loss)
            newest = len(history)
            try:
                # Each finished epoch's checkpoint is on disk before its record: a job that ends without
                # its run (cancelled while its worker was dead) can still serve /detect.
                written = self.store.sync_epochs(
                    self.lease,
                    history,
                    epoch=newest,
                    epochs_completed=newest,
                    best_val_loss=self.best_val_loss,
                    checkpoint=BEST_CHECKPOINT if newest else None,
                )
            except REDIS_ERRORS as error:
                self._logs["records"].failed(error)
                return False
            self._logs["records"].worked()
            if written is None:
                self.lease.lost = self.lease.lost or LostReason.TAKEN
                return False
            with self._lock:
                if self._history[:newest] == history:
                    self._synced = max(self._synced, newest)
                return self._synced == len(self._history)

    def drain(self, timeout: float) -> bool:
        """After training: no more progress; wait until Redis holds every epoch record, or ``timeout``."""
        self._training_done = True
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not self.sync():
            if time.monotonic() + delay > deadline or self.lease.lost is not None:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return True
