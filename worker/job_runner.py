"""Running one training job: from a job id in Redis to a ``fit`` call and back into Redis.

Nothing here knows about Celery: ``worker.tasks`` calls ``run_job`` with a ``dispatch``
function that sends the job's task again. The job's lease (``core.lease``) is the
single-runner guarantee: ``run_job`` trains only while it holds it, writes Redis only with
scripts that check it, and writes the run folder only through a ``FencedRunFolder``. A job
whose run vanished is put back by ``worker.reaper`` once the lease has expired. While the
job trains, its ``JobMonitor`` (``worker.lease_monitor``) renews the lease and carries the
run's progress into Redis, so the training thread never waits on Redis.

A worker told to shut down (SIGTERM: ``shutdown`` is set) pauses the job at the next batch:
``fit`` writes a mid-epoch checkpoint, the job goes back to the queue with its lease
released, and the next free worker carries on from that batch.

A storage that cannot be reached (a bucket restarting), when the run claims its files or
later, puts the job back too, to wait: the reaper sends it again after half a lease, twice as
long each time in a row (``storage_pauses``); past ``SSD_MAX_STORAGE_PAUSES`` in a row it fails,
naming the storage. A storage that refuses (credentials, no such bucket) fails the job at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import redis

from core.cpu_threads import CoreSharing, host_cores, use_threads, worker_threads_beside_api
from core.dispatch import send_quietly
from core.lease import Lease, LeasedRunFolder, LeaseLost
from core.records import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRecord
from core.run_files import RunFolderBusy
from core.s3 import BucketError, Conflict
from core.settings import Settings
from core.store import REDIS_ERRORS, Store
from core.weights import JobWeights, WeightsFolder
from model.config import TrainConfig
from model.data import read_dataset
from model.device import resolve_device
from model.run_folder import RunFolder
from model.training import Callbacks, FitResult, fit, training_precision
from worker.lease_monitor import JobMonitor
from worker.rebuild import correct_stale_job

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_STORAGE_RETRY_SECONDS = 600.0


def retry_redis(call: Callable[[], T], timeout: float, what: str) -> T:
    """``call()``, retried with backoff on Redis errors for up to ``timeout`` seconds (then its error)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return call()
        except REDIS_ERRORS as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, error)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def training_config(job: JobRecord, settings: Settings) -> TrainConfig:
    """The job's ``TrainConfig`` on this worker: a job that leaves the device to the service gets
    ``SSD_DEVICE``, and ``SSD_CPU_PRECISION=fp32`` turns mixed precision off for training on the CPU."""
    values = dict(job.config)
    if values.get("device", "auto") == "auto":
        values["device"] = settings.device
    config = TrainConfig.from_dict(values)
    if settings.cpu_precision == "fp32" and config.amp and device_type(config.device) == "cpu":
        config = dataclasses.replace(config, amp=False)
    return config


def where_it_runs(job: JobRecord, settings: Settings) -> dict[str, str | None]:
    """The host, device, precision and GPU (``SSD_WORKER_GPU``, from ``worker.pool``) a job is about to run on."""
    try:
        device, precision = training_precision(training_config(job, settings))
    except ValueError:  # cuda asked for where there is none: the run fails and says so
        device, precision = None, None
    return {
        "host": socket.gethostname(),
        "device": device.type if device is not None else None,
        "precision": precision,
        "gpu": os.environ.get("SSD_WORKER_GPU") or None,
    }


def device_type(device: str) -> str | None:
    """cpu or cuda for a device setting (a job's ``device``, ``SSD_DEVICE``); None where it cannot resolve."""
    try:
        return resolve_device(device).type
    except ValueError:  # cuda asked for where there is none
        return None


