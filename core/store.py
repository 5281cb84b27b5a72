"""The Redis job store: dataset records, job records, loss streams, worker heartbeats.

Every multi-key change is a Lua script (``core.lua_scripts``); succeeded, failed and cancelled are
final, and the scripts that change a record return it with its ``revision`` counted, for the job's
``job.json`` (``core.run_files``). The keys and the indexes every listing pages through: docs/jobs.md.

The client decodes replies (``decode_responses``); redis-py's types cannot know it, so replies are cast
to the strings they are.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core.lease import Lease, Leases
from core.lua_scripts import register
from core.records import (
    FINISHED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    DatasetRecord,
    JobRecord,
    encode_fields,
    encode_value,
    now_iso,
)

T = TypeVar("T")
POOL_WAIT_SECONDS = 5.0  # how long a call waits for a free connection of a capped pool
WORKER_ENTRY_SECONDS = 3600.0  # a worker not heard of for this long is forgotten
# What a call to Redis raises while Redis is away or restarting: worth retrying later.
REDIS_ERRORS = (redis.RedisError, OSError)


class QueueFull(RuntimeError):
    """Too many jobs are waiting for a worker (``Settings.max_queued_jobs``)."""


def quick_retry(retry_class: type = Retry) -> Retry:
    """Two quick retries on a connection error: enough to get past a connection that Redis's
    restart closed, short enough that a request answers 503 at once while Redis is down
    (redis-py's default retries for many seconds). ``retry_class``: ``redis.asyncio.retry.Retry``
    for an asyncio client."""
    return retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2)


# The form of every id ``new_id`` makes. An id from a request is checked against it before it
# names a Redis key or a storage path: ``:`` would reach another key (a dataset's index of
# queued jobs), ``*`` and ``?`` are glob characters, ``..`` and ``/`` walk out of a folder.
ID_PATTERN = r"^[0-9a-f]{12}$"


def new_id() -> str:
    """A fresh opaque id for a job or a dataset (``ID_PATTERN``)."""
    return secrets.token_hex(6)


def is_id(value: str) -> bool:
    """Whether ``value`` has the form of the ids the service makes."""
    return re.fullmatch(ID_PATTERN, value) is not None


def epoch_stream_id(epoch: int) -> str:
    return f"{int(epoch)}-0"


@dataclass(frozen=True)
class ActiveJob:
    """What the reaper needs of a queued or running job whose lease nobody holds."""

    id: str
    status: str
    worker: str | None
    dispatch_id: str | None
    enqueued_at: float | None
    retry_at: float | None = None  # put back for its storage: not sent again before then


@dataclass(frozen=True)
class Crashes:
    """How the reaper counts runs that stopped without pausing their job."""

    retried: int  # the most that are retried; one more fails the job
    error: tuple[str, str]  # the failed job's error, before and after its crash count


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, and the cursor of the next one (None on the last page)."""

    items: list[T]
    next: str | None


# What ``make_cursor`` makes: the last member of a page (an id: letters and digits) and its score.
CURSOR_PATTERN = r"^[0-9A-Za-z]+\.[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?$"


def make_cursor(member: str, score: float) -> str:
    """An opaque cursor: the last member of a page and its score (a creation time, never negative)."""
    return f"{member}.{score!r}"


def parse_cursor(cursor: str) -> tuple[str, float]:
    """Raises ValueError for a cursor ``make_cursor`` did not make."""
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise ValueError(f"not a cursor of this listing: {cursor!r}")
    member, _, score = cursor.partition(".")
    return member, float(score)


def _record(reply: Sequence[str] | None) -> JobRecord | None:
    return JobRecord.from_flat(reply) if reply else None


def _fields_but_status(record: JobRecord) -> list[str]:
    """The record's hash as flat field/value pairs, its status left to the scripts (and the indexes)."""
    return [item for name, value in record.to_hash().items() if name != "status" for item in (name, value)]


class Store:
    """Typed access to the job store's Redis keys. Safe to share between threads (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, prefix: str = "ssd"):
        self.redis = client
        self.prefix = prefix
        self.leases = Leases(client, self.lease_key, self.job_key)
        self._scripts = {
            name: register(client, name)
            for name in (
                "create_job",
                "restore_job",
                "delete_dataset",
                "cancel",
                "start",
                "requeue",
                "finish",
                "fail_queued",
                "update_running",
                "sync_epochs",
                "update_job",
                "clear_dispatch",
                "delete_job",
                "unleased_jobs",
                "correct_job",
            )
        }

    @classmethod
    def from_url(cls, url: str, prefix: str = "ssd", max_connections: int | None = None, **client_args: Any) -> Store:
        """A store on ``url``. A dropped connection (Redis restarted) is retried on a new one, briefly.

        ``max_connections`` caps the connections this client opens: a caller past it waits up to
        ``POOL_WAIT_SECONDS`` for a free one, then gets a ConnectionError.
        """
        client_args.setdefault("socket_connect_timeout", 5)
        client_args.setdefault("socket_timeout", 30)
        client_args.setdefault("health_check_interval", 30)
        client_args.setdefault("retry", quick_retry())
        if max_connections is None:
            return cls(redis.Redis.from_url(url, decode_responses=True, **client_args), prefix)
        pool = redis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=max_connections, timeout=POOL_WAIT_SECONDS, **client_args
        )
        return cls(redis.Redis(connection_pool=pool), prefix)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[script](keys=keys, args=args)

    # --- keys -------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job_key(self, job_id: str) -> str:
        return self._key("job", job_id)

    def losses_key(self, job_id: str) -> str:
        return self._key("job", job_id, "losses")

    def lease_key(self, job_id: str) -> str:
        return self._key("job", job_id, "lease")

    def _status_key(self, status: str, dataset_id: str | None = None) -> str:
        return self._key("dataset", dataset_id, "status", status) if dataset_id else self._key("status", status)

    def _jobs_key(self, dataset_id: str | None = None) -> str:
        return self._key("dataset", dataset_id, "jobs") if dataset_id else self._key("jobs")

    # --- datasets ---------------------------------------------------------------------------

    def put_dataset(self, record: DatasetRecord, created: float | None = None) -> None:
        """Store a dataset's record, listed by ``created`` (unix seconds; default now)."""
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("dataset", record.id), record.model_dump_json())
            pipe.zadd(self._key("datasets"), {record.id: created if created is not None else time.time()})
            pipe.execute()

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        value = self.redis.get(self._key("dataset", dataset_id))
        return DatasetRecord.model_validate_json(value) if value is not None else None

    def missing_datasets(self, dataset_ids: list[str]) -> list[str]:
        """The ids among ``dataset_ids`` that have no record."""
        return self._missing(dataset_ids, lambda dataset_id: self._key("dataset", dataset_id))

    def list_datasets(self, limit: int = 100, cursor: str | None = None) -> Page[DatasetRecord]:
        """A page of dataset records, newest first, after ``cursor`` (a page's ``next``)."""
        ids, next_cursor = self._page(self._key("datasets"), limit, cursor)
        values = self.redis.mget([self._key("dataset", i) for i in ids]) if ids else []
        return Page([DatasetRecord.model_validate_json(v) for v in values if v is not None], next_cursor)

    def delete_dataset(self, dataset_id: str) -> tuple[str, str | None]:
        """Delete a dataset's record unless a queued or running job uses it.

        Returns:
            ``("deleted", None)``, ``("missing", None)`` or ``("busy", job_id)``.
        """
        keys = [self._key("dataset", dataset_id), self._key("datasets")]
        result = self._run("delete_dataset", keys, [dataset_id])
        return result[0], (result[1] if len(result) > 1 else None)

    # --- jobs -------------------------------------------------------------------------------

    def create_job(self, record: JobRecord, max_queued: int | None = None) -> JobRecord | None:
        """Store a new job record, atomically with a check that its dataset still exists.

        Returns:
            The stored record, or None (nothing stored) if the dataset is gone.

        Raises:
            QueueFull: ``max_queued`` jobs are queued already (nothing is stored).
        """
        keys = [self._key("dataset", record.dataset_id), self.job_key(record.id)]
        limit = max_queued if max_queued is not None else 2**62
        outcome = self._run("create_job", keys, [time.time(), limit, *_fields_but_status(record)])
        if outcome == -1:
            raise QueueFull(f"{max_queued} jobs are waiting for a worker already (the limit)")
        return None if outcome == 0 else _record(outcome)

    def restore_job(self, record: JobRecord, created: float, finished: float | None = None) -> bool:
        """Store a job record rebuilt from its run folder, unless the job has one. True if stored."""
        keys = [self.job_key(record.id), self._key("jobs", "succeeded")]
        succeeded = str(finished or created) if record.status == SUCCEEDED else ""
        args = [created, succeeded, record.status, *_fields_but_status(record)]
        return bool(self._run("restore_job", keys, args))

    def get_job(self, job_id: str) -> JobRecord | None:
        fields = cast(dict[str, str], self.redis.hgetall(self.job_key(job_id)))
        return JobRecord.from_hash(fields) if fields else None

    def get_jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.job_key(job_id))
            return [JobRecord.from_hash(fields) for fields in pipe.execute() if fields]

    def missing_jobs(self, job_ids: list[str]) -> list[str]:
        """The ids among ``job_ids`` that have no record."""
        return self._missing(job_ids, self.job_key)

    def _missing(self, ids: list[str], key_of: Callable[[str], str]) -> list[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for record_id in ids:
                pipe.exists(key_of(record_id))
            return [i for i, found in zip(ids, pipe.execute(), strict=True) if not found]

    def list_jobs(
        self, status: str | None = None, dataset_id: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Page[JobRecord]:
        """A page of job records, newest first, in ``status`` and of ``dataset_id`` if given, after
        ``cursor`` (a page's ``next``): read through an index, whatever the number of jobs."""
        key = self._status_key(status, dataset_id) if status else self._jobs_key(dataset_id)
        ids, next_cursor = self._page(key, limit, cursor)
        return Page(self.get_jobs(ids), next_cursor)

    def _page(self, key: str, limit: int, cursor: str | None) -> tuple[list[str], str | None]:
        """Up to ``limit`` members of the sorted set ``key``, highest score first, after the member the
        cursor names (or, if it is gone, after its score); the cursor of the next page, if any.

        Raises:
            ValueError: a cursor this listing did not make.
        """
        start = 0
        if cursor is not None:
            after, score = parse_cursor(cursor)
            with self.redis.pipeline() as pipe:  # one transaction: no insert shifts the rank in between
                pipe.zrevrank(key, after)
                pipe.zcount(key, f"({score!r}", "+inf")
                rank, newer = pipe.execute()
            start = rank + 1 if rank is not None else newer
        found = cast(list[tuple[str, float]], self.redis.zrevrange(key, start, start + limit, withscores=True))
        more = len(found) > limit
        found = found[:limit]
        return [member for member, _ in found], make_cursor(*found[-1]) if more else None

    def newest_succeeded_job(self) -> str | None:
        """The id of the job that succeeded last, or None if none has."""
        ids = cast(list[str], self.redis.zrevrange(self._key("jobs", "succeeded"), 0, 0))
        return ids[0] if ids else None

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status: the sizes of the status indexes, one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.zcard(self._status_key(status))
            return dict(zip(STATUSES, pipe.execute(), strict=True))

    def request_cancel(self, job_id: str) -> tuple[str, JobRecord] | None:
        """Cancel a job: a queued one is cancelled at once, a running one is asked to stop.

        Returns:
            The status the job had and its record now, or None if there is no such job.
        """
        reply = self._run("cancel", [self.job_key(job_id)], [encode_value("finished_at", now_iso())])
        return (reply[0], JobRecord.from_flat(reply[1:])) if reply else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "true"

    def start_job(self, lease: Lease, worker: str, **where: Any) -> tuple[str, JobRecord] | None:
        """Mark a queued job running under ``lease`` (which the caller holds), on ``worker`` and ``where``
        it runs (``host``, ``device``, ``gpu``).

        Returns:
            The status the job had (``unleased`` if the lease is gone) and its record now, or
            None if there is no such job. Only ``queued`` means the caller now runs it.
        """
        args = [lease.token, encode_value("started_at", now_iso()), *encode_fields({"worker": worker, **where})]
        reply = self._run("start", [self.job_key(lease.job_id), lease.key], args)
        return (reply[0], JobRecord.from_flat(reply[1:])) if reply else None

    def requeue_job(
        self,
        job_id: str,
        reason: str,
        lease: Lease | None = None,
        crashes: Crashes | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> JobRecord | None:
        """Put a running job back in the queue (``restarts`` + 1, ``restart_reason``), to resume later.

        With ``lease``, the caller's (released here, atomically); without, only if nobody holds
        the job's lease (its run is gone). With ``crashes``, the run stopped without pausing the
        job: the job's ``crashes`` count goes up, and past ``crashes.retried`` the job fails
        instead. A job whose cancel was asked meanwhile ends cancelled instead. ``fields`` are set
        on a job that goes back to the queue.

        Returns:
            The record after (queued, cancelled or failed), or None if nothing was done. The
            caller sends a queued job's task again.
        """
        keys = [self.job_key(job_id), self.lease_key(job_id)]
        crash = crashes or Crashes(2**62, ("", ""))
        args = [
            lease.token if lease else "",
            encode_value("restart_reason", reason),
            encode_value("enqueued_at", time.time()),
            encode_value("finished_at", now_iso()),
            "1" if crashes else "0",
            crash.retried,
            *crash.error,
            *encode_fields(fields or {}),
        ]
        return _record(self._run("requeue", keys, args))

    def finish_job(self, lease: Lease, status: str, **fields: Any) -> JobRecord | None:
        """Record the end (``succeeded``, ``failed`` or ``cancelled``) of the job the caller runs, with
        ``finished_at``; the caller's lease is released with the same write.

        Returns:
            The record after, or None (nothing written) if the job is not running under ``lease``.
        """
        if status not in FINISHED:
            raise ValueError(f"a finished job's status must be one of {FINISHED}, got {status!r}")
        keys = [self.job_key(lease.job_id), self._key("jobs", "succeeded"), lease.key]
        score = str(time.time()) if status == SUCCEEDED else ""
        flat = encode_fields({**fields, "finished_at": now_iso()})
        return _record(self._run("finish", keys, [lease.token, status, score, *flat]))

    def fail_queued_job(self, job_id: str, error: str) -> JobRecord | None:
        """Fail a job that is still queued (its task could not be sent). The record after, or None."""
        flat = encode_fields({"error": error, "finished_at": now_iso()})
        return _record(self._run("fail_queued", [self.job_key(job_id)], flat))

    def update_running(self, lease: Lease, **fields: Any) -> bool:
        """Set fields (progress) of the running job whose lease the caller holds. False if not written."""
        keys = [self.job_key(lease.job_id), lease.key]
        return bool(self._run("update_running", keys, [lease.token, *encode_fields(fields)]))

    def update_job(self, job_id: str, **fields: Any) -> bool:  # never a status: only scripts move a job
        """Set fields of an existing job, unchecked (never a stub record for a job Redis lost). False if none."""
        return bool(self._run("update_job", [self.job_key(job_id)], encode_fields(fields)))

    def delete_job(self, job: JobRecord) -> str:
        """Delete a job that has ended, with its losses and lease.

        Returns:
            ``deleted``, ``missing``, or the status of a job that has not ended (nothing deleted).
        """
        return self._run("delete_job", self._job_and_its_keys(job.id), [])

    def _job_and_its_keys(self, job_id: str) -> list[str]:
        """The keys a job's removal touches: its record, losses, lease and resend mark, and the index of
        succeeded jobs."""
        job_keys = [self.job_key(job_id), self.losses_key(job_id), self.lease_key(job_id)]
        return [*job_keys, self._key("job", job_id, "redispatch"), self._key("jobs", "succeeded")]

    # --- task messages on their way (see worker.reaper) ---------------------------------------

    def mark_dispatch(self, job_id: str, task_id: str) -> bool:
        """A task message ``task_id`` for the job is being sent (the newest one). False if no such job."""
        return self.update_job(job_id, dispatch_id=task_id)

    def clear_dispatch(self, job_id: str, task_id: str) -> bool:
        """The message ``task_id`` was taken by a worker (or could not be sent): none is on its way now,
        unless a newer one was sent meanwhile. True if it was the newest."""
        return bool(self._run("clear_dispatch", [self.job_key(job_id)], [task_id]))

    def claim_redispatch(self, job_id: str, ttl_seconds: float) -> bool:
        """True for the one caller (for ``ttl_seconds``) that may send the job's task again."""
        return self._set_if_absent(self._key("job", job_id, "redispatch"), ttl_seconds)

    def unleased_jobs(self) -> list[ActiveJob]:
        """The queued and running jobs whose lease nobody holds (one script call, however many run)."""
        keys = [self._status_key(status) for status in (QUEUED, RUNNING)]
        flat = self._run("unleased_jobs", keys, [self._key("job", "")])
        jobs = []
        for at in range(0, len(flat), 6):
            job_id, status, worker, dispatch_id, enqueued_at, retry_at = flat[at : at + 6]
            enqueued, retry = (json.loads(value) if value else None for value in (enqueued_at, retry_at))
            jobs.append(
                ActiveJob(job_id, status, json.loads(worker) if worker else None, dispatch_id or None, enqueued, retry)
            )
        return sorted(jobs, key=lambda job: job.id)

    def created(self, job_id: str) -> float | None:
        """When the job was created (unix seconds, from its index), or None if there is no such job."""
        return self.redis.zscore(self._jobs_key(), job_id)

    def active_jobs(self) -> list[tuple[str, float]]:
        """The queued and running jobs: each id with its creation time (unix seconds)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for status in (QUEUED, RUNNING):
                pipe.zrange(self._status_key(status), 0, -1, withscores=True)
            return [(job_id, created) for found in pipe.execute() for job_id, created in found]

    def correct_job(self, stale: JobRecord, saved: JobRecord | None, finished: float | None = None) -> bool:
        """Replace the record of a queued or running job that Redis kept stale (``stale``, as read) with
        ``saved``, or drop the job (``saved`` None: it was deleted), unless the record changed since.

        Returns:
            Whether it was corrected.
        """
        args = [encode_value("revision", stale.revision), "", ""]
        if saved is not None:
            args = [args[0], saved.status, str(finished) if finished is not None else "", *_fields_but_status(saved)]
        return bool(self._run("correct_job", self._job_and_its_keys(stale.id), args))

    def server_run_id(self) -> str:
        """Redis's run id: it changes when the server restarts."""
        return str(self.redis.info("server").get("run_id", ""))

    def server_started(self) -> float:
        """When the Redis server started (unix seconds, this machine's clock; a second early at most)."""
        return time.time() - float(self.redis.info("server").get("uptime_in_seconds", 0)) - 1

    def marker(self) -> str | None:
        """The store's marker (``set_marker``): gone after a FLUSHALL or on an empty new server."""
        return cast("str | None", self.redis.get(self._key("marker")))

    def set_marker(self, value: str) -> None:
        self.redis.set(self._key("marker"), value)

    def try_lock(self, name: str, ttl_seconds: float) -> bool:
        """A best-effort lock shared by all workers (it simply expires)."""
        return self._set_if_absent(self._key("lock", name), ttl_seconds)

    def _set_if_absent(self, key: str, ttl_seconds: float) -> bool:
        """SET NX with an expiry: True for the one caller that set it."""
        return bool(self.redis.set(key, "1", nx=True, px=max(1, int(ttl_seconds * 1000))))

    # --- loss streams -----------------------------------------------------------------------

    def sync_epochs(self, lease: Lease, history: Sequence[Mapping[str, Any]], **fields: Any) -> int | None:
        """Make the loss stream of the job the caller runs hold ``history`` (the run's epoch records,
        epochs 1 to n in order): the epochs it lacks are appended, and a stream with a hole is
        written again whole. Sets ``fields`` of the job with the same write.

        Returns:
            How many entries were written, or None if the job is not running under ``lease``.
        """
        epochs = [int(record["epoch"]) for record in history]
        if epochs != list(range(1, len(epochs) + 1)):
            raise ValueError(f"a run's history holds epochs 1 to n in order, got {epochs}")
        keys = [self.losses_key(lease.job_id), self.job_key(lease.job_id), lease.key]
        records = [json.dumps(dict(record)) for record in history]
        written = self._run("sync_epochs", keys, [lease.token, len(records), *records, *encode_fields(fields)])
        return None if written < 0 else written

    def append_epoch(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append an epoch's record to the job's loss stream unless that epoch (or a later one) is there
        (records rebuilt from a run folder: no run holds the job then).

        Returns:
            True if it was appended, False if it was already there.
        """
        try:
            self.redis.xadd(
                self.losses_key(job_id),
                {"epoch": str(int(record["epoch"])), "record": json.dumps(dict(record))},
                id=epoch_stream_id(record["epoch"]),
            )
        except redis.ResponseError as error:
            if "equal or smaller" in str(error):
                return False
            raise
        return True

    def losses(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's epoch records with epoch > ``after``, oldest first."""
        entries = cast(
            list[tuple[str, dict[str, str]]],
            self.redis.xrange(self.losses_key(job_id), min=epoch_stream_id(max(after, 0) + 1), max="+"),
        )
        return [json.loads(fields["record"]) for _, fields in entries]

    # --- workers ----------------------------------------------------------------------------

    def worker_heartbeat(self, name: str, device: str | None = None) -> None:
        """Say the worker ``name`` (training on ``device``: cpu or cuda) is alive, and forget the workers
        not heard of for ``WORKER_ENTRY_SECONDS``."""
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.zadd(self._key("workers"), {name: now})
            if device is not None:  # a key each, so a worker that died unannounced leaves nothing behind
                pipe.set(self._key("worker-device", name), device, ex=int(WORKER_ENTRY_SECONDS))
            pipe.zremrangebyscore(self._key("workers"), "-inf", now - WORKER_ENTRY_SECONDS)
            pipe.execute()

    def worker_gone(self, name: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(self._key("workers"), name)
            pipe.delete(self._key("worker-device", name))
            pipe.execute()

    def workers_seen(self, within_seconds: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is at most ``within_seconds`` old, newest first, with the device
        each trains on (None from a worker that did not say)."""
        now = time.time()
        seen = cast(
            list[tuple[str, float]],
            self.redis.zrevrangebyscore(self._key("workers"), "+inf", now - within_seconds, withscores=True),
        )
        devices = (
            cast(list[str | None], self.redis.mget([self._key("worker-device", name) for name, _ in seen]))
            if seen
            else []
        )
        return [
            {"name": name, "last_seen_seconds_ago": round(now - score, 1), "device": device}
            for (name, score), device in zip(seen, devices, strict=True)
        ]

    # --- an API detecting on the CPU cores it shares with a worker (core.cpu_threads) -----------

    def mark_api_detecting(self, ttl_ms: int) -> None:
        self.redis.set(self._key("api-detecting"), "1", px=ttl_ms)

    def api_detecting(self) -> bool:
        return bool(self.redis.exists(self._key("api-detecting")))

    def ping(self) -> bool:
        return bool(self.redis.ping())
