"""The Redis job store against a real redis-server: exactly-once epochs, leases, atomic and final transitions."""

from __future__ import annotations

import time
import uuid

import pytest

from core.lease import Lease
from core.records import DatasetRecord, JobRecord
from core.store import Crashes, Store
from tests.support.service import DATASET

CRASHED = ("crashed its worker ", " times")


def _queue(store: Store, job_id: str, dataset: DatasetRecord = DATASET) -> JobRecord:
    job = store.create_job(JobRecord.new(job_id, dataset, {"epochs": 3}))
    assert job is not None and job.status == "queued"
    return job


def _run(store: Store, job_id: str, worker: str = "w", ttl: float = 10) -> Lease:
    """Queue a job and start it under a fresh lease; the lease."""
    if store.get_job(job_id) is None:
        _queue(store, job_id)
    lease = store.leases.acquire(job_id, f"{worker}/{uuid.uuid4().hex[:6]}", ttl)
    assert lease is not None
    before, job = store.start_job(lease, worker)
    assert before == "queued" and job.status == "running" and job.lease_token == lease.token
    return lease


def _epochs(store: Store, job_id: str) -> list[int]:
    return [r["epoch"] for r in store.losses(job_id)]


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 10.0 - e} for e in range(1, n + 1)]


def test_the_status_is_a_plain_string_and_the_record_round_trips(fresh):
    job = _queue(fresh, "j1")
    raw = fresh.redis.hgetall(fresh.job_key("j1"))
    assert raw["status"] == "queued" and "lease_token" not in raw  # None fields are absent
    assert fresh.get_job("j1") == job
    assert job.revision == 1 and job.public().has_model is False
    assert "lease_token" not in job.public().model_dump() and "revision" not in job.public().model_dump()


def test_an_epoch_is_appended_once_and_in_order(fresh):
    _queue(fresh, "j1")
    assert fresh.append_epoch("j1", {"epoch": 1, "train_loss": 3.0})
    assert not fresh.append_epoch("j1", {"epoch": 1, "train_loss": 99.0})  # a redelivered epoch
    assert fresh.append_epoch("j1", {"epoch": 2, "train_loss": 2.0})
    assert not fresh.append_epoch("j1", {"epoch": 1, "train_loss": 1.0})  # an older one, late
    assert _epochs(fresh, "j1") == [1, 2]
    assert fresh.losses("j1")[0]["train_loss"] == 3.0
    assert [r["epoch"] for r in fresh.losses("j1", after=1)] == [2]


def test_a_lease_has_one_holder_until_it_expires(fresh):
    leases = fresh.leases
    first = leases.acquire("j1", "worker-a", ttl_seconds=0.3)
    assert first is not None and first.trusted()
    assert leases.acquire("j1", "worker-b", ttl_seconds=5) is None
    assert leases.renew(first)
    time.sleep(0.45)
    assert not first.trusted()  # past three quarters of its TTL since the last renewal
    assert not leases.renew(first) and first.lost is not None  # expired; no job names it: gone
    second = leases.acquire("j1", "worker-b", ttl_seconds=5)
    assert second is not None and leases.holder("j1") == "worker-b"
    assert not leases.release(first)  # a stale holder cannot release someone else's lease
    assert leases.release(second) and leases.holder("j1") is None


def test_a_lapsed_lease_is_taken_back_only_while_the_job_still_names_it(fresh):
    lease = _run(fresh, "j1", ttl=0.3)
    fresh.redis.delete(lease.key)  # Redis lost the last renewal
    assert fresh.leases.renew(lease) and fresh.leases.holder("j1") == lease.token
    fresh.redis.delete(lease.key)
    assert fresh.requeue_job("j1", "its worker died")  # the reaper put it back meanwhile
    assert not fresh.leases.renew(lease) and lease.lost is not None


def test_cancel_and_start_are_atomic_transitions(fresh):
    _queue(fresh, "queued")
    before, job = fresh.request_cancel("queued")
    assert before == "queued" and job.status == "cancelled" and job.finished_at
    lease = fresh.leases.acquire("queued", "w/1", 10)
    assert fresh.start_job(lease, "w")[0] == "cancelled"  # the worker must not run it
    assert fresh.get_job("queued").started_at is None

    lease = _run(fresh, "running")
    before, job = fresh.request_cancel("running")
    assert before == "running" and job.cancel_requested and job.status == "running"
    assert fresh.cancel_requested("running")
    assert fresh.start_job(lease, "w2")[0] == "running"  # a running job is never taken over by a start
    assert fresh.get_job("running").restarts == 0
    assert fresh.request_cancel("missing") is None