@contextmanager
def sharing_cores_with_the_api(
    config: TrainConfig, settings: Settings, store: Store, callbacks: Callbacks
) -> Iterator[Callbacks]:
    """``callbacks`` whose check before each batch also sets this worker's PyTorch threads: every core
    while the API is idle, the ones it does not keep while it detects (``core.cpu_threads``). Only for
    a run on the CPU, and only with ``SSD_API_CPU_CORES`` set (an API shares this host)."""
    if not settings.api_cpu_cores or device_type(config.device) != "cpu":
        yield callbacks
        return
    sharing = CoreSharing(store.api_detecting, alone=host_cores(), beside_api=worker_threads_beside_api(settings))
    should_stop = callbacks.should_stop

    def apply_then_check() -> bool:
        sharing.apply()
        return should_stop() if should_stop is not None else False

    sharing.start()
    try:
        yield dataclasses.replace(callbacks, should_stop=apply_then_check)
    finally:
        sharing.stop()
        use_threads(sharing.alone)


@dataclass
class _Outcome:
    status: str  # succeeded, failed, cancelled, or paused (requeued to carry on elsewhere)
    fields: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why a paused job was put back
    storage_away: str = ""  # paused because the storage could not be reached: what could not be done


def storage_retry_delay(pauses: int, lease_seconds: float) -> float:
    """How long a job put back for its storage ``pauses`` times in a row waits before it is sent again:
    half a lease, doubling each time, at most ``MAX_STORAGE_RETRY_SECONDS``."""
    return min(lease_seconds / 2 * 2 ** (pauses - 1), MAX_STORAGE_RETRY_SECONDS)


def run_job(
    job_id: str,
    store: Store,
    settings: Settings,
    worker_name: str,
    dispatch: Callable[[str], None] | None = None,
    shutdown: threading.Event | None = None,
    task_id: str | None = None,
) -> str:
    """Train job ``job_id`` if it is queued and its lease is free: to its end, or until paused.

    Args:
        dispatch: sends the job's task again (after a pause); None leaves that to the reaper.
        shutdown: set when the worker must stop: the job pauses at the next batch and is requeued.
        task_id: the id of the message being run, to tell the store it arrived.

    Returns:
        What happened, for the task's log line: the final status or why nothing was done.
    """
    shutdown = shutdown or threading.Event()

    def take() -> JobRecord | None:
        if task_id is not None:
            store.clear_dispatch(job_id, task_id)
        return store.get_job(job_id)

    job = retry_redis(take, settings.lease_seconds, f"reading job {job_id}")
    if job is not None and job.status == QUEUED:
        job = _checked_against_storage(job, store, settings)
    if job is None:
        log.warning("job %s does not exist; nothing to do", job_id)
        return "missing"
    if job.status != QUEUED:  # a running job is its run's, or (run gone) the reaper's to put back
        log.info("job %s is %s; not starting it", job_id, job.status)
        return f"skipped: {job.status}"
    lease = store.leases.acquire(job_id, f"{worker_name}/{secrets.token_hex(4)}", settings.lease_seconds)
    if lease is None:
        log.info("job %s is leased by %s; not running it twice", job_id, store.leases.holder(job_id))
        return "skipped: leased"
    started = store.start_job(lease, worker_name, retry_at=None, **where_it_runs(job, settings))
    if started is None or started[0] != QUEUED:
        store.leases.release(lease)
        return f"skipped: {started[0] if started else 'missing'}"
    folder = settings.storage.run_folder(job_id, lease)
    try:
        return _run(started[1], folder, store, settings, lease, worker_name, dispatch, shutdown)
    finally:
        settings.storage.end_run(folder)


def _checked_against_storage(job: JobRecord, store: Store, settings: Settings) -> JobRecord | None:
    """The job's record, corrected from its saved one if Redis restarted and no reaper has compared
    them yet (``worker.rebuild``): a cancel or a delete Redis lost must not let the job train."""
    try:
        if store.marker() == store.server_run_id():
            return job
        kept_over_restart = (store.created(job.id) or time.time()) < store.server_started()
        if correct_stale_job(store, settings.storage, job.id, kept_over_restart) is None:
            return job
        return store.get_job(job.id)
    except REDIS_ERRORS as error:  # a bucket away among them: the claim then puts the job back
        log.warning("job %s could not be compared with its saved record: %s", job.id, error)
        return job


