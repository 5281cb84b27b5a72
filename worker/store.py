"""The Redis job store: dataset records, job records, loss streams, job leases, worker heartbeats.

Keys (``p`` is ``Settings.key_prefix``):

- ``p:dataset:<id>`` (string, JSON record) and ``p:datasets`` (sorted set, by creation time);
  ``p:dataset:<id>:jobs`` (set): the jobs that trained on it, so a delete can refuse while
  one of them is queued or running.
- ``p:job:<id>`` (hash): the job record, one field per key, each value JSON-encoded, so the
  API and the worker update fields without read-modify-write races; ``p:jobs`` (sorted set,
  by creation time), ``p:jobs:succeeded`` (sorted set, by finish time) and ``p:jobs:active``
  (set): the queued and running jobs, all that the reaper (``worker.reaper``) and the
  queue limit look at.
- ``p:job:<id>:losses`` (stream): one entry per finished epoch whose stream id is
  ``<epoch>-0``. Redis refuses an id not above the stream's last one, so an epoch is
  appended at most once and epochs stay in order, whoever writes and however often.
- ``p:job:<id>:lease`` (string, a runner's token, with expiry): whoever holds it trains the job.
- ``p:job:<id>:redispatch`` (string, with expiry): a reaper is sending the job's task again.
- ``p:workers`` (sorted set): worker name -> last heartbeat (unix seconds).

Job fields the API does not show: ``lease_token`` (the current runner's lease token, so it
can retake a lapsed lease nobody else took), ``dispatch_id`` (the task id of the newest
message sent for the job, cleared when a worker takes that message: while it is set, a
message is on its way) and ``enqueued_at`` (unix seconds of the last (re)queueing).

Multi-key state changes that must not interleave with another client's (create a job while
its dataset is deleted, cancel while the worker starts, requeue while a runner renews) are
Lua scripts: Redis runs each atomically.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

# KEYS: dataset, job, jobs, dataset's jobs, active jobs. ARGV[1]: job id, ARGV[2]: score,
# ARGV[3]: most queued jobs, ARGV[4]: job key prefix ("p:job:"), then field/value pairs.
# Returns 1 (created), 0 (no such dataset) or -1 (the queue is full).
_CREATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local queued = 0
for _, job in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('HGET', ARGV[4] .. job, 'status') == '"queued"' then queued = queued + 1 end
end
if queued >= tonumber(ARGV[3]) then return -1 end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
return 1
"""

# KEYS: job, jobs, active jobs, succeeded jobs, dataset's jobs. ARGV[1]: job id, ARGV[2]:
# creation score, ARGV[3]: "1" if active, ARGV[4]: finish score if succeeded else "", then
# field/value pairs. A record rebuilt from its run folder: stored only if there is none.
_RESTORE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[3], ARGV[1]) end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]) end
return 1
"""

# ARGV[1]: dataset id, ARGV[2]: job key prefix ("p:job:"). Returns {"missing"}, {"busy", job id} or {"deleted"}.
_DELETE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
for _, job in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local status = redis.call('HGET', ARGV[2] .. job, 'status')
  if status == '"queued"' or status == '"running"' then return {'busy', job} end
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'deleted'}
"""

# KEYS: job, active jobs. ARGV[1]: finished_at (JSON), ARGV[2]: job id.
# Returns the status the job had (JSON), or false if there is no such job.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[1], 'cancel_requested', 'true')
  redis.call('SREM', KEYS[2], ARGV[2])
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
end
return status
"""

# ARGV[1]: started_at, ARGV[2]: worker name, ARGV[3]: lease token, ARGV[4]: restart reason (all JSON).
# A queued job becomes running (started_at kept from an earlier run); a running one (a
# delivery that found the previous runner's lease expired) is resumed and its restart
# counted. Returns the status the job had (JSON), or false if there is no such job.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', ARGV[2], 'lease_token', ARGV[3])
  local started = redis.call('HGET', KEYS[1], 'started_at')
  if not started or started == 'null' then redis.call('HSET', KEYS[1], 'started_at', ARGV[1]) end
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'lease_token', ARGV[3], 'restart_reason', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'restarts', 1)
end
return status
"""

