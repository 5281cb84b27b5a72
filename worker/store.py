"""The Redis job store: dataset records, job records, loss streams, job leases, worker heartbeats.

Keys (``p`` is ``Settings.key_prefix``):

- ``p:dataset:<id>`` (string, JSON record) and ``p:datasets`` (sorted set, by creation time);
  ``p:dataset:<id>:jobs`` (set): the jobs that trained on it, so a delete can refuse while
  one of them is queued or running.
- ``p:job:<id>`` (hash): the job record, one field per key, each value JSON-encoded, so the
  API and the worker update fields without read-modify-write races; ``p:jobs`` (sorted set,
  by creation time) and ``p:jobs:succeeded`` (sorted set, by finish time).
- ``p:job:<id>:losses`` (stream): one entry per finished epoch whose stream id is
  ``<epoch>-0``. Redis refuses an id not above the stream's last one, so an epoch is
  appended at most once and epochs stay in order, whoever writes and however often.
- ``p:job:<id>:lease`` (string, a worker's token, with expiry): whoever holds it trains the job.
- ``p:workers`` (sorted set): worker name -> last heartbeat (unix seconds).

Multi-key state changes that must not interleave with another client's (create a job while
its dataset is deleted, cancel while the worker starts) are Lua scripts: Redis runs each
atomically.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

_CREATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
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

# ARGV[1]: finished_at (JSON). Returns the status the job had (JSON), or false if there is no such job.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[1], 'cancel_requested', 'true')
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
end
return status
"""

# ARGV[1]: started_at (JSON), ARGV[2]: worker name (JSON). A queued job becomes running; a
# running one (a redelivered task whose previous runner's lease expired) is resumed and its
# restart counted. Returns the status the job had (JSON), or false if there is no such job.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1], 'worker', ARGV[2])
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'worker', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'restarts', 1)
end
return status
"""

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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


@dataclass(frozen=True)
class Lease:
    """A held job lease: renew it before ``ttl_ms`` passes or another worker may take the job."""

    key: str
    token: str
    ttl_ms: int


class Store:
    """Typed access to the job store's Redis keys. Safe to share between threads (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, prefix: str = "ssd"):
        self.redis = client
        self.prefix = prefix
        self._create_job = client.register_script(_CREATE_JOB)
        self._delete_dataset = client.register_script(_DELETE_DATASET)
        self._cancel = client.register_script(_CANCEL)
        self._start = client.register_script(_START)
        self._renew_lease = client.register_script(_RENEW_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ssd", **client_args: Any) -> Store:
        client_args.setdefault("socket_connect_timeout", 5)
        client_args.setdefault("health_check_interval", 30)
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

    def put_dataset(self, record: dict[str, Any]) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("dataset", record["id"]), json.dumps(record))
            pipe.zadd(self._key("datasets"), {record["id"]: time.time()})
            pipe.execute()

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        value = self.redis.get(self._key("dataset", dataset_id))
        return json.loads(value) if value is not None else None

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

    def create_job(self, record: dict[str, Any]) -> bool:
        """Store a new job record, atomically with a check that its dataset still exists.

        Returns:
            False (and stores nothing) if the dataset is gone.
        """
        job_id, dataset_id = record["id"], record["dataset_id"]
        keys = [
            self._key("dataset", dataset_id),
            self.job_key(job_id),
            self._key("jobs"),
            self._key("dataset", dataset_id, "jobs"),
        ]
        flat = [item for pair in _encode(record).items() for item in pair]
        return bool(self._create_job(keys=keys, args=[job_id, time.time(), *flat]))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(self.job_key(job_id))
        return decode_fields(fields) if fields else None

    def get_jobs(self, job_ids: Iterable[str]) -> list[dict[str, Any]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.job_key(job_id))
            return [decode_fields(fields) for fields in pipe.execute() if fields]

    def list_job_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        """Job ids, newest first."""
        return self.redis.zrevrange(self._key("jobs"), offset, offset + limit - 1)

    def count_jobs(self) -> int:
        return self.redis.zcard(self._key("jobs"))

    def job_status(self, job_id: str) -> str | None:
        value = self.redis.hget(self.job_key(job_id), "status")
        return json.loads(value) if value is not None else None

    def update_job(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(self.job_key(job_id), mapping=_encode(fields))

    def newest_succeeded_job(self) -> str | None:
        """The id of the job that succeeded last, or None if none has."""
        ids = self.redis.zrevrange(self._key("jobs", "succeeded"), 0, 0)
        return ids[0] if ids else None

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        counts = dict.fromkeys(STATUSES, 0)
        ids = self.redis.zrange(self._key("jobs"), 0, -1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.job_key(job_id), "status")
            for value in pipe.execute():
                if value is not None:
                    status = json.loads(value)
                    counts[status] = counts.get(status, 0) + 1
        return counts

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one is cancelled at once, a running one is asked to stop.

        Returns:
            The status the job had before, or None if there is no such job.
        """
        before = self._cancel(keys=[self.job_key(job_id)], args=[json.dumps(now_iso())])
        return json.loads(before) if before else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "true"

    def start_job(self, job_id: str, worker: str) -> str | None:
        """Mark a queued job running (or count a restart of a running one).

        Returns:
            The status the job had before: ``queued`` or ``running`` mean the caller now runs
            it; anything else (``cancelled``...) means it must not. None if there is no such job.
        """
        before = self._start(keys=[self.job_key(job_id)], args=[json.dumps(now_iso()), json.dumps(worker)])
        return json.loads(before) if before else None

    def finish_job(self, job_id: str, status: str, **fields: Any) -> None:
        """Record a job's end (``succeeded``, ``failed`` or ``cancelled``) with ``finished_at``."""
        if status not in FINISHED:
            raise ValueError(f"a finished job's status must be one of {FINISHED}, got {status!r}")
        with self.redis.pipeline() as pipe:
            pipe.hset(self.job_key(job_id), mapping=_encode({**fields, "status": status, "finished_at": now_iso()}))
            if status == SUCCEEDED:
                pipe.zadd(self._key("jobs", "succeeded"), {job_id: time.time()})
            pipe.execute()

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
        lease = Lease(self.lease_key(job_id), token, max(1, int(ttl_seconds * 1000)))
        return lease if self.redis.set(lease.key, token, nx=True, px=lease.ttl_ms) else None

    def renew_lease(self, lease: Lease) -> bool:
        """Push the lease's expiry out by its TTL; False if it expired or another runner took it."""
        return bool(self._renew_lease(keys=[lease.key], args=[lease.token, lease.ttl_ms]))

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
