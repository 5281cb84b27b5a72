"""The Redis job store against a real redis-server: exactly-once epochs, leases, atomic transitions."""

from __future__ import annotations

import time
import uuid

import pytest

from worker.store import Store, now_iso


@pytest.fixture
def fresh(redis_server):
    """A store under a key prefix of its own, so each test starts empty."""
    store = Store.from_url(redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    yield store
    store.redis.close()


def _job(store: Store, job_id: str, dataset_id: str = "d1") -> dict:
    record = {"id": job_id, "status": "queued", "dataset_id": dataset_id, "config": {}, "epochs": 3}
    assert store.create_job({**record, "created_at": now_iso()})
    return record


def test_an_epoch_is_appended_once_and_in_order(fresh):
    fresh.put_dataset({"id": "d1", "name": "x"})
    _job(fresh, "j1")
    assert fresh.append_epoch("j1", {"epoch": 1, "train_loss": 3.0})
    assert not fresh.append_epoch("j1", {"epoch": 1, "train_loss": 99.0})  # a redelivered epoch
    assert fresh.append_epoch("j1", {"epoch": 2, "train_loss": 2.0})
    assert not fresh.append_epoch("j1", {"epoch": 1, "train_loss": 1.0})  # an older one, late
    assert [r["epoch"] for r in fresh.losses("j1")] == [1, 2]
    assert fresh.losses("j1")[0]["train_loss"] == 3.0
    assert [r["epoch"] for r in fresh.losses("j1", after=1)] == [2]
    assert fresh.last_epoch("j1") == 2 and fresh.last_epoch("other") == 0


def test_a_lease_has_one_holder_until_it_expires(fresh):
    first = fresh.acquire_lease("j1", "worker-a", ttl_seconds=0.3)
    assert first is not None
    assert fresh.acquire_lease("j1", "worker-b", ttl_seconds=5) is None
    assert fresh.renew_lease(first)
    time.sleep(0.45)
    assert not fresh.renew_lease(first)  # expired
    second = fresh.acquire_lease("j1", "worker-b", ttl_seconds=5)
    assert second is not None and fresh.lease_holder("j1") == "worker-b"
    assert not fresh.release_lease(first)  # a stale holder cannot release someone else's lease
    assert fresh.release_lease(second) and fresh.lease_holder("j1") is None


def test_cancel_and_start_are_atomic_transitions(fresh):
    fresh.put_dataset({"id": "d1", "name": "x"})
    _job(fresh, "queued")
    assert fresh.request_cancel("queued") == "queued"
    assert fresh.get_job("queued")["status"] == "cancelled"
    assert fresh.start_job("queued", "w") == "cancelled"  # the worker must not run it
    assert "started_at" not in fresh.get_job("queued")

    _job(fresh, "running")
    assert fresh.start_job("running", "w") == "queued"
    assert fresh.get_job("running")["status"] == "running"
    assert fresh.request_cancel("running") == "running"
    assert fresh.cancel_requested("running") and fresh.get_job("running")["status"] == "running"
    assert fresh.start_job("running", "w2") == "running"  # a redelivery resumes and counts a restart
    assert fresh.get_job("running")["restarts"] == 1
    assert fresh.request_cancel("missing") is None


def test_datasets_cannot_vanish_under_active_jobs(fresh):
    assert not fresh.create_job({"id": "j0", "dataset_id": "nope", "status": "queued"})
    assert fresh.get_job("j0") is None
    fresh.put_dataset({"id": "d1", "name": "x"})
    _job(fresh, "j1")
    assert fresh.delete_dataset("d1") == ("busy", "j1")
    fresh.finish_job("j1", "failed", error="boom")
    assert fresh.delete_dataset("d1") == ("deleted", None)
    assert fresh.delete_dataset("d1") == ("missing", None)
    assert fresh.get_dataset("d1") is None


def test_newest_succeeded_job_and_status_counts(fresh):
    fresh.put_dataset({"id": "d1", "name": "x"})
    for job_id in ("a", "b", "c"):
        _job(fresh, job_id)
    fresh.finish_job("a", "succeeded")
    fresh.finish_job("b", "failed", error="x")
    assert fresh.newest_succeeded_job() == "a"
    fresh.finish_job("c", "succeeded")
    assert fresh.newest_succeeded_job() == "c"
    assert fresh.status_counts() == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert fresh.list_job_ids() == ["c", "b", "a"]
    with pytest.raises(ValueError):
        fresh.finish_job("a", "running")
