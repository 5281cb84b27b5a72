"""Records Redis lost, rebuilt from the storage (the data folder or the bucket: ``worker.storage``).

Every dataset keeps its record in ``datasets/<id>/dataset.json`` and every job in
``runs/<id>/job.json``, kept current at each change, with its epoch records in
``metrics.jsonl``. When Redis comes back without some of them (a disk lost, a
FLUSHALL, the last second of an ``everysec`` append-only file), the reaper calls
``rebuild_from_storage``, which puts back only what Redis lacks:

- a job that had ended stays as it ended;
- a queued job is queued again (its task message went with Redis) and trains once;
- a running job is queued again and resumes from its checkpoint, unless a cancel was asked
  for it: then it ends cancelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.queue import send_quietly
from worker.records import ACTIVE, CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobRecord, iso_to_unix, now_iso
from worker.settings import Settings
from worker.store import Store

log = logging.getLogger(__name__)

LOST_REASON = "Redis had lost its record: rebuilt from its run folder"


def restored(record: JobRecord, epochs_done: int) -> JobRecord:
    """What a job read back from its run folder becomes: an ended job stays as it is; a running one
    is queued again to resume (or ends cancelled if a cancel was asked); a queued one waits again."""
    if record.status not in ACTIVE:
        return record
    changes: dict = {"worker": None, "lease_token": None, "dispatch_id": None, "revision": record.revision + 1}
    if record.status == RUNNING and record.cancel_requested:
        changes.update(status=CANCELLED, finished_at=now_iso(), restart_reason=LOST_REASON)
    elif record.status == RUNNING:
        changes.update(status=QUEUED, restarts=record.restarts + 1, restart_reason=f"{LOST_REASON}; it resumes")
    else:
        changes.update(restart_reason=LOST_REASON)
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
        if not store.restore_job(record, iso_to_unix(record.created_at, time.time()), finished):
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
