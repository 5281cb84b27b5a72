"""Records Redis lost, rebuilt from the storage (the data folder or the bucket: ``core.storage``).

Every dataset keeps its record in ``datasets/<id>/dataset.json`` and every job in
``runs/<id>/job.json``, kept current at each change, with its epoch records in
``metrics.jsonl``. When Redis comes back without some of them (a disk lost, a
FLUSHALL, the last second of an ``everysec`` append-only file), the reaper calls
``rebuild_from_storage``, which puts back only what Redis lacks:

- a job that had ended stays as it ended;
- a queued job is queued again (its task message went with Redis) and trains once;
- a running job is queued again and resumes from its checkpoint, unless a cancel was asked
  for it: then it ends cancelled.

Redis may also come back with a record it kept but made stale: the last changes of a job it
still has (a cancel, a delete) were in the lost second. Redis is written before ``job.json``,
so a saved record ahead of Redis's (a later revision, or an end Redis does not show) means
Redis lost changes: ``correct_stale_jobs`` compares every queued and running job with its saved
record and keeps the saved one where it is ahead; a job whose files are gone was deleted, and
goes. A worker taking a job before that comparison was made compares that job itself
(``correct_stale_job``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from core.dispatch import send_quietly
from core.records import (
    ACTIVE,
    CANCELLED,
    FINISHED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    iso_to_unix,
    now_iso,
)
from core.settings import Settings
from core.storage import Storage
from core.store import Store

log = logging.getLogger(__name__)

LOST_REASON = "Redis had lost its record: rebuilt from its run folder"
STALE_REASON = "Redis had lost its last changes: corrected from its run folder"


def restored(record: JobRecord, epochs_done: int, reason: str = LOST_REASON) -> JobRecord:
    """What a job read back from its run folder becomes: an ended job stays as it is; a running one
    is queued again to resume (or ends cancelled if a cancel was asked); a queued one waits again."""
    if record.status not in ACTIVE:
        return record
    changes: dict = {"worker": None, "lease_token": None, "dispatch_id": None, "revision": record.revision + 1}
    if record.status == RUNNING and record.cancel_requested:
        changes.update(status=CANCELLED, finished_at=now_iso(), restart_reason=reason)
    elif record.status == RUNNING:
        changes.update(status=QUEUED, restarts=record.restarts + 1, restart_reason=f"{reason}; it resumes")
    else:
        changes.update(restart_reason=reason)
    changes.update(epoch=epochs_done, epochs_completed=epochs_done, enqueued_at=time.time())
    return record.model_copy(update=changes)


def rebuild_from_storage(store: Store, settings: Settings, dispatch: Callable[[str], None]) -> list[str]:
    """Records Redis lacks, rebuilt from the storage: datasets, then jobs with their losses; what it did."""
    storage = settings.storage
    actions = []
    datasets = {record.id: record for record in storage.saved_datasets()}
    for dataset_id in store.missing_datasets(sorted(datasets)):
        dataset = datasets[dataset_id]
        store.put_dataset(dataset, created=iso_to_unix(dataset.created_at, time.time()))
        actions.append(f"restored dataset {dataset_id}")
    for job_id in store.missing_jobs(storage.saved_job_ids()):
        saved = storage.read_job(job_id)
        if saved is None or saved.id != job_id:
            continue
        losses = storage.history(job_id)
        record = restored(saved, losses[-1]["epoch"] if losses else 0)
        finished = iso_to_unix(record.finished_at) if record.status == SUCCEEDED else None
        created = iso_to_unix(record.created_at)
        if not store.restore_job(record, created if created is not None else time.time(), finished):
            continue
        for epoch_record in losses:
            store.append_epoch(job_id, epoch_record)
        if record is not saved:
            storage.keep_job(record)
        actions.append(f"restored job {job_id} ({record.status})")
        log.warning("job %s was missing from Redis: rebuilt from %s as %s", job_id, storage, record.status)
        if record.status == QUEUED:
            send_quietly(dispatch, job_id)
    return actions


def correct_stale_jobs(store: Store, storage: Storage, dispatch: Callable[[str], None]) -> list[str]:
    """Every queued and running job compared with its saved record (see the module docstring); what it did."""
    started = store.server_started()
    actions = []
    for job_id, created in store.active_jobs():
        done = correct_stale_job(store, storage, job_id, kept_over_restart=created < started, dispatch=dispatch)
        if done is not None:
            actions.append(f"{done} {job_id}")
    return actions


def correct_stale_job(
    store: Store,
    storage: Storage,
    job_id: str,
    kept_over_restart: bool,
    dispatch: Callable[[str], None] | None = None,
) -> str | None:
    """Correct a queued or running job whose saved record is ahead of Redis's; what became of it, or None.

    ``kept_over_restart``: the job was created before Redis last started, so a job without saved
    record or files was deleted (one created since may not have its record saved yet). ``dispatch``
    sends the task of a job that goes back to the queue (None: the caller is about to run it).
    """
    current = store.get_job(job_id)
    if current is None or current.status not in ACTIVE:
        return None
    saved = storage.read_job(job_id)
    if saved is None:
        if not kept_over_restart or storage.has_run(job_id) or not store.correct_job(current, None):
            return None
        log.warning("job %s was deleted, but Redis lost that and showed it %s: removed again", job_id, current.status)
        return "removed deleted job"
    if saved.id != job_id or not (saved.status in FINISHED or saved.revision > current.revision):
        return None
    losses = storage.history(job_id)
    record = restored(saved, losses[-1]["epoch"] if losses else 0, STALE_REASON)
    record = record.model_copy(update={"revision": max(saved.revision, current.revision) + 1})
    finished = iso_to_unix(record.finished_at) if record.status == SUCCEEDED else None
    if not store.correct_job(current, record, finished):
        return None
    for epoch_record in losses:
        store.append_epoch(job_id, epoch_record)
    storage.keep_job(record)
    log.warning("job %s: Redis showed it %s, its saved record %s: corrected", job_id, current.status, saved.status)
    if record.status == QUEUED and dispatch is not None:
        send_quietly(dispatch, job_id)
    return f"corrected ({record.status})"
