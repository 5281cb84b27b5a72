"""docker-compose.yml: its shape, and its api and worker commands run as-is outside Docker."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import yaml

from core.store import Store
from tests.support.processes import REPO, free_port, service_env, start_process, wait_for_http, wait_for_worker
from tests.support.service import TINY, wait_for_job


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_compose_services_redis_api_worker():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    api, worker = services["api"], services["worker"]
    assert api["image"] == worker["image"] and "build" in api  # one image for both
    assert api["ports"] == ["${API_BIND_ADDRESS:-127.0.0.1}:8000:8000"]  # local only unless asked
    assert api["environment"]["SSD_API_KEY"] == "${SSD_API_KEY:-}"
    for service in (api, worker):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        data_dir = service["environment"]["SSD_DATA_DIR"]
        assert any(v.split(":")[1] == data_dir and v.split(":")[0] in compose["volumes"] for v in service["volumes"])
        assert service["environment"]["SSD_REDIS_URL"].startswith("redis://redis:")
        # Both on one host: the API detects on half its cores, a CPU worker leaves it those meanwhile.
        assert service["environment"]["SSD_API_CPU_CORES"] == "${SSD_API_CPU_CORES:-half}"
    assert worker["command"] == ["python", "-m", "worker.pool"]  # a worker per GPU, each --pool solo
    gpu = load("docker-compose.gpu.yml")["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["capabilities"] == ["gpu"] and devices["count"] == "all"
    assert (REPO / "Dockerfile").is_file() and (REPO / ".dockerignore").is_file()


def test_compose_commands_run_as_is_against_the_test_redis(redis_server, tmp_path, log_dir):
    compose = load("docker-compose.yml")["services"]
    port, prefix = free_port(), f"compose-{os.getpid()}"
    env = service_env(redis_server.url, tmp_path, SSD_PORT=str(port), SSD_KEY_PREFIX=prefix, SSD_API_CPU_CORES="half")
    store = Store.from_url(redis_server.url, prefix)
    api = start_process("compose-api", compose["api"]["command"], env, log_dir)
    worker = start_process("compose-worker", compose["worker"]["command"], env, log_dir)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base_url}/healthz", api)
        wait_for_worker(store, worker, "ssd-worker-cpu-")
        with httpx.Client(base_url=base_url, timeout=60) as client:
            ready = client.get("/readyz").json()
            assert ready["redis"] == "ok" and any("ssd-worker-cpu-" in w["name"] for w in ready["workers"])
            dataset = client.post("/datasets/synthetic", json={"num_images": 4, "image_size": 120}).json()
            body = {"dataset_id": dataset["id"], "epochs": 1, "val_fraction": 0.0, **TINY}
            job = client.post("/train", json=body).json()
            assert wait_for_job(client, job["id"], ("succeeded", "failed"), timeout=120)["status"] == "succeeded"
        assert Path(tmp_path / "runs" / job["id"] / "last.pt").is_file()
    finally:
        api.stop()
        worker.stop()
        store.redis.close()
    # uvicorn re-raises the SIGTERM it handled after a clean shutdown, so -15 is a clean exit too.
    assert api.popen.returncode in (0, -15) and "Application shutdown complete" in api.log.read_text(), api.tail()
    half = max(1, int(env["OMP_NUM_THREADS"]) // 2)  # the cores PyTorch sees (core.cpu_threads.host_cores)
    assert f"PyTorch CPU threads: {half} of" in api.log.read_text(), api.tail()


def test_compose_s3_profile_runs_minio_and_makes_the_bucket_with_the_service_image(tmp_path, log_dir):
    services = load("docker-compose.yml")["services"]
    minio, bucket = services["minio"], services["bucket"]
    assert minio["profiles"] == ["s3"] and bucket["profiles"] == ["s3"]
    assert minio["image"].startswith("quay.io/minio/minio:RELEASE.")  # pinned
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy" and bucket["restart"] == "no"
    for name in ("api", "worker"):  # unset SSD_STORAGE_URL: the data volume, as without the profile
        environment = services[name]["environment"]
        assert environment["SSD_STORAGE_URL"] == "${SSD_STORAGE_URL:-}"
        assert environment["AWS_ENDPOINT_URL"] == "${AWS_ENDPOINT_URL-http://minio:9000}"
        assert environment["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
        assert environment["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]

    # The bucket service's command, as-is, against a real S3 API: it makes the bucket, then finds it there.
    from tests.support.s3_server import s3_server

    with s3_server() as s3:
        env = {**service_env("redis://127.0.0.1:1/0", tmp_path), **s3.env, "SSD_STORAGE_URL": "s3://made-at-start/x"}
        for attempt, said in ((1, "created the bucket s3://made-at-start/x/"), (2, "ok: datasets and runs")):
            process = start_process(f"compose-bucket-{attempt}", bucket["command"], env, log_dir)
            assert process.popen.wait(60) == 0, process.tail()
            assert said in process.log.read_text(), process.tail()
        assert s3.keys("made-at-start") == []
