"""The API as a real uvicorn process for the service benchmarks (``detect_service.py``, ``store_scale.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from core.launcher import free_port, http_answers, stop

REPO = Path(__file__).resolve().parents[1]


def start_api(redis_url: str, data_dir: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """An API on a free port, with ``SSD_*`` ``settings`` besides its Redis and data folder; its process and URL."""
    port = free_port()
    env = {**os.environ, "SSD_REDIS_URL": redis_url, "SSD_DATA_DIR": str(data_dir), "SSD_PORT": str(port), **settings}
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(args, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not http_answers(f"{url}/healthz"):
        if time.monotonic() > deadline or process.poll() is not None:
            stop(process, "api")
            raise SystemExit("the API did not start")
        time.sleep(0.2)
    return process, url