# KEYS: job, lease, active jobs. ARGV[1]: the runner's lease token, or "" for a job whose
# lease is gone; ARGV[2]: reason, ARGV[3]: enqueued_at (JSON); ARGV[4]: job id.
# A running job goes back to queued (restart counted, lease released) if the caller holds
# its lease, or if nobody does. Returns 1 if it was requeued, else 0.
_REQUEUE = """
local holder = redis.call('GET', KEYS[2])
if ARGV[1] == '' then
  if holder then return 0 end
elseif holder ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[1], 'status') ~= '"running"' then return 0 end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'worker', 'null', 'lease_token', 'null',
           'restart_reason', ARGV[2], 'enqueued_at', ARGV[3])
local done = redis.call('HGET', KEYS[1], 'epochs_completed')
if done then redis.call('HSET', KEYS[1], 'epoch', done) end
redis.call('HINCRBY', KEYS[1], 'restarts', 1)
redis.call('SADD', KEYS[3], ARGV[4])
if holder then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: job, active jobs, succeeded jobs, lease. ARGV[1]: the runner's lease token or "",
# ARGV[2]: job id, ARGV[3]: finish score if succeeded else "", then field/value pairs.
# Not written (0) if another runner holds the lease; the caller's lease is released.
_FINISH = """
local holder = redis.call('GET', KEYS[4])
if ARGV[1] ~= '' and holder and holder ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2]) end
if ARGV[1] ~= '' and holder == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS: lease, job. ARGV[1]: token, ARGV[2]: TTL in ms, ARGV[3]: token (JSON).
# 1: renewed; 2: it had lapsed, nobody else took it and the job is still this runner's
# (running, same token): retaken; 0: lost.
_RENEW_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder and redis.call('HGET', KEYS[2], 'status') == '"running"'
   and redis.call('HGET', KEYS[2], 'lease_token') == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_UPDATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# ARGV[1]: task id (JSON). The newest message sent for the job was taken (or never went out).
_CLEAR_DISPATCH = """
if redis.call('HGET', KEYS[1], 'dispatch_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'dispatch_id', 'null')
return 1
"""


class QueueFull(RuntimeError):
    """Too many jobs are waiting for a worker (``Settings.max_queued_jobs``)."""


def quick_retry(retry_class: type = Retry) -> Retry:
    """Two quick retries on a connection error: enough to get past a connection that Redis's
    restart closed, short enough that a request answers 503 at once while Redis is down
    (redis-py's default retries for many seconds). ``retry_class``: ``redis.asyncio.retry.Retry``
    for an asyncio client."""
    return retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2)


def new_id() -> str:
    """A fresh opaque id for a job or a dataset."""
    return secrets.token_hex(6)


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds precision, e.g. ``2026-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_stream_id(epoch: int) -> str:
    return f"{int(epoch)}-0"


def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in fields.items()}


def decode_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """A job hash as read from Redis (JSON-encoded values) as a plain record."""
    return {key: json.loads(value) for key, value in fields.items()}


