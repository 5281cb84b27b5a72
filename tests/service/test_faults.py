"""Fault injection with real processes: a worker SIGKILLed or SIGTERMed mid-epoch, two workers
racing for one job past Celery's visibility timeout, and Redis stopped and restarted (AOF) while
a job runs. The scenarios share a Redis of their own (AOF on, in a temporary folder) and an API;
each starts its own workers, with short leases, so recovery takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    PYTHON,
    Process,
    RedisServer,
    free_port,
    service_env,
    start_process,
    start_redis,
    wait_for_http,
    wait_for_worker,
    wait_until,
    worker_args,
)
from tests.service.helpers import TINY, shapes, wait_for_job, zip_folder
from worker.store import Store

# Leases of 3 s renewed every second; Celery redelivers unacked messages after 2 s.
FAULT_LIMITS = {
    "SSD_LEASE_SECONDS": "3",
    "SSD_WORKER_HEARTBEAT_SECONDS": "1",
    "SSD_VISIBILITY_TIMEOUT_SECONDS": "2",
    "SSD_PROGRESS_INTERVAL_SECONDS": "0.2",
}
# 16 images in batches of 2: 8 steps, about 1.5 s an epoch on a small CPU.
JOB = {"epochs": 3, "val_fraction": 0.0, **TINY, "batch_size": 2}


@dataclass
class Service:
    redis: RedisServer
    api: Process
    base_url: str
    env: dict[str, str]
    data_dir: Path
    log_dir: Path
    store: Store
    dataset_id: str
    workers: list[Process]

    def start_worker(self, name: str) -> Process:
        process = start_process(name, worker_args(name), self.env, self.log_dir)
        self.workers.append(process)
        wait_for_worker(self.store, process, name)
        return process

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def worker_logs(self) -> str:
        return "\n".join(p.log.read_text(errors="replace") for p in self.workers if p.log.exists())


@pytest.fixture(scope="module")
def service(tmp_path_factory, log_dir) -> Iterator[Service]:
    """A Redis with AOF (fsync always), an API on it and a 16-image dataset; workers are up to each test."""
    folder = tmp_path_factory.mktemp("faults")
    redis = start_redis(folder / "redis", log_dir, "--appendonly", "yes", "--appendfsync", "always")
    data_dir = folder / "data"
    port = free_port()
    env = service_env(redis.url, data_dir, SSD_PORT=str(port), **FAULT_LIMITS)
    api = start_process(f"api-{port}", [PYTHON, "-m", "app"], env, log_dir)
    base_url = f"http://127.0.0.1:{port}"
    store = Store.from_url(redis.url, "ssd")
    try:
        wait_for_http(f"{base_url}/healthz", api)
        shapes(folder / "images", num_images=16, seed=3)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            response = client.post("/datasets", files={"file": ("faults.zip", zip_folder(folder / "images"))})
        assert response.status_code == 201, response.text
        service = Service(redis, api, base_url, env, data_dir, log_dir, store, response.json()["id"], [])
        yield service
    finally:
        api.stop()
        store.redis.close()
        redis.process.stop()


@pytest.fixture
def faults(service) -> Iterator[Service]:
    """The shared service; the workers a test starts are killed after it."""
    yield service
    for process in service.workers:
        process.stop(signal.SIGKILL)
    service.workers.clear()


def _into_epoch_two(client: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    """Wait until epoch 1's record is in (epoch 2 has just begun: it takes over a second here); the job."""

    def second_epoch() -> dict | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] == "running" and job["epochs_completed"] >= 1 else None

    return wait_until(second_epoch, timeout, f"job {job_id} to finish its first epoch", interval=0.05)


def _train_into_epoch_two(client: httpx.Client, dataset_id: str) -> dict:
    """Post a ``JOB`` and wait until it has begun its second epoch; the job as POST /train answered."""
    job = client.post("/train", json={"dataset_id": dataset_id, **JOB}).json()
    _into_epoch_two(client, job["id"])
    return job


def _epochs(client: httpx.Client, job_id: str) -> list[int]:
    return [r["epoch"] for r in client.get(f"/jobs/{job_id}/losses").json()["losses"]]