def _run(
    job: JobRecord,
    folder: LeasedRunFolder,
    store: Store,
    settings: Settings,
    lease: Lease,
    worker_name: str,
    dispatch: Callable[[str], None] | None,
    shutdown: threading.Event,
) -> str:
    """Claim the run folder and train the job this run has just started (its lease held), and record
    how it ended. The monitor renews the lease from the start: a claim that copies a large
    checkpoint over a slow link may take longer than the lease itself."""
    monitor = JobMonitor(
        store, lease, settings.cancel_check_seconds, settings.progress_interval_seconds, job.best_val_loss
    )
    with monitor:
        outcome = _claim_and_train(job, store, settings, folder, monitor, shutdown, worker_name)
        if outcome is None or not lease.trusted():
            why = lease.lost.value if lease.lost else "another run has the job"
            log.error("job %s: %s; this run stops and writes nothing more", job.id, why)
            return f"lease lost: {why}"
        if not monitor.drain(settings.lease_seconds):
            log.error("job %s: epoch records could not be written; the reaper will resume the job", job.id)
            return "unrecorded"
    return _record(job, outcome, store, lease, settings, dispatch, progressed=monitor.new_epochs > 0)


def _claim_and_train(
    job: JobRecord,
    store: Store,
    settings: Settings,
    folder: LeasedRunFolder,
    monitor: JobMonitor,
    shutdown: threading.Event,
    worker_name: str,
) -> _Outcome | None:
    """Take the run folder over, then train; how the job ended, or None if the run lost it."""
    started = time.monotonic()
    try:
        _claim(folder, settings.lease_seconds / 2)
    except (LeaseLost, RunFolderBusy) as error:
        reason = f"{worker_name} could not take the run folder over ({error}); the job waits for another run"
        return _Outcome("paused", reason=reason)
    except BucketError as error:
        log.error("job %s: cannot read its run from %s: %s", job.id, settings.storage, error)
        if error.refused or isinstance(error, Conflict):  # the set-up is wrong: waiting cannot help
            return _Outcome(FAILED, {"error": f"the run's files cannot be read from {settings.storage}: {error}"})
        away = f"{worker_name} could not reach {settings.storage} to take the run over ({error})"
        return _Outcome("paused", reason=f"{away}; the job waits for it", storage_away=away)
    log.info("job %s: claimed its run files in %.1fs", job.id, time.monotonic() - started)
    settings.storage.keep_job(job)
    log.info("job %s: training on %s (restarts %s)", job.id, worker_name, job.restarts)
    return _train_and_judge(job, store, settings, folder, monitor, shutdown, worker_name)


