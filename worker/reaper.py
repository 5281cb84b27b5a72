"""The reaper: puts back the jobs that nobody runs and that no task message will reach.

Every worker runs it from its heartbeat thread (at start, then every heartbeat). It looks
only at the active set (queued and running jobs) and acts where the lease says nobody
trains the job; the lease (SET NX) is what makes acting safe even when several reapers act
at once or a message turns up late: a second runner cannot take a held lease.

- **Running, no lease** (its worker was SIGKILLed, crashed, lost its machine, or could not
  record the job's end): once this reaper has seen the lease missing for half a lease TTL
  (time for a live runner to take back a lease that lapsed while Redis was away), the job
  goes back to queued with ``restarts`` + 1 and a ``restart_reason``, and its task is sent
  again; the next free worker resumes it from its last checkpoint.
- **Queued, no lease, no task message on its way** (no ``dispatch_id``: the newest message
  was taken by a worker that found the job leased and acked it, a requeue's send failed, a
  worker died between taking the message and starting): its task is sent again, by one
  reaper. The same when the ``dispatch_id``'s message is not in the queue on two passes half
  a lease TTL apart while the job stays queued and unleased: its sender died between
  recording the id and sending, or the worker that took it died before starting the job (a
  live one leases the job within moments; the second look lets it).
- **Redis lost records** (it restarted without them, seen as a new server run id, and at
  worker start): datasets come back from ``datasets/<id>/dataset.json`` and jobs from
  ``runs/<id>/job.json`` with their losses from ``metrics.jsonl``; an unfinished job is
  queued again and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.settings import Settings
from worker.store import ACTIVE, QUEUED, RUNNING, SUCCEEDED, Store

log = logging.getLogger(__name__)

JOB_FILE = "job.json"  # a job's record in its run folder (written by the worker that runs it)
DATASET_FILE = "dataset.json"  # a dataset's record in its folder (written by the API's import)


def send_quietly(dispatch: Callable[[str], None], job_id: str) -> None:
    """Send the job's task; a failure is only logged, since a reaper's next pass finds the queued
    job with no message on its way and sends it then."""
    try:
        dispatch(job_id)
    except Exception as error:
        log.error("could not send the task of job %s (%s); a reaper sends it on a later pass", job_id, error)


class _EveryId(frozenset):
    """The queue's task ids when they could not be read: every message counts as there."""

    def __contains__(self, task_id: object) -> bool:
        return True