def test_a_start_needs_the_lease_it_names(fresh):
    _queue(fresh, "j1")
    unleased = Lease("j1", fresh.lease_key("j1"), "nobody/1", 10_000, time.monotonic())
    assert fresh.start_job(unleased, "w")[0] == "unleased"
    assert fresh.get_job("j1").status == "queued"


def test_ended_jobs_are_final_whatever_a_stale_run_writes(fresh):
    # A stale run (its lease expired, the reaper requeued the job, another run finished it).
    stale = _run(fresh, "j1", "stale")
    fresh.redis.delete(stale.key)
    assert fresh.requeue_job("j1", "the stale worker stopped").status == "queued"
    heir = _run(fresh, "j1", "heir")
    assert fresh.finish_job(stale, "failed", error="late") is None  # another run holds the lease
    assert fresh.finish_job(heir, "succeeded", checkpoint="best.pt").status == "succeeded"
    assert fresh.leases.holder("j1") is None  # released with the finish
    for status in ("failed", "cancelled", "succeeded"):
        assert fresh.finish_job(stale, status) is None  # nobody holds the lease now: still refused
        assert fresh.finish_job(heir, status) is None  # not even the run that ended it
    assert fresh.fail_queued_job("j1", "could not queue") is None
    assert fresh.requeue_job("j1", "reaper") is None
    assert fresh.request_cancel("j1")[1].status == "succeeded"
    assert not fresh.update_running(stale, progress=None) and not fresh.update_running(heir, progress=None)
    assert fresh.sync_epochs(heir, _history(1)) is None
    job = fresh.get_job("j1")
    assert job.status == "succeeded" and job.error is None and job.checkpoint == "best.pt"

    # A cancelled job stays cancelled, even for the run whose token it still names.
    lease = _run(fresh, "j2")
    fresh.request_cancel("j2")
    assert fresh.finish_job(lease, "cancelled").status == "cancelled"
    assert fresh.finish_job(lease, "succeeded") is None and fresh.get_job("j2").status == "cancelled"


def test_a_run_whose_lease_lapsed_may_still_end_the_job_nobody_took(fresh):
    lease = _run(fresh, "j1")
    fresh.redis.delete(lease.key)  # lapsed while Redis was away; nobody took it
    assert fresh.finish_job(lease, "succeeded") is not None
    other = _run(fresh, "j2")
    fresh.redis.delete(other.key)
    impostor = Lease("j2", other.key, "someone/else", 10_000, time.monotonic())
    assert fresh.finish_job(impostor, "failed") is None  # the job names another token


def test_a_dispatch_failure_fails_only_a_job_still_queued(fresh):
    _queue(fresh, "j1")
    assert fresh.fail_queued_job("j1", "broker away").status == "failed"
    lease = _run(fresh, "j2")
    assert fresh.fail_queued_job("j2", "broker away") is None
    assert fresh.get_job("j2").status == "running" and fresh.leases.holder("j2") == lease.token


def test_crashed_runs_are_retried_up_to_the_limit_then_the_job_fails(fresh):
    crashes = Crashes(retried=2, error=CRASHED)
    for count in (1, 2):
        lease = _run(fresh, "j1")
        fresh.redis.delete(lease.key)  # the worker was killed
        job = fresh.requeue_job("j1", "lease expired", crashes=crashes)
        assert job.status == "queued" and job.crashes == count and job.restarts == count
    lease = _run(fresh, "j1")
    fresh.redis.delete(lease.key)
    job = fresh.requeue_job("j1", "lease expired", crashes=crashes)
    assert job.status == "failed" and job.crashes == 3 and job.error == "crashed its worker 3 times"
    assert job.finished_at and fresh.unleased_jobs() == []
    # A pause (no crash) is not counted.
    lease = _run(fresh, "j2")
    assert fresh.requeue_job("j2", "worker shut down", lease).crashes == 0


def test_a_cancel_asked_while_the_worker_was_dead_ends_the_job_cancelled(fresh):
    lease = _run(fresh, "j1")
    fresh.request_cancel("j1")
    fresh.redis.delete(lease.key)  # the worker died before it saw the cancel
    job = fresh.requeue_job("j1", "lease expired", crashes=Crashes(3, CRASHED))
    assert job.status == "cancelled" and job.finished_at and fresh.unleased_jobs() == []


