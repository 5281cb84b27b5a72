"""The worker's job logic without Celery (real Redis), and a failing job through the real worker."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.service.helpers import TINY, wait_for_job
from worker.settings import Settings
from worker.store import Store, now_iso
from worker.training import JobReporter, LeaseKeeper, backfill_losses, run_job


@pytest.fixture
def fresh(redis_server):
    store = Store.from_url(redis_server.url, prefix=f"train-{uuid.uuid4().hex[:8]}")
    store.put_dataset({"id": "d1", "name": "x", "root": "files", "classes": ["a"]})
    yield store
    store.redis.close()


def _queue(store: Store, job_id: str = "j1") -> None:
    record = {"id": job_id, "status": "queued", "dataset_id": "d1", "config": {}, "epochs": 2, "created_at": now_iso()}
    assert store.create_job(record)


def test_a_job_leased_by_another_worker_is_not_run_twice(fresh, tmp_path):
    _queue(fresh)
    assert fresh.acquire_lease("j1", "another-worker", ttl_seconds=30)
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me") == "skipped: leased"
    assert fresh.get_job("j1")["status"] == "queued" and fresh.lease_holder("j1") == "another-worker"


def test_a_cancelled_job_never_starts(fresh, tmp_path):
    _queue(fresh)
    fresh.request_cancel("j1")
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me") == "skipped: cancelled"
    assert fresh.lease_holder("j1") is None and not (tmp_path / "runs" / "j1").exists()
    assert run_job("no-such-job", fresh, Settings(data_dir=tmp_path), "me") == "missing"


def test_backfill_appends_only_the_epochs_the_stream_lacks(fresh, tmp_path):
    _queue(fresh)
    fresh.append_epoch("j1", {"epoch": 1, "train_loss": 3.0})
    lines = [json.dumps({"epoch": e, "train_loss": 4.0 - e}) for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert backfill_losses(fresh, "j1", tmp_path) == 2
    assert [(r["epoch"], r["train_loss"]) for r in fresh.losses("j1")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert backfill_losses(fresh, "j1", tmp_path / "nowhere") == 0


def test_reporter_throttles_progress_and_cancel_checks(fresh):
    from model.engine import StepProgress

    _queue(fresh)
    lease = fresh.acquire_lease("j1", "me", ttl_seconds=30)
    keeper = LeaseKeeper(fresh, lease)
    reporter = JobReporter(fresh, "j1", keeper, progress_interval=10, cancel_interval=0.2)
    for step in range(1, 50):
        reporter.on_step(StepProgress(1, step, 50, 2, 1.0, 10.0, 60.0))
    assert fresh.get_job("j1")["progress"]["step"] == 1  # one write in the interval, not 49

    assert not reporter.should_stop()
    fresh.request_cancel("j1")  # queued -> cancelled; the flag is what a running job reads
    assert not reporter.should_stop()  # read at most every cancel_interval
    time.sleep(0.25)
    assert reporter.should_stop()

    reporter.on_epoch({"epoch": 1, "train_loss": 2.0, "val_loss": 1.5})
    reporter.on_epoch({"epoch": 1, "train_loss": 2.0, "val_loss": 1.5})  # a repeat is not appended again
    reporter.on_epoch({"epoch": 2, "train_loss": 1.0, "val_loss": 1.7})
    job = fresh.get_job("j1")
    assert [r["epoch"] for r in fresh.losses("j1")] == [1, 2]
    assert job["best_val_loss"] == 1.5 and job["epochs_completed"] == 2


def test_a_job_that_cannot_run_ends_failed_with_the_reason(client, worker, settings):
    dataset = client.post("/datasets/synthetic", json={"num_images": 2, "image_size": 100}).json()
    # An image deleted from the dataset folder behind the service's back.
    image = next((settings.datasets_dir / dataset["id"]).rglob("*.jpg"))
    image.unlink()
    job = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 1, **TINY}).json()
    failed = wait_for_job(client, job["id"], ("failed", "succeeded"), timeout=60)
    assert failed["status"] == "failed" and image.name in failed["error"] and failed["finished_at"]
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