class Reaper:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        dispatch: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        broker_task_ids: Callable[[], set[str]] | None = None,
    ):
        """
        Args:
            dispatch: sends a job's task (``worker.queue.dispatch``).
            clock: monotonic seconds (tests move it by hand).
            broker_task_ids: the ids of the task messages waiting in the queue
                (``worker.queue.task_ids_in_broker``); None trusts every ``dispatch_id`` to be
                on its way.
        """
        self.store = store
        self.settings = settings
        self.dispatch = dispatch
        self.clock = clock
        self.broker_task_ids = broker_task_ids
        self._in_broker: set[str] | None = None  # read at most once a pass, when needed
        self.grace = settings.lease_seconds / 2
        # What this pass found wrong -> since when it has been found on every pass: ("lease",
        # job id) for a running job with no lease, ("message", job id, dispatch id) for a
        # queued job's message missing from the queue.
        self._seen: dict[tuple[str, ...], float] = {}
        self._seen_before: dict[tuple[str, ...], float] = {}
        self._server: str | None = None

    def run_once(self) -> list[str]:
        """One pass; what it did, e.g. ``["requeued 1a2b3c", "dispatched 4d5e6f"]``."""
        actions: list[str] = []
        server = self.store.server_run_id()
        if server != self._server:
            self.store.index_active_jobs()
            if self.store.try_lock("rebuild", 60):
                actions += rebuild_from_disk(self.store, self.settings, self.dispatch)
            self._server = server
        now = self.clock()
        self._seen_before, self._seen, self._in_broker = self._seen, {}, None
        for job in self.store.active_jobs():
            if job["leased"]:
                continue
            if job["status"] == RUNNING:
                lease_gone = ("lease", job["id"])
                if self._seen_for(lease_gone, now) >= self.grace and self._requeue(job):
                    actions.append(f"requeued {job['id']}")
                    self._seen.pop(lease_gone)
            elif job["status"] == QUEUED and self._redispatch(job, now):
                actions.append(f"dispatched {job['id']}")
        return actions

    def _seen_for(self, problem: tuple[str, ...], now: float) -> float:
        """Record ``problem`` as found in this pass; seconds it has been found on every pass since."""
        since = self._seen[problem] = self._seen_before.get(problem, now)
        return now - since

    def _requeue(self, job: dict[str, Any]) -> bool:
        reason = (
            f"the lease of {job['worker'] or 'its worker'} expired: that worker stopped (killed, crashed or "
            "lost its machine); the job resumes from its last checkpoint"
        )
        if not self.store.requeue_job(job["id"], reason):
            return False
        log.warning("job %s: %s", job["id"], reason)
        send_quietly(self.dispatch, job["id"])
        return True

    def _redispatch(self, job: dict[str, Any], now: float) -> bool:
        age = time.time() - (job["enqueued_at"] or 0)
        if age < self.grace or (job["dispatch_id"] and not self._message_lost(job, now)):
            return False
        if not self.store.claim_redispatch(job["id"], 2 * self.grace):
            return False
        log.warning("job %s is queued with no task message on its way; sending one", job["id"])
        send_quietly(self.dispatch, job["id"])
        return True

    def _message_lost(self, job: dict[str, Any], now: float) -> bool:
        """The job's newest message is not waiting in the queue, and was not half a lease TTL ago
        either; its ``dispatch_id`` is then cleared (unless a newer message went out meanwhile)."""
        if self.broker_task_ids is None:
            return False
        if self._in_broker is None:
            try:
                self._in_broker = self.broker_task_ids()
            except Exception as error:  # nothing is sent again on a guess
                log.warning("cannot read the task messages in the broker: %s", error)
                self._in_broker = _EveryId()
        if job["dispatch_id"] in self._in_broker:
            return False
        missing = ("message", job["id"], job["dispatch_id"])
        if self._seen_for(missing, now) < self.grace or not self.store.clear_dispatch(job["id"], job["dispatch_id"]):
            return False
        log.warning(
            "job %s: its task message %s is not in the queue and no worker started the job",
            job["id"],
            job["dispatch_id"],
        )
        return True


def _created(record: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(record["created_at"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return time.time()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("cannot read %s: %s", path, error)
        return None


def _read_losses(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a torn last line
            break
    return records


def _folders_with(root: Path, name: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.iterdir() if not p.name.startswith(".") and (p / name).is_file()}


def rebuild_from_disk(store: Store, settings: Settings, dispatch: Callable[[str], None]) -> list[str]:
    """Records Redis lacks, rebuilt from the data folder: datasets, then jobs with their losses."""
    actions = []
    datasets = _folders_with(settings.datasets_dir, DATASET_FILE)
    for dataset_id in store.missing_datasets(sorted(datasets)):
        record = _read_json(datasets[dataset_id] / DATASET_FILE)
        if isinstance(record, dict) and record.get("id") == dataset_id:
            store.put_dataset(record, created=_created(record))
            actions.append(f"restored dataset {dataset_id}")
    runs = _folders_with(settings.runs_dir, JOB_FILE)
    for job_id in store.missing_jobs(sorted(runs)):
        record = _read_json(runs[job_id] / JOB_FILE)
        if not isinstance(record, dict) or record.get("id") != job_id or "dataset_id" not in record:
            continue
        losses = _read_losses(runs[job_id])
        active = record.get("status") in ACTIVE
        if active:
            done = losses[-1]["epoch"] if losses else 0
            record.update(
                status=QUEUED,
                worker=None,
                lease_token=None,
                restarts=int(record.get("restarts") or 0) + 1,
                restart_reason="Redis had lost its record: rebuilt from its run folder, resumes from its checkpoint",
                epoch=done,
                epochs_completed=done,
                enqueued_at=time.time(),
                dispatch_id=None,
            )
        finished = _created({"created_at": record.get("finished_at")}) if record.get("finished_at") else None
        if not store.restore_job(record, _created(record), finished if record["status"] == SUCCEEDED else None):
            continue
        for epoch_record in losses:
            store.append_epoch(job_id, epoch_record)
        actions.append(f"restored job {job_id}")
        log.warning("job %s was missing from Redis: rebuilt from %s", job_id, runs[job_id])
        if active:
            send_quietly(dispatch, job_id)
    return actions
