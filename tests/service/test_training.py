"""The worker's job logic without Celery (real Redis): leases, the monitor thread, the reaper, rebuilds."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from model.engine import StepProgress
from tests.service.conftest import wait_until
from tests.service.helpers import TINY, wait_for_job
from worker.reaper import Reaper
from worker.settings import Settings
from worker.store import Store, new_job
from worker.training import JobMonitor, run_job


@pytest.fixture
def fresh(redis_server):
    store = Store.from_url(redis_server.url, prefix=f"train-{uuid.uuid4().hex[:8]}")
    store.put_dataset({"id": "d1", "name": "x", "root": "files", "classes": ["a"]})
    yield store
    store.redis.close()


def _queue(store: Store, job_id: str = "j1", epochs: int = 2) -> dict:
    record = new_job(job_id, {"id": "d1", "name": "x", "classes": ["a"]}, {"epochs": epochs})
    assert store.create_job(record)
    return record


def test_a_job_leased_by_another_worker_is_not_run_twice(fresh, tmp_path):
    _queue(fresh)
    fresh.mark_dispatch("j1", "message-1")
    assert fresh.acquire_lease("j1", "another-worker", ttl_seconds=30)
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me", task_id="message-1") == "skipped: leased"
    assert fresh.get_job("j1")["status"] == "queued" and fresh.lease_holder("j1") == "another-worker"
    assert fresh.get_job("j1")["dispatch_id"] is None  # taken: the reaper knows no message is on its way


def test_a_cancelled_job_never_starts(fresh, tmp_path):
    _queue(fresh)
    fresh.request_cancel("j1")
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me") == "skipped: cancelled"
    assert fresh.lease_holder("j1") is None and not (tmp_path / "runs" / "j1").exists()
    assert run_job("no-such-job", fresh, Settings(data_dir=tmp_path), "me") == "missing"


def _step(epoch: int, step: int) -> StepProgress:
    return StepProgress(epoch, step, 50, 2, 1.0, 10.0, 60.0)


def test_the_monitor_thread_writes_progress_cancels_and_appends_each_epoch_once(fresh):
    _queue(fresh)
    fresh.start_job("j1", "me", "tok")
    lease = fresh.acquire_lease("j1", "tok", ttl_seconds=30)
    with JobMonitor(fresh, lease, cancel_interval=0.02, progress_interval=10) as monitor:
        for step in range(1, 50):
            monitor.on_step(_step(1, step))
        wait_until(lambda: (fresh.get_job("j1").get("progress") or {}).get("step"), 5, "progress")
        for step in range(50, 60):
            monitor.on_step(_step(1, step))
        time.sleep(0.2)
        assert fresh.get_job("j1")["progress"]["step"] < 50  # at most one write per progress interval

        # A resumed run: the checkpoint's history has epoch 1, which the stream lacks.
        monitor.on_resume([{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5}])
        monitor.on_epoch({"epoch": 2, "train_loss": 1.0, "val_loss": 1.7})
        monitor.on_epoch({"epoch": 2, "train_loss": 9.0, "val_loss": 9.0})  # a repeat is not appended again
        wait_until(lambda: len(fresh.losses("j1")) == 2, 5, "two epochs in the stream")

        assert not monitor.should_stop()
        fresh.request_cancel("j1")
        wait_until(monitor.should_stop, 5, "the cancel flag")
        assert monitor.drain(5)
    job = fresh.get_job("j1")
    assert [(r["epoch"], r["train_loss"]) for r in fresh.losses("j1")] == [(1, 2.0), (2, 1.0)]
    assert job["best_val_loss"] == 1.5 and job["epochs_completed"] == 2


def test_epoch_records_wait_out_a_redis_outage_in_order(fresh):
    _queue(fresh)
    fresh.start_job("j1", "me", "tok")
    lease = fresh.acquire_lease("j1", "tok", ttl_seconds=30)
    monitor = JobMonitor(fresh, lease, cancel_interval=0.02, progress_interval=0.1)
    real_append = fresh.append_epoch
    failing = {"on": True}

    def append(job_id, record):
        if failing["on"]:
            raise ConnectionError("Redis is away")
        return real_append(job_id, record)

    fresh.append_epoch = append
    with monitor:
        monitor.on_epoch({"epoch": 1, "train_loss": 3.0})
        monitor.on_epoch({"epoch": 2, "train_loss": 2.0})
        time.sleep(0.2)  # training goes on meanwhile: nothing here blocks
        assert fresh.losses("j1") == [] and not monitor.should_stop()
        failing["on"] = False
        assert monitor.drain(5)
    assert [r["epoch"] for r in fresh.losses("j1")] == [1, 2]


def test_a_lapsed_lease_is_taken_back_only_if_the_job_is_still_this_runners(fresh):
    _queue(fresh)
    fresh.start_job("j1", "me", "tok")
    lease = fresh.acquire_lease("j1", "tok", ttl_seconds=0.2)
    time.sleep(0.3)  # lapsed (Redis was away longer than the TTL)
    assert fresh.lease_holder("j1") is None
    assert fresh.renew_lease(lease) and fresh.lease_holder("j1") == "tok"  # nobody else took it: taken back
    fresh.redis.delete(fresh.lease_key("j1"))
    assert fresh.requeue_job("j1", "its worker vanished")  # the reaper requeued it meanwhile
    assert not fresh.renew_lease(lease)  # so the old runner must stop
    job = fresh.get_job("j1")
    assert job["status"] == "queued" and job["restarts"] == 1 and job["restart_reason"] == "its worker vanished"


def test_a_runner_that_lost_its_lease_cannot_record_the_end(fresh):
    _queue(fresh)
    fresh.start_job("j1", "me", "tok")
    mine = fresh.acquire_lease("j1", "tok", ttl_seconds=30)
    fresh.redis.set(fresh.lease_key("j1"), "someone-else")
    assert not fresh.finish_job("j1", "succeeded", lease=mine)
    assert not fresh.requeue_job("j1", "paused", lease=mine)
    assert fresh.get_job("j1")["status"] == "running"
    fresh.redis.set(fresh.lease_key("j1"), "tok")
    assert fresh.finish_job("j1", "succeeded", lease=mine, epoch=2)
    assert fresh.get_job("j1")["status"] == "succeeded" and fresh.lease_holder("j1") is None
    assert fresh.active_jobs() == []


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_reaper_requeues_a_running_job_whose_lease_is_gone(fresh, tmp_path):
    sent: list[str] = []
    clock = _Clock()
    reaper = Reaper(
        fresh, Settings(data_dir=tmp_path, lease_seconds=10, worker_heartbeat_seconds=1), sent.append, clock
    )
    _queue(fresh, "alive")
    _queue(fresh, "dead")
    for job_id in ("alive", "dead"):
        fresh.start_job(job_id, "worker-a", "tok")
    fresh.acquire_lease("alive", "tok", ttl_seconds=30)
    reaper.run_once()
    assert sent == []  # the lease of "dead" is missing, but not for long enough yet
    clock.now += 5
    assert reaper.run_once() == ["requeued dead"] and sent == ["dead"]
    job = fresh.get_job("dead")
    assert job["status"] == "queued" and job["restarts"] == 1 and "worker-a" in job["restart_reason"]
    assert fresh.get_job("alive")["status"] == "running"
    assert fresh.get_job("dead")["dispatch_id"] is None  # the test's dispatch only collects ids
    fresh.mark_dispatch("dead", "message-2")
    clock.now += 5
    assert reaper.run_once() == []  # a message is on its way: nothing to do


def test_the_reaper_sends_a_queued_job_that_no_message_will_reach(fresh, tmp_path):
    sent: list[str] = []
    settings = Settings(data_dir=tmp_path, lease_seconds=2, worker_heartbeat_seconds=1)
    reapers = [Reaper(fresh, settings, sent.append) for _ in range(2)]
    _queue(fresh, "waiting")
    fresh.mark_dispatch("waiting", "message-w")  # its message is in the queue
    _queue(fresh, "orphan")
    fresh.mark_dispatch("orphan", "message-o1")
    fresh.mark_dispatch("orphan", "message-o2")  # sent again (after a pause)
    assert not fresh.clear_dispatch(
        "orphan", "message-o1"
    )  # a late redelivery of the old message: still one on its way
    assert fresh.clear_dispatch("orphan", "message-o2")  # taken by a worker that found it leased, and acked
    time.sleep(1.1)
    for reaper in reapers:  # two workers' reapers: one message
        reaper.run_once()
    assert sent == ["orphan"]


def test_records_redis_lost_are_rebuilt_from_the_data_folder(fresh, tmp_path):
    settings = Settings(data_dir=tmp_path)
    dataset = {"id": "d9", "name": "lost", "root": "files", "classes": ["a"], "created_at": "2026-01-01T00:00:00Z"}
    (settings.datasets_dir / "d9").mkdir(parents=True)
    (settings.datasets_dir / "d9" / "dataset.json").write_text(json.dumps(dataset))
    for job_id, status in (("done", "succeeded"), ("busy", "running")):
        run_dir = settings.runs_dir / job_id
        run_dir.mkdir(parents=True)
        record = {**new_job(job_id, dataset, {"epochs": 3}), "status": status}
        (run_dir / "job.json").write_text(json.dumps(record))
        epochs = 3 if status == "succeeded" else 1
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"epoch": e, "train_loss": 1.0}) + "\n" for e in range(1, epochs + 1))
        )
    sent: list[str] = []
    actions = Reaper(fresh, settings, sent.append).run_once()
    assert sorted(actions) == ["restored dataset d9", "restored job busy", "restored job done"]
    assert fresh.get_dataset("d9")["name"] == "lost"
    assert fresh.get_job("done")["status"] == "succeeded" and len(fresh.losses("done")) == 3
    assert fresh.newest_succeeded_job() == "done"
    busy = fresh.get_job("busy")
    assert busy["status"] == "queued" and busy["restarts"] == 1 and "rebuilt" in busy["restart_reason"]
    assert [r["epoch"] for r in fresh.losses("busy")] == [1] and sent == ["busy"]
    assert Reaper(fresh, settings, sent.append).run_once() == []  # nothing twice
    assert sent == ["busy"]


def test_a_job_that_cannot_run_ends_failed_with_the_reason(client, worker, settings):
    dataset = client.post("/datasets/synthetic", json={"num_images": 2, "image_size": 100}).json()
    # An image deleted from the dataset folder behind the service's back.
    image = next((settings.datasets_dir / dataset["id"]).rglob("*.jpg"))
    image.unlink()
    job = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 1, **TINY}).json()
    failed = wait_for_job(client, job["id"], ("failed", "succeeded"), timeout=60)
    assert failed["status"] == "failed" and image.name in failed["error"] and failed["finished_at"]
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