def new_job(job_id: str, dataset: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A queued job's record: ``config`` is the ``TrainConfig`` as a dict, ``dataset`` its dataset's record."""
    return {
        "id": job_id,
        "status": QUEUED,
        "dataset_id": dataset["id"],
        "dataset_name": dataset.get("name"),
        "config": dict(config),
        "epoch": 0,
        "epochs": config["epochs"],
        "epochs_completed": 0,
        "progress": None,
        "created_at": now_iso(),
        "started_at": None,
        "finished_at": None,
        "error": None,
        "best_val_loss": None,
        "classes": list(dataset.get("classes", [])),
        "cancel_requested": False,
        "restarts": 0,
        "restart_reason": None,
        "worker": None,
        "checkpoint": None,
        "enqueued_at": time.time(),
        "dispatch_id": None,
    }


def has_model(job: Mapping[str, Any]) -> bool:
    """Whether a job's checkpoint can serve /detect: it succeeded, or was cancelled after an epoch."""
    return bool(job.get("checkpoint")) and job.get("status") in (SUCCEEDED, CANCELLED)


@dataclass(frozen=True)
class Lease:
    """A held job lease: renew it before ``ttl_ms`` passes or another worker may take the job."""

    job_id: str
    key: str
    token: str
    ttl_ms: int


class Store:
    """Typed access to the job store's Redis keys. Safe to share between threads (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, prefix: str = "ssd"):
        self.redis = client
        self.prefix = prefix
        self._create_job = client.register_script(_CREATE_JOB)
        self._restore_job = client.register_script(_RESTORE_JOB)
        self._delete_dataset = client.register_script(_DELETE_DATASET)
        self._cancel = client.register_script(_CANCEL)
        self._start = client.register_script(_START)
        self._requeue = client.register_script(_REQUEUE)
        self._finish = client.register_script(_FINISH)
        self._renew_lease = client.register_script(_RENEW_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)
        self._update_job = client.register_script(_UPDATE_JOB)
        self._clear_dispatch = client.register_script(_CLEAR_DISPATCH)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ssd", **client_args: Any) -> Store:
        """A store on ``url``. A dropped connection (Redis restarted) is retried on a new one, briefly."""
        client_args.setdefault("socket_connect_timeout", 5)
        client_args.setdefault("socket_timeout", 30)
        client_args.setdefault("health_check_interval", 30)
        client_args.setdefault("retry", quick_retry())
        return cls(redis.Redis.from_url(url, decode_responses=True, **client_args), prefix)

    # --- keys -------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job_key(self, job_id: str) -> str:
        return self._key("job", job_id)

    def losses_key(self, job_id: str) -> str:
        return self._key("job", job_id, "losses")

    def lease_key(self, job_id: str) -> str:
        return self._key("job", job_id, "lease")

    # --- datasets ---------------------------------------------------------------------------

    def put_dataset(self, record: dict[str, Any], created: float | None = None) -> None:
        """Store a dataset's record, listed by ``created`` (unix seconds; default now)."""
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("dataset", record["id"]), json.dumps(record))
            pipe.zadd(self._key("datasets"), {record["id"]: created if created is not None else time.time()})
            pipe.execute()

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        value = self.redis.get(self._key("dataset", dataset_id))
        return json.loads(value) if value is not None else None

    def missing_datasets(self, dataset_ids: list[str]) -> list[str]:
        """The ids among ``dataset_ids`` that have no record."""
        return self._missing(dataset_ids, lambda dataset_id: self._key("dataset", dataset_id))

    def list_datasets(self) -> list[dict[str, Any]]:
        """Every dataset record, newest first."""
        ids = self.redis.zrevrange(self._key("datasets"), 0, -1)
        if not ids:
            return []
        values = self.redis.mget([self._key("dataset", i) for i in ids])
        return [json.loads(v) for v in values if v is not None]

    def delete_dataset(self, dataset_id: str) -> tuple[str, str | None]:
        """Delete a dataset's record unless a queued or running job uses it.

        Returns:
            ``("deleted", None)``, ``("missing", None)`` or ``("busy", job_id)``.
        """
        keys = [self._key("dataset", dataset_id), self._key("datasets"), self._key("dataset", dataset_id, "jobs")]
        result = self._delete_dataset(keys=keys, args=[dataset_id, self._key("job", "")])
        return result[0], (result[1] if len(result) > 1 else None)

    # --- jobs -------------------------------------------------------------------------------

    def create_job(self, record: dict[str, Any], max_queued: int | None = None) -> bool:
        """Store a new job record, atomically with a check that its dataset still exists.

        Returns:
            False (and stores nothing) if the dataset is gone.

        Raises:
            QueueFull: ``max_queued`` jobs are queued already (nothing is stored).
        """
        job_id, dataset_id = record["id"], record["dataset_id"]
        keys = [
            self._key("dataset", dataset_id),
            self.job_key(job_id),
            self._key("jobs"),
            self._key("dataset", dataset_id, "jobs"),
            self._key("jobs", "active"),
        ]
        limit = max_queued if max_queued is not None else 2**62
        flat = [item for pair in _encode(record).items() for item in pair]
        outcome = self._create_job(keys=keys, args=[job_id, time.time(), limit, self._key("job", ""), *flat])
        if outcome == -1:
            raise QueueFull(f"{max_queued} jobs are waiting for a worker already (the limit)")
        return bool(outcome)

    def restore_job(self, record: dict[str, Any], created: float, finished: float | None = None) -> bool:
        """Store a job record rebuilt from its run folder, unless the job has one. True if stored."""
        job_id = record["id"]
        keys = [
            self.job_key(job_id),
            self._key("jobs"),
            self._key("jobs", "active"),
            self._key("jobs", "succeeded"),
            self._key("dataset", record["dataset_id"], "jobs"),
        ]
        active = "1" if record["status"] in ACTIVE else "0"
        succeeded = str(finished or created) if record["status"] == SUCCEEDED else ""
        flat = [item for pair in _encode(record).items() for item in pair]
        return bool(self._restore_job(keys=keys, args=[job_id, created, active, succeeded, *flat]))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(self.job_key(job_id))
        return decode_fields(fields) if fields else None

    def get_jobs(self, job_ids: Iterable[str]) -> list[dict[str, Any]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.job_key(job_id))
            return [decode_fields(fields) for fields in pipe.execute() if fields]

    def missing_jobs(self, job_ids: list[str]) -> list[str]:
        """The ids among ``job_ids`` that have no record."""
        return self._missing(job_ids, self.job_key)

    def _missing(self, ids: list[str], key_of: Callable[[str], str]) -> list[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for record_id in ids:
                pipe.exists(key_of(record_id))
            return [i for i, found in zip(ids, pipe.execute(), strict=True) if not found]

    def _statuses(self, job_ids: list[str]) -> list[str | None]:
        """Each job's status, None where its record is gone (one pipelined round trip)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.job_key(job_id), "status")
            return [json.loads(value) if value is not None else None for value in pipe.execute()]

    def list_job_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        """Job ids, newest first."""
        return self.redis.zrevrange(self._key("jobs"), offset, offset + limit - 1)

    def list_job_ids_with_status(self, status: str, offset: int = 0, limit: int = 100) -> list[str]:
        """Ids of the jobs in ``status``, newest first: two round trips, however many jobs there are."""
        ids = self.redis.zrevrange(self._key("jobs"), 0, -1)
        matching = [job_id for job_id, found in zip(ids, self._statuses(ids), strict=True) if found == status]
        return matching[offset : offset + limit]

    def update_job(self, job_id: str, **fields: Any) -> bool:
        """Set fields of an existing job (never a stub record for a job Redis lost). False if none."""
        flat = [item for pair in _encode(fields).items() for item in pair]
        return bool(self._update_job(keys=[self.job_key(job_id)], args=flat))

    def newest_succeeded_job(self) -> str | None:
        """The id of the job that succeeded last, or None if none has."""
        ids = self.redis.zrevrange(self._key("jobs", "succeeded"), 0, 0)
        return ids[0] if ids else None

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status (one pipelined round trip for the statuses)."""
        counts = dict.fromkeys(STATUSES, 0)
        for status in self._statuses(self.redis.zrange(self._key("jobs"), 0, -1)):
            if status is not None:
                counts[status] = counts.get(status, 0) + 1
        return counts

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one is cancelled at once, a running one is asked to stop.

        Returns:
            The status the job had before, or None if there is no such job.
        """
        keys = [self.job_key(job_id), self._key("jobs", "active")]
        before = self._cancel(keys=keys, args=[json.dumps(now_iso()), job_id])
        return json.loads(before) if before else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "true"

    def start_job(self, job_id: str, worker: str, token: str = "") -> str | None:
        """Mark a queued job running (or count a restart of a running one whose runner's lease expired).

        Returns:
            The status the job had before: ``queued`` or ``running`` mean the caller now runs
            it; anything else (``cancelled``...) means it must not. None if there is no such job.
        """
        reason = f"{worker} took the job over: the lease of the worker running it had expired"
        args = [json.dumps(now_iso()), json.dumps(worker), json.dumps(token), json.dumps(reason)]
        before = self._start(keys=[self.job_key(job_id)], args=args)
        return json.loads(before) if before else None

    def requeue_job(self, job_id: str, reason: str, lease: Lease | None = None) -> bool:
        """Put a running job back in the queue (``restarts`` + 1, ``restart_reason``), to resume later.

        With ``lease``, the caller's (released here, atomically); without, only if nobody holds
        the job's lease (its runner is gone). The caller then sends the job's task again.

        Returns:
            Whether it was requeued.
        """
        keys = [self.job_key(job_id), self.lease_key(job_id), self._key("jobs", "active")]
        args = [lease.token if lease else "", json.dumps(reason), json.dumps(time.time()), job_id]
        return bool(self._requeue(keys=keys, args=args))

    def finish_job(self, job_id: str, status: str, lease: Lease | None = None, **fields: Any) -> bool:
        """Record a job's end (``succeeded``, ``failed`` or ``cancelled``) with ``finished_at``.

        With ``lease``, nothing is written if another runner holds the job's lease now; the
        caller's lease is released with the same write.

        Returns:
            Whether it was written.
        """
        if status not in FINISHED:
            raise ValueError(f"a finished job's status must be one of {FINISHED}, got {status!r}")
        record = _encode({**fields, "status": status, "finished_at": now_iso()})
        keys = [
            self.job_key(job_id),
            self._key("jobs", "active"),
            self._key("jobs", "succeeded"),
            self.lease_key(job_id),
        ]
        score = str(time.time()) if status == SUCCEEDED else ""
        flat = [item for pair in record.items() for item in pair]
        return bool(self._finish(keys=keys, args=[lease.token if lease else "", job_id, score, *flat]))

    # --- task messages on their way (see worker.reaper) ---------------------------------------

    def mark_dispatch(self, job_id: str, task_id: str) -> bool:
        """A task message ``task_id`` for the job is being sent (the newest one). False if no such job."""
        return self.update_job(job_id, dispatch_id=task_id)

    def clear_dispatch(self, job_id: str, task_id: str) -> bool:
        """The message ``task_id`` was taken by a worker (or could not be sent): none is on its way now,
        unless a newer one was sent meanwhile. True if it was the newest."""
        return bool(self._clear_dispatch(keys=[self.job_key(job_id)], args=[json.dumps(task_id)]))

    def claim_redispatch(self, job_id: str, ttl_seconds: float) -> bool:
        """True for the one caller (for ``ttl_seconds``) that may send the job's task again."""
        return self._set_if_absent(self._key("job", job_id, "redispatch"), ttl_seconds)

    def active_jobs(self) -> list[dict[str, Any]]:
        """The queued and running jobs: id, status, worker, dispatch_id, enqueued_at, leased."""
        ids = sorted(self.redis.smembers(self._key("jobs", "active")))
        fields = ("status", "worker", "dispatch_id", "enqueued_at")
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.job_key(job_id), fields)
                pipe.exists(self.lease_key(job_id))
            replies = pipe.execute()
        jobs = []
        for job_id, values, leased in zip(ids, replies[::2], replies[1::2], strict=True):
            record = {name: json.loads(v) if v is not None else None for name, v in zip(fields, values, strict=True)}
            if record["status"] is None:  # a stale entry: the record is gone
                continue
            jobs.append({"id": job_id, **record, "leased": bool(leased)})
        return jobs

    def index_active_jobs(self) -> int:
        """Add every queued or running job to the active set (records written before it existed)."""
        ids = self.redis.zrange(self._key("jobs"), 0, -1)
        active = [i for i, status in zip(ids, self._statuses(ids), strict=True) if status in ACTIVE]
        if active:
            self.redis.sadd(self._key("jobs", "active"), *active)
        return len(active)

    def server_run_id(self) -> str:
        """Redis's run id: it changes when the server restarts."""
        return str(self.redis.info("server").get("run_id", ""))

    def try_lock(self, name: str, ttl_seconds: float) -> bool:
        """A best-effort lock shared by all workers (it simply expires)."""
        return self._set_if_absent(self._key("lock", name), ttl_seconds)

    def _set_if_absent(self, key: str, ttl_seconds: float) -> bool:
        """SET NX with an expiry: True for the one caller that set it."""
        return bool(self.redis.set(key, "1", nx=True, px=max(1, int(ttl_seconds * 1000))))

    # --- loss streams -----------------------------------------------------------------------

    def append_epoch(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append an epoch's record to the job's loss stream unless that epoch (or a later one) is there.

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
        entries = self.redis.xrange(self.losses_key(job_id), min=epoch_stream_id(max(after, 0) + 1), max="+")
        return [json.loads(fields["record"]) for _, fields in entries]

    def last_epoch(self, job_id: str) -> int:
        """The newest epoch in the job's loss stream, 0 if none."""
        entries = self.redis.xrevrange(self.losses_key(job_id), count=1)
        return int(entries[0][0].split("-")[0]) if entries else 0

    # --- leases -----------------------------------------------------------------------------

    def acquire_lease(self, job_id: str, token: str, ttl_seconds: float) -> Lease | None:
        """Take the job's lease (SET NX PX), or None if another runner holds it."""
        lease = Lease(job_id, self.lease_key(job_id), token, max(1, int(ttl_seconds * 1000)))
        return lease if self.redis.set(lease.key, token, nx=True, px=lease.ttl_ms) else None

    def renew_lease(self, lease: Lease) -> bool:
        """Push the lease's expiry out by its TTL; False if another runner took the job.

        A lease that lapsed (Redis was away longer than its TTL) is taken again when nobody
        else holds it and the job is still running under this lease's token.
        """
        keys = [lease.key, self.job_key(lease.job_id)]
        return bool(self._renew_lease(keys=keys, args=[lease.token, lease.ttl_ms, json.dumps(lease.token)]))

    def release_lease(self, lease: Lease) -> bool:
        return bool(self._release_lease(keys=[lease.key], args=[lease.token]))

    def lease_holder(self, job_id: str) -> str | None:
        return self.redis.get(self.lease_key(job_id))

    # --- workers ----------------------------------------------------------------------------

    def worker_heartbeat(self, name: str) -> None:
        self.redis.zadd(self._key("workers"), {name: time.time()})

    def worker_gone(self, name: str) -> None:
        self.redis.zrem(self._key("workers"), name)

    def workers_seen(self, within_seconds: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is at most ``within_seconds`` old, newest first."""
        now = time.time()
        seen = self.redis.zrevrangebyscore(self._key("workers"), "+inf", now - within_seconds, withscores=True)
        return [{"name": name, "last_seen_seconds_ago": round(now - score, 1)} for name, score in seen]

    def ping(self) -> bool:
        return bool(self.redis.ping())