def test_a_sigkilled_worker_is_replaced_and_the_job_resumes(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    first = service.start_worker("doomed")
    with service.client() as client:
        job = _train_into_epoch_two(client, dataset_id)
        os.kill(first.popen.pid, signal.SIGKILL)  # no goodbye: the lease just stops being renewed
        first.popen.wait(10)
        service.start_worker("heir")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert _epochs(client, job["id"]) == [1, 2, 3]  # no gap, no repeat
        assert done["restarts"] >= 1 and "expired" in done["restart_reason"], done
        assert done["epochs_completed"] == 3 and done["worker"].startswith("heir@")

    # The resumed run went on from epoch 1's checkpoint exactly as an uninterrupted run does.
    from model.config import TrainConfig
    from model.data import read_dataset
    from model.engine import fit

    config = TrainConfig.from_dict(
        json.loads((service.data_dir / "runs" / job["id"] / "config.json").read_text())["train_config"]
    )
    data = read_dataset(next((service.data_dir / "datasets" / dataset_id).glob("files*")))
    alone = fit(config, data, tmp_path / "uninterrupted")
    resumed = [
        json.loads(line) for line in (service.data_dir / "runs" / job["id"] / "metrics.jsonl").read_text().splitlines()
    ]
    for mine, theirs in zip(resumed, alone.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4), (mine, theirs)


def test_two_workers_past_the_visibility_timeout_train_a_job_once(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("one")
    service.start_worker("two")
    with service.client() as client:
        job = client.post("/train", json={"dataset_id": dataset_id, **JOB, "epochs": 4}).json()
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 0, done
        assert _epochs(client, job["id"]) == [1, 2, 3, 4]
    logs = service.worker_logs()
    assert logs.count(f"job {job['id']}: training on") == 1, logs[-3000:]
    # The message was delivered again while the job ran (longer than the 3 s visibility timeout),
    # and that delivery found the job running under its lease and left it alone.
    assert f"job {job['id']} is running; not starting it" in logs, logs[-3000:]


def test_sigterm_pauses_the_job_which_another_worker_finishes(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    first = service.start_worker("leaving")
    with service.client() as client:
        job = _train_into_epoch_two(client, dataset_id)
        stopped = time.monotonic()
        first.popen.send_signal(signal.SIGTERM)
        assert first.popen.wait(30) == 0, first.tail()
        assert time.monotonic() - stopped < 15  # one batch and a checkpoint, not the whole job
        paused = client.get(f"/jobs/{job['id']}").json()
        assert paused["status"] == "queued" and paused["restarts"] == 1, paused
        finished = _epochs(client, job["id"])
        assert finished == list(range(1, len(finished) + 1)) and 1 <= len(finished) < JOB["epochs"]
        assert f"shut down in epoch {len(finished) + 1}" in paused["restart_reason"], paused
        assert paused["epoch"] == len(finished) and paused["epochs_completed"] == len(finished)
        assert (service.data_dir / "runs" / job["id"] / "last.pt").is_file()

        service.start_worker("arriving")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 1, done
        assert _epochs(client, job["id"]) == [1, 2, 3]
        assert done["started_at"] == paused["started_at"]


def test_a_redis_restart_loses_nothing_and_the_api_recovers(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("steady")
    with service.client() as client:
        job = client.post("/train", json={"dataset_id": dataset_id, **JOB}).json()
        queued = client.post("/train", json={"dataset_id": dataset_id, **JOB, "epochs": 1}).json()
        _into_epoch_two(client, job["id"])

        service.redis.process.stop(signal.SIGTERM)  # writes out its AOF and exits
        down = client.get(f"/jobs/{job['id']}")
        assert down.status_code == 503 and "Redis" in down.json()["detail"], down.text
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        time.sleep(4)  # longer than the 3 s lease: the runner must take it back
        restarted = start_redis(
            service.redis.folder,
            service.log_dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            port=service.redis.port,
        )
        service.redis = restarted

        wait_until(lambda: client.get(f"/jobs/{job['id']}").status_code == 200, 30, "the API to recover")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert _epochs(client, job["id"]) == [1, 2, 3]
        second = wait_for_job(client, queued["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert second["status"] == "succeeded" and _epochs(client, queued["id"]) == [1]
        assert client.get("/readyz").status_code == 200


def test_records_redis_lost_are_rebuilt_from_the_data_folder(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("rebuilder")
    with service.client() as client:
        job = _train_into_epoch_two(client, dataset_id)

        # Redis comes back from a different, empty folder: every record and queued message is gone.
        service.redis.process.stop(signal.SIGKILL)
        empty = service.redis.folder.parent / "redis-empty"
        service.redis = start_redis(empty, service.log_dir, "--appendonly", "yes", port=service.redis.port)

        # A worker sees the new server: datasets and jobs come back from their folders, and the
        # unfinished job is queued again and resumes from its checkpoint.
        wait_until(lambda: client.get(f"/datasets/{dataset_id}").status_code == 200, 30, "the dataset rebuilt")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert "rebuilt from its run folder" in done["restart_reason"] and done["restarts"] >= 1
        assert _epochs(client, job["id"]) == [1, 2, 3]