def _claim(folder: LeasedRunFolder, patience: float) -> None:
    """``folder.claim()``, tried again for up to ``patience`` seconds while a bucket is away (not when
    it refuses): a short outage delays the job instead of failing it."""
    deadline = time.monotonic() + patience
    delay = 1.0
    while True:
        try:
            folder.claim()
            return
        except BucketError as error:
            if error.refused or isinstance(error, Conflict) or time.monotonic() + delay > deadline:
                raise
            log.warning("the bucket is away (%s); trying again in %.0fs", error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _train_and_judge(
    job: JobRecord,
    store: Store,
    settings: Settings,
    folder: LeasedRunFolder,
    monitor: JobMonitor,
    shutdown: threading.Event,
    worker_name: str,
) -> _Outcome | None:
    """Run ``fit`` and say how the job ended; None if the run lost the job (it writes nothing more)."""
    try:
        result = _train(job, store, settings, folder, monitor.callbacks(shutdown.is_set))
    except LeaseLost:
        return None
    except redis.RedisError:  # away for as long as the lease lasts: the job resumes once Redis is back
        log.exception("job %s: Redis stayed unreachable", job.id)
        return None
    except RunFolderBusy as error:
        return _Outcome("paused", reason=f"{worker_name} could not write the run folder ({error}); the job resumes")
    except BucketError as error:
        if error.refused:  # the set-up is wrong: resuming elsewhere would fail the same way
            return _Outcome(FAILED, {"error": f"{type(error).__name__}: {error}"})
        # Away for longer than the client's retries: the job resumes from its last committed checkpoint.
        away = f"{worker_name} could not reach {settings.storage} ({error})"
        return _Outcome("paused", reason=f"{away}; the job resumes once it can", storage_away=away)
    except Exception as error:  # a training error ends the job: retrying it would fail the same way
        log.exception("job %s failed", job.id)
        return _Outcome(FAILED, {"error": f"{type(error).__name__}: {error}"})
    checkpoint = result.best_checkpoint or result.last_checkpoint
    fields: dict[str, Any] = {
        **monitor.start_fields,
        "note": result.note,
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
        epoch, step = result.paused_at or (result.epochs_completed + 1, None)
        where = f"epoch {epoch}" if step is None else f"epoch {epoch} after step {step}"
        return _Outcome("paused", reason=f"{worker_name} was shut down in {where}; the job carries on from there")
    return None  # stopped for its lease


def _train(job: JobRecord, store: Store, settings: Settings, folder: RunFolder, callbacks: Callbacks) -> FitResult:
    # Retried like the run's other Redis calls: a moment without Redis must not fail the job.
    read = partial(store.get_dataset, job.dataset_id)
    dataset = retry_redis(read, settings.lease_seconds, f"reading the dataset of job {job.id}")
    if dataset is None:
        raise ValueError(f"dataset {job.dataset_id} was deleted")
    weights = JobWeights(WeightsFolder.from_settings(settings), store, settings.storage)
    with settings.storage.dataset_files(dataset) as root:  # copied from the bucket into the cache on first use
        config = training_config(job, settings)
        with sharing_cores_with_the_api(config, settings, store, callbacks) as callbacks:
            return fit(config, read_dataset(root), folder, callbacks, weights)


def _record(
    job: JobRecord,
    outcome: _Outcome,
    store: Store,
    lease: Lease,
    settings: Settings,
    dispatch: Callable[[str], None] | None,
    progressed: bool = False,
) -> str:
    """Write the outcome to Redis (retried within the lease's TTL), then to the run folder's job.json.

    ``progressed``: this run finished an epoch, which ends a series of storage pauses.
    """
    job_id = job.id
    pauses = (0 if progressed else job.storage_pauses) + bool(outcome.storage_away)
    if outcome.storage_away and pauses > settings.max_storage_pauses:
        error = (
            f"{outcome.storage_away}, {pauses} times in a row; "
            f"SSD_MAX_STORAGE_PAUSES is {settings.max_storage_pauses}, so it waits no longer"
        )
        outcome = _Outcome(FAILED, {"error": error, "storage_pauses": pauses})
    if outcome.status == "paused":
        requeued: dict[str, Any] = {"storage_pauses": pauses}
        if outcome.storage_away:  # the reaper sends it again once the wait is over
            requeued["retry_at"] = time.time() + storage_retry_delay(pauses, settings.lease_seconds)

        def write() -> JobRecord | None:
            return store.requeue_job(job_id, outcome.reason, lease, fields=requeued)

    else:

        def write() -> JobRecord | None:
            return store.finish_job(lease, outcome.status, **outcome.fields)

    try:
        record = retry_redis(write, settings.lease_seconds, f"recording the end of job {job_id}'s run")
    except REDIS_ERRORS as error:  # the lease expires; the reaper requeues the job and a resume records it
        log.error("job %s: its run ended (%s) but Redis could not record it: %s", job_id, outcome.status, error)
        return "unrecorded"
    if record is None:
        return "lease lost"
    settings.storage.keep_job(record)
    if outcome.status == "paused":
        if record.status == QUEUED and dispatch is not None and not outcome.storage_away:
            send_quietly(dispatch, job_id)
        log.info("job %s put back (%s): %s", job_id, record.status, outcome.reason)
        return "paused"
    return record.status