def test_only_the_lease_holder_writes_a_running_jobs_progress_and_epochs(fresh):
    lease = _run(fresh, "j1")
    impostor = Lease("j1", lease.key, "someone/else", 10_000, time.monotonic())
    assert not fresh.update_running(impostor, epoch=2)
    assert fresh.sync_epochs(impostor, _history(2)) is None and _epochs(fresh, "j1") == []
    assert fresh.update_running(lease, epoch=2) and fresh.get_job("j1").epoch == 2
    assert fresh.sync_epochs(lease, _history(2), epochs_completed=2) == 2
    assert fresh.sync_epochs(lease, _history(3), epochs_completed=3) == 1  # only the new one
    assert _epochs(fresh, "j1") == [1, 2, 3] and fresh.get_job("j1").epochs_completed == 3


def test_an_epoch_redis_lost_is_written_again_before_the_next_one(fresh):
    lease = _run(fresh, "j1")
    assert fresh.sync_epochs(lease, _history(3)) == 3
    fresh.redis.xdel(fresh.losses_key("j1"), "2-0")  # lost with the last second of an everysec AOF
    assert _epochs(fresh, "j1") == [1, 3]
    assert fresh.sync_epochs(lease, _history(4)) == 4  # the hole makes it rewrite the stream whole
    assert _epochs(fresh, "j1") == [1, 2, 3, 4] and fresh.losses("j1")[1] == _history(4)[1]
    fresh.redis.xdel(fresh.losses_key("j1"), "4-0")  # the newest lost: the stream still refuses id 4-0
    assert fresh.sync_epochs(lease, _history(5)) == 5 and _epochs(fresh, "j1") == [1, 2, 3, 4, 5]
    fresh.redis.delete(fresh.losses_key("j1"))  # a new Redis, or a FLUSHALL
    assert fresh.sync_epochs(lease, _history(5)) == 5 and _epochs(fresh, "j1") == [1, 2, 3, 4, 5]


def test_datasets_cannot_vanish_under_active_jobs(fresh):
    assert fresh.create_job(JobRecord.new("j0", DATASET.model_copy(update={"id": "nope"}), {"epochs": 1})) is None
    assert fresh.get_job("j0") is None
    _queue(fresh, "j1")
    assert fresh.delete_dataset("d1") == ("busy", "j1")
    fresh.fail_queued_job("j1", "boom")
    assert fresh.delete_dataset("d1") == ("deleted", None)
    assert fresh.delete_dataset("d1") == ("missing", None)
    assert fresh.get_dataset("d1") is None


def test_only_an_ended_job_is_deleted_with_everything_it_had(fresh):
    lease = _run(fresh, "j1")
    fresh.sync_epochs(lease, _history(1))
    assert fresh.delete_job(fresh.get_job("j1")) == "running"
    job = fresh.finish_job(lease, "succeeded", checkpoint="best.pt")
    assert fresh.newest_succeeded_job() == "j1"
    assert fresh.delete_job(job) == "deleted"
    assert fresh.get_job("j1") is None and fresh.losses("j1") == [] and fresh.list_jobs().items == []
    assert fresh.newest_succeeded_job() is None and fresh.redis.smembers(fresh._key("dataset", "d1", "jobs")) == set()
    assert fresh.delete_job(job) == "missing"


def test_newest_succeeded_job_and_status_counts(fresh):
    for job_id in ("a", "b", "c"):
        _queue(fresh, job_id)
    fresh.finish_job(_run(fresh, "a"), "succeeded")
    fresh.fail_queued_job("b", "x")
    assert fresh.newest_succeeded_job() == "a"
    fresh.finish_job(_run(fresh, "c"), "succeeded")
    assert fresh.newest_succeeded_job() == "c"
    assert fresh.status_counts() == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert [job.id for job in fresh.list_jobs().items] == ["c", "b", "a"]
    with pytest.raises(ValueError):
        fresh.finish_job(_run(fresh, "d"), "running")


def test_workers_not_heard_of_for_an_hour_are_forgotten(fresh):
    workers = fresh._key("workers")
    fresh.redis.zadd(workers, {"gone@old": time.time() - 7200, "quiet@recent": time.time() - 600})
    fresh.worker_heartbeat("alive@now")
    assert set(fresh.redis.zrange(workers, 0, -1)) == {"quiet@recent", "alive@now"}
    assert [w["name"] for w in fresh.workers_seen(5)] == ["alive@now"]


