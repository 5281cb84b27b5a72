"""The one-command launcher: starts Redis, a worker and the API; Ctrl-C stops all of it."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import httpx

from core.launcher import redis_answers
from tests.support.processes import PYTHON, free_port, service_env, start_process, wait_for_http, wait_until


def test_up_uses_the_configured_redis_when_it_answers(redis_server, tmp_path, log_dir):
    assert not redis_answers(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    port = free_port()
    env = service_env(redis_server.url, tmp_path / "data", SSD_PORT=str(port))
    up = start_process("up-external", [PYTHON, "-m", "core.launcher"], env, log_dir)
    try:
        wait_until(lambda: "ready: API at" in up.log.read_text(), 120, "the ready line")
        log = up.log.read_text()
        assert f"using the Redis at {redis_server.url}" in log and "started redis-server" not in log
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(60) == 0, up.tail()
    finally:
        if up.alive():
            up.popen.kill()
    assert redis_answers(redis_server.url)  # a Redis it did not start is left running


def test_up_without_a_configured_redis_starts_its_own(tmp_path, log_dir):
    env = service_env("unused", tmp_path / "data", SSD_PORT=str(free_port()))
    del env["SSD_REDIS_URL"]  # the default localhost:6379 may be someone else's: not used
    up = start_process("up-embedded", [PYTHON, "-m", "core.launcher"], env, log_dir)
    try:
        wait_until(lambda: "started redis-server at" in up.log.read_text(), 60, "an embedded redis-server")
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(60) == 0, up.tail()
    finally:
        if up.alive():
            up.popen.kill()


def test_up_starts_everything_and_ctrl_c_stops_everything(tmp_path, log_dir):
    port = free_port()
    env = service_env(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "data", SSD_PORT=str(port))
    up = start_process("up", [PYTHON, "-m", "core.launcher"], env, log_dir)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base_url}/readyz", up, timeout=120)
        wait_until(lambda: httpx.get(f"{base_url}/readyz").json()["workers"], 90, "a worker in /readyz")
        wait_until(lambda: "ready: API at" in up.log.read_text(), 30, "the ready line")
        redis_url = re.search(r"started redis-server at (redis://\S+)", up.log.read_text()).group(1)
        # The API and the worker share this host: the API detects on its share of the cores, and the worker
        # starts with all of them (it leaves the API its share while the API detects: test_cpu_sharing).
        api_cores = int(re.search(r"the API detects on (\d+) of this host's CPU cores", up.log.read_text()).group(1))
        cores = int(re.search(r"PyTorch CPU threads: \d+ of (\d+) cores", up.log.read_text()).group(1))
        assert 1 <= api_cores <= cores and f"PyTorch CPU threads: {cores} of {cores} cores" in up.log.read_text()
        assert [w["device"] for w in httpx.get(f"{base_url}/readyz").json()["workers"]] == ["cpu"]
        assert redis_answers(redis_url)
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()

        started = time.monotonic()
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(60) == 0, up.tail()
        assert time.monotonic() - started < 40
    finally:
        if up.alive():
            up.popen.kill()
    assert "stopped" in up.log.read_text()
    assert not redis_answers(redis_url, timeout=0.3)
    try:
        httpx.get(f"{base_url}/healthz", timeout=1)
        raise AssertionError("the API still answers after Ctrl-C")
    except httpx.ConnectError:
        pass


def test_cli_help():
    result = subprocess.run([PYTHON, "-m", "core.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "up" in result.stdout and "worker" in result.stdout
