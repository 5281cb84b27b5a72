"""A service to break, for the fault-injection tests: a Redis with an append-only file, an API on it,
a small dataset, workers started and killed by each test, and a TCP proxy that cuts a worker off
from Redis. Short leases make recovery take seconds, not minutes."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.store import Store
from tests.support.processes import (
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
from tests.support.service import TINY, shapes, zip_folder

# Leases of 3 s renewed every second; Celery redelivers unacked messages after 2 s.
FAULT_LIMITS = {
    "SSD_LEASE_SECONDS": "3",
    "SSD_WORKER_HEARTBEAT_SECONDS": "1",
    "SSD_VISIBILITY_TIMEOUT_SECONDS": "2",
    "SSD_PROGRESS_INTERVAL_SECONDS": "0.2",
}
# 16 images in batches of 2: 8 steps, about 1.5 s an epoch on a small CPU.
JOB = {"epochs": 3, "val_fraction": 0.0, **TINY, "batch_size": 2}
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "job.json")


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

    def start_worker(self, name: str, **env: str) -> Process:
        """A worker process named ``name``, with ``SSD_*`` overrides, once its heartbeat is seen."""
        process = start_process(name, worker_args(name), {**self.env, **env}, self.log_dir)
        self.workers.append(process)
        wait_for_worker(self.store, process, name)
        return process

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def worker_logs(self) -> str:
        return "\n".join(p.log.read_text(errors="replace") for p in self.workers if p.log.exists())

    def run_dir(self, job_id: str) -> Path:
        return self.data_dir / "runs" / job_id

    def run_files(self, job_id: str) -> dict[str, bytes]:
        """The bytes of the run folder's files that a stale run must never change."""
        return {name: (self.run_dir(job_id) / name).read_bytes() for name in RUN_FILES}


def start_service(folder: Path, log_dir: Path) -> Service:
    """A Redis with AOF (fsync always), an API on it and a 16-image dataset; no worker yet."""
    redis = start_redis(folder / "redis", log_dir, "--appendonly", "yes", "--appendfsync", "always")
    data_dir = folder / "data"
    port = free_port()
    env = service_env(redis.url, data_dir, SSD_PORT=str(port), **FAULT_LIMITS)
    api = start_process(f"api-{port}", [PYTHON, "-m", "app"], env, log_dir)
    base_url = f"http://127.0.0.1:{port}"
    service = Service(redis, api, base_url, env, data_dir, log_dir, Store.from_url(redis.url, "ssd"), "", [])
    try:
        wait_for_http(f"{base_url}/healthz", api)
        shapes(folder / "images", num_images=16, seed=3)
        with service.client() as client:
            response = client.post("/datasets", files={"file": ("faults.zip", zip_folder(folder / "images"))})
        assert response.status_code == 201, response.text
    except BaseException:
        stop_service(service)
        raise
    service.dataset_id = response.json()["id"]
    return service


def stop_service(service: Service) -> None:
    for process in service.workers:
        process.stop(signal.SIGKILL)
    service.api.stop()
    service.store.redis.close()
    service.redis.process.stop()


def into_epoch_two(client: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    """Wait until epoch 1's record is in (epoch 2 has just begun: it takes over a second here); the job."""

    def second_epoch() -> dict | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] == "running" and job["epochs_completed"] >= 1 else None

    return wait_until(second_epoch, timeout, f"job {job_id} to finish its first epoch", interval=0.05)


def train_into_epoch_two(client: httpx.Client, dataset_id: str, **changes) -> dict:
    """Post a ``JOB`` and wait until it has begun its second epoch; the job as POST /train answered."""
    response = client.post("/train", json={"dataset_id": dataset_id, **JOB, **changes})
    assert response.status_code == 202, response.text
    job = response.json()
    into_epoch_two(client, job["id"])
    return job


def epochs(client: httpx.Client, job_id: str) -> list[int]:
    return [r["epoch"] for r in client.get(f"/jobs/{job_id}/losses").json()["losses"]]


def metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class CuttableProxy:
    """A TCP proxy to a local port that a test cuts (every connection reset, new ones closed at once,
    as when a worker's machine loses the network) and restores. What the target sends back can be
    slowed, from any moment on: ``bytes_per_second`` (a slow link to a bucket) and ``delay``
    (seconds before each piece is passed on). ``url`` is a Redis URL, ``http_url`` an endpoint."""

    def __init__(self, target_port: int, bytes_per_second: float | None = None, delay: float = 0.0):
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.http_url = f"http://127.0.0.1:{self.port}"
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool = False) -> None:
        try:
            while chunk := source.recv(8192 if answers else 65536):
                if answers and self.delay:
                    time.sleep(self.delay)
                sink.sendall(chunk)
                if answers and self.bytes_per_second is not None:
                    time.sleep(len(chunk) / self.bytes_per_second)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for end in sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
                end.close()
            except OSError:
                pass

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self.listener.close()