def _indexed_statuses(store: Store, job_id: str, dataset_id: str = "d1") -> list[str]:
    """The status indexes (global and the dataset's) that list the job; each must say its status."""
    found = []
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        in_all = store.redis.zscore(store._key("status", status), job_id) is not None
        in_dataset = store.redis.zscore(store._key("dataset", dataset_id, "status", status), job_id) is not None
        assert in_all == in_dataset, (job_id, status)
        if in_all:
            found.append(status)
    return found


def test_every_transition_moves_the_job_between_its_status_indexes(fresh):
    _queue(fresh, "j1")
    assert _indexed_statuses(fresh, "j1") == ["queued"]
    lease = _run(fresh, "j1")
    assert _indexed_statuses(fresh, "j1") == ["running"]
    fresh.redis.delete(lease.key)
    fresh.requeue_job("j1", "its worker died", crashes=Crashes(0, CRASHED))  # past the limit: failed
    assert _indexed_statuses(fresh, "j1") == ["failed"]
    _queue(fresh, "j2")
    fresh.request_cancel("j2")
    assert _indexed_statuses(fresh, "j2") == ["cancelled"]
    fresh.finish_job(_run(fresh, "j3"), "succeeded")
    assert _indexed_statuses(fresh, "j3") == ["succeeded"]
    _queue(fresh, "j4")
    fresh.fail_queued_job("j4", "broker away")
    assert _indexed_statuses(fresh, "j4") == ["failed"]
    assert fresh.status_counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 2, "cancelled": 1}
    fresh.delete_job(fresh.get_job("j1"))
    assert _indexed_statuses(fresh, "j1") == [] and fresh.status_counts()["failed"] == 1
    restored = JobRecord.new("j5", DATASET, {"epochs": 1}).model_copy(update={"status": "running"})
    assert fresh.restore_job(restored, created=time.time())
    assert _indexed_statuses(fresh, "j5") == ["running"] and [j.id for j in fresh.unleased_jobs()] == ["j5"]
    with pytest.raises(ValueError):
        fresh.update_job("j5", status="succeeded")  # a status never moves without its indexes


def test_listings_page_newest_first_without_repeats_while_jobs_are_added(fresh):
    other = DATASET.model_copy(update={"id": "d2"})
    fresh.put_dataset(other)
    for n in range(25):
        _queue(fresh, f"a{n:02d}", other if n % 5 == 0 else DATASET)
    for n in range(0, 25, 3):
        fresh.request_cancel(f"a{n:02d}")
    seen, cursor = [], None
    while True:
        page = fresh.list_jobs(limit=10, cursor=cursor)
        seen += [job.id for job in page.items]
        if len(seen) == 10:
            _queue(fresh, "newer")  # arrives between pages: it belongs before them, not in them
        if page.next is None:
            break
        cursor = page.next
    assert seen == [f"a{n:02d}" for n in reversed(range(25))]

    cancelled = fresh.list_jobs(status="cancelled", limit=100)
    assert [j.id for j in cancelled.items] == [
        f"a{n:02d}" for n in reversed(range(0, 25, 3))
    ] and cancelled.next is None
    mine = fresh.list_jobs(dataset_id="d2", limit=2)
    assert [j.id for j in mine.items] == ["a20", "a15"] and mine.next
    rest = fresh.list_jobs(dataset_id="d2", limit=10, cursor=mine.next)
    assert [j.id for j in rest.items] == ["a10", "a05", "a00"]
    both = fresh.list_jobs(status="cancelled", dataset_id="d2")
    assert [j.id for j in both.items] == ["a15", "a00"]
    assert fresh.delete_dataset("d2") == ("busy", "a05")  # its oldest queued job, from the dataset's index

    # A page's last job deleted before the next page is asked for: the next page starts after its time.
    first = fresh.list_jobs(status="cancelled", limit=2)
    fresh.delete_job(first.items[-1])
    after = fresh.list_jobs(status="cancelled", limit=100, cursor=first.next)
    assert [j.id for j in after.items] == [f"a{n:02d}" for n in reversed(range(0, 19, 3))]
    with pytest.raises(ValueError):
        fresh.list_jobs(cursor="not-a-cursor")


def test_datasets_page_newest_first(fresh):
    for n in range(5):
        fresh.put_dataset(DATASET.model_copy(update={"id": f"x{n}"}), created=1000.0 + n)
    page = fresh.list_datasets(limit=4)
    assert [d.id for d in page.items] == ["d1", "x4", "x3", "x2"]
    assert [d.id for d in fresh.list_datasets(limit=4, cursor=page.next).items] == ["x1", "x0"]
