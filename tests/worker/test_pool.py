"""A training worker per GPU (``worker.pool``): which GPUs, and the pool as real processes on the CPU,
naming two GPUs (each worker is pinned to one through CUDA_VISIBLE_DEVICES, and trains on the CPU)."""

from __future__ import annotations

import os
import signal

import httpx
import psutil
import pytest

from core.settings import Settings
from core.store import Store
from tests.support.processes import PYTHON, api_process, service_env, start_process, wait_for_worker, wait_until
from tests.support.service import TINY, shapes, wait_for_job, zip_folder
from worker.pool import members, visible_gpus


@pytest.mark.parametrize(
    ("setting", "environ", "gpus", "expected"),
    [
        ("all", {}, 2, ["0", "1"]),
        ("all", {}, 0, []),  # no GPU: one CPU worker
        ("all", {"CUDA_VISIBLE_DEVICES": "3,1"}, 8, ["3", "1"]),  # what the container or the user left visible
        ("all", {"CUDA_VISIBLE_DEVICES": "-1"}, 8, []),
        ("0,2", {}, 0, ["0", "2"]),  # named: started whatever torch sees (the test below runs on a CPU)
        ("none", {}, 8, []),
    ],
)
def test_the_gpus_a_pool_starts_workers_for(setting, environ, gpus, expected):
    assert visible_gpus(setting, environ, lambda: gpus) == expected


def test_each_worker_is_pinned_to_its_gpu_and_named_after_it(tmp_path):
    pool = members(Settings(data_dir=tmp_path, gpus="0,1"), environ={"PATH": "/bin"})
    assert [m.label for m in pool] == ["gpu0", "gpu1"]
    assert [(m.env["CUDA_VISIBLE_DEVICES"], m.env["SSD_WORKER_GPU"]) for m in pool] == [("0", "0"), ("1", "1")]
    assert all(f"ssd-worker-{m.label}-" in " ".join(m.args) and "solo" in m.args for m in pool)
    assert [m.label for m in members(Settings(data_dir=tmp_path, gpus="none"))] == ["cpu"]


def test_two_gpus_train_two_jobs_at_once_and_the_pool_restarts_and_stops_its_workers(env, log_dir, tmp_path):
    prefix = f"pool-{os.getpid()}"
    pool_env = service_env(env["SSD_REDIS_URL"], tmp_path, SSD_KEY_PREFIX=prefix, SSD_GPUS="0,1", SSD_LEASE_SECONDS="4")
    store = Store.from_url(env["SSD_REDIS_URL"], prefix)
    pool = start_process("pool", [PYTHON, "-m", "worker.pool"], pool_env, log_dir)
    try:
        for gpu in ("0", "1"):
            wait_for_worker(store, pool, f"ssd-worker-gpu{gpu}-")
        with api_process(pool_env, log_dir, "api-pool") as base, httpx.Client(base_url=base, timeout=30) as client:
            shapes(tmp_path / "images", num_images=16, seed=5)
            dataset = client.post("/datasets", files={"file": ("p.zip", zip_folder(tmp_path / "images"))}).json()
            body = {"dataset_id": dataset["id"], "epochs": 4, "val_fraction": 0.0, **TINY, "batch_size": 2}
            jobs = [client.post("/train", json=body).json()["id"] for _ in range(2)]

            def both_running() -> list[dict] | None:
                found = [client.get(f"/jobs/{job_id}").json() for job_id in jobs]
                return found if all(job["status"] == "running" for job in found) else None

            running = wait_until(both_running, 90, "both jobs to train at the same time")
            assert sorted(job["gpu"] for job in running) == ["0", "1"], running
            assert {job["device"] for job in running} == {"cpu"} and all(job["host"] for job in running)
            assert len({job["worker"] for job in running}) == 2

            # A worker that dies comes back (and its job resumes); the other trains on.
            victim = next(p for p in psutil.Process(pool.popen.pid).children() if "gpu0" in " ".join(p.cmdline()))
            victim.kill()
            wait_until(lambda: "worker gpu0 exited" in pool.log.read_text(), 30, "the pool to see the death")
            wait_until(
                lambda: any(
                    "gpu0" in " ".join(p.cmdline()) and p.pid != victim.pid
                    for p in psutil.Process(pool.popen.pid).children()
                ),
                30,
                "a new gpu0 worker",
            )
            done = [wait_for_job(client, job_id, ("succeeded", "failed", "cancelled"), 180) for job_id in jobs]
            assert [job["status"] for job in done] == ["succeeded", "succeeded"], done

            # SIGTERM reaches every worker; each one pauses its job (here: one more job, then stop mid-way).
            paused = client.post("/train", json={**body, "epochs": 50}).json()["id"]
            wait_for_job(client, paused, ("running",), 60)
            workers = psutil.Process(pool.popen.pid).children()
            pool.popen.send_signal(signal.SIGTERM)
            assert pool.popen.wait(90) == 0, pool.tail()
            assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
            after = client.get(f"/jobs/{paused}").json()
            assert after["status"] == "queued" and "shut down" in after["restart_reason"], after
    finally:
        pool.stop(signal.SIGKILL)
        store.redis.close()
