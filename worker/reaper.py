"""The reaper: puts back the jobs that nobody runs and that no task message will reach.

Every worker runs it from its heartbeat thread; it acts only on queued and running jobs whose lease
nobody holds, so several reapers at once are safe. What it does in each case (a dead runner, a lost
message, a crash loop, a cancel asked meanwhile, records Redis lost): docs/jobs.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container

from core.dispatch import send_quietly
from core.records import QUEUED, RUNNING
from core.settings import Settings
from core.store import REDIS_ERRORS, ActiveJob, Crashes, Store
from worker.rebuild import correct_stale_jobs, rebuild_from_storage

log = logging.getLogger(__name__)


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
            dispatch: sends a job's task (``core.dispatch.dispatch``).
            clock: monotonic seconds (tests move it by hand).
            broker_task_ids: the ids of the task messages waiting in the queue
                (``core.dispatch.task_ids_in_broker``); None trusts every ``dispatch_id`` to be
                on its way.
        """
        self.store = store
        self.settings = settings
        self.dispatch = dispatch
        self.clock = clock
        self.broker_task_ids = broker_task_ids
        self._in_broker: Container[str] | None = None  # read at most once a pass, when needed
        self.grace = settings.lease_seconds / 2
        # What this pass found wrong -> since when it has been found on every pass: ("lease",
        # job id) for a running job with no lease, ("message", job id, dispatch id) for a
        # queued job's message missing from the queue.
        self._seen: dict[tuple[str, ...], float] = {}
        self._seen_before: dict[tuple[str, ...], float] = {}

    def run_once(self) -> list[str]:
        """One pass; what it did, e.g. ``["requeued 1a2b3c", "dispatched 4d5e6f"]``."""
        actions = self._rebuild_if_redis_lost()
        if actions is None:
            return []  # another reaper compares Redis with the storage: its records may be stale until then
        now = self.clock()
        self._seen_before, self._seen, self._in_broker = self._seen, {}, None
        for job in self.store.unleased_jobs():
            if job.status == RUNNING:
                lease_gone = ("lease", job.id)
                if self._seen_for(lease_gone, now) >= self.grace and (done := self._requeue(job)):
                    actions.append(f"{done} {job.id}")
                    self._seen.pop(lease_gone)
            elif job.status == QUEUED and self._redispatch(job, now):
                actions.append(f"dispatched {job.id}")
        return actions

    def _rebuild_if_redis_lost(self) -> list[str] | None:
        """Put back from the storage what Redis lacks, and correct what it kept stale (one reaper at a
        time), whenever Redis is not the server the last rebuild saw: a new or emptied one (the
        marker is gone), or one that restarted (it may have lost its last second). A worker
        starting against the same Redis reads nothing from the storage. None: another reaper is
        at it."""
        server = self.store.server_run_id()
        if self.store.marker() == server:
            return []
        if not self.store.try_lock("rebuild", 60):
            return None  # this one looks again at its next pass
        actions = rebuild_from_storage(self.store, self.settings, self.dispatch)
        actions += correct_stale_jobs(self.store, self.settings.storage, self.dispatch)
        self.store.set_marker(server)
        return actions

    def _seen_for(self, problem: tuple[str, ...], now: float) -> float:
        """Record ``problem`` as found in this pass; seconds it has been found on every pass since."""
        since = self._seen[problem] = self._seen_before.get(problem, now)
        return now - since

    def _requeue(self, job: ActiveJob) -> str | None:
        """Put back a running job whose run is gone; what became of it (requeued, cancelled, failed), or None."""
        who = job.worker or "its worker"
        reason = (
            f"the lease of {who} expired: that worker stopped (killed, crashed or lost its machine); "
            "the job resumes from its last checkpoint"
        )
        limit = self.settings.max_job_restarts
        error = (
            f"the job stopped its worker without a pause ({who} was the last: killed, out of memory or crashed) ",
            f" times; SSD_MAX_JOB_RESTARTS is {limit}, so it is not resumed again",
        )
        record = self.store.requeue_job(job.id, reason, crashes=Crashes(limit, error))
        if record is None:
            return None
        self.settings.storage.keep_job(record)
        if record.status != QUEUED:
            log.warning("job %s ended %s instead of going back to the queue: %s", job.id, record.status, record.error)
            return record.status
        log.warning("job %s: %s", job.id, reason)
        send_quietly(self.dispatch, job.id)
        return "requeued"

    def _redispatch(self, job: ActiveJob, now: float) -> bool:
        if time.time() < (job.retry_at or 0):  # put back for its storage: it waits before it is sent again
            return False
        age = time.time() - (job.enqueued_at or 0)
        if age < self.grace or (job.dispatch_id and not self._message_lost(job, now)):
            return False
        if not self.store.claim_redispatch(job.id, 2 * self.grace):
            return False
        log.warning("job %s is queued with no task message on its way; sending one", job.id)
        send_quietly(self.dispatch, job.id)
        return True

    def _message_lost(self, job: ActiveJob, now: float) -> bool:
        """The job's newest message is not waiting in the queue, and was not half a lease TTL ago
        either; its ``dispatch_id`` is then cleared (unless a newer message went out meanwhile)."""
        if self.broker_task_ids is None:
            return False
        if self._in_broker is None:
            try:
                self._in_broker = self.broker_task_ids()
            except REDIS_ERRORS as error:  # nothing is sent again on a guess
                log.warning("cannot read the task messages in the broker: %s", error)
                self._in_broker = _EveryId()
        if job.dispatch_id in self._in_broker:
            return False
        missing = ("message", job.id, job.dispatch_id or "")
        if self._seen_for(missing, now) < self.grace or not self.store.clear_dispatch(job.id, job.dispatch_id or ""):
            return False
        log.warning(
            "job %s: its task message %s is not in the queue and no worker started the job", job.id, job.dispatch_id
        )
        return True
