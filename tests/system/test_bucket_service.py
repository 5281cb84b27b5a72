"""The service on a bucket (``SSD_STORAGE_URL``): a real S3 API on loopback (moto's server), a real
Redis, the API and each worker on data folders of their own, as on different machines."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.store import Store
from tests.support.faults import FAULT_LIMITS, JOB, CuttableProxy, epochs, train_into_epoch_two
from tests.support.processes import (
    PYTHON,
    Process,
    RedisServer,
    api_process,
    free_port,
    service_env,
    start_process,
    start_redis,
    wait_for_http,
    wait_for_worker,
    wait_until,
    worker_args,
)
from tests.support.s3_server import S3Server, s3_server
from tests.support.service import image_bytes, shapes, wait_for_job, zip_folder

BUCKET = "ssd-service-test"
PREFIX = "team"
ENDED = ("succeeded", "failed", "cancelled")


@dataclass
class BucketService:
    s3: S3Server
    redis: RedisServer
    store: Store
    base_url: str
    env: dict[str, str]  # without SSD_DATA_DIR's folder: each process gets its own
    folder: Path
    log_dir: Path
    workers: list[Process]

    def start_worker(self, name: str, **env: str) -> Process:
        """A worker with an empty data folder of its own (another machine)."""
        own = {**self.env, "SSD_DATA_DIR": str(self.folder / f"data-{name}"), **env}
        process = start_process(name, worker_args(name), own, self.log_dir)
        self.workers.append(process)
        wait_for_worker(self.store, process, name)
        return process

    def keys(self, prefix: str = "") -> list[str]:
        return self.s3.keys(BUCKET, f"{PREFIX}/{prefix}")


@pytest.fixture(scope="module")
def service(tmp_path_factory, log_dir) -> Iterator[BucketService]:
    folder = tmp_path_factory.mktemp("bucket-service")
    with s3_server() as s3:
        url = s3.create_bucket(BUCKET)
        redis = start_redis(folder / "redis", log_dir)
        env = {
            **service_env(redis.url, folder / "data-api", SSD_STORAGE_URL=f"{url}/{PREFIX}", **FAULT_LIMITS),
            **s3.env,
        }
        store = Store.from_url(redis.url, "ssd")
        try:
            with api_process(env, log_dir, name="bucket-api") as base_url:
                yield BucketService(s3, redis, store, base_url, env, folder, log_dir, [])
        finally:
            store.redis.close()
            redis.process.stop()


@pytest.fixture
def bucket_service(service) -> Iterator[BucketService]:
    yield service
    for process in service.workers:
        process.stop(signal.SIGKILL)
    service.workers.clear()


def upload_dataset(service: BucketService, client: httpx.Client, name: str) -> dict:
    shapes(service.folder / name, num_images=16, seed=3)
    response = client.post("/datasets", files={"file": (f"{name}.zip", zip_folder(service.folder / name))})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_job_resumes_on_another_machine_from_the_bucket_and_is_served_and_deleted(bucket_service, tmp_path):
    service = bucket_service
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        ready = client.get("/readyz").json()
        assert ready["storage"] == "ok", ready
        dataset = upload_dataset(service, client, "shapes")
        assert service.keys(f"datasets/{dataset['id']}/") == [
            f"{PREFIX}/datasets/{dataset['id']}/dataset.json",
            f"{PREFIX}/datasets/{dataset['id']}/files.zip",
        ]

        first = service.start_worker("doomed")
        job = train_into_epoch_two(client, dataset["id"])
        os.kill(first.popen.pid, signal.SIGKILL)  # mid-job, no goodbye
        first.popen.wait(10)
        service.start_worker("heir")  # its cache is empty: everything comes from the bucket
        done = wait_for_job(client, job["id"], ENDED, timeout=180)
        logs = "\n".join(p.log.read_text(errors="replace") for p in service.workers)
        assert done["status"] == "succeeded", (done, logs[-3000:])
        assert done["restarts"] >= 1 and done["worker"].startswith("heir@"), done
        assert epochs(client, job["id"]) == [1, 2, 3]
        assert "resuming" in service.workers[1].log.read_text()

        # No machine shares a folder: the API's holds no run, the workers' no longer hold a working copy.
        assert not (service.folder / "data-api" / "runs" / job["id"]).exists()
        for name in ("doomed", "heir"):
            assert not (service.folder / f"data-{name}" / "runs" / job["id"]).exists()
        run_keys = service.keys(f"runs/{job['id']}/")
        assert {key.rsplit("/", 1)[-1] for key in run_keys if "/files/" not in key} == {"job.json", "manifest.json"}
        manifest = json.loads(
            service.s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/{job['id']}/manifest.json")["Body"].read()
        )
        assert sorted(manifest["files"]) == ["best.pt", "config.json", "last.pt", "losses.png", "metrics.jsonl"]
        assert sorted(manifest["files"].values()) == sorted(
            key.removeprefix(f"{PREFIX}/") for key in run_keys if "/files/" in key
        )

        # The resumed run went on from epoch 1's checkpoint exactly as an uninterrupted run does.
        assert_same_as_uninterrupted(service, manifest, dataset, tmp_path)

        detected = client.post(f"/detect?job_id={job['id']}", files={"file": ("a.jpg", image_bytes(320, 240))})
        assert detected.status_code == 200, detected.text
        assert isinstance(detected.json()["detections"], list)
        assert client.get(f"/jobs/{job['id']}/losses.png").headers["content-type"] == "image/png"

        assert client.delete(f"/jobs/{job['id']}").status_code == 204
        assert service.keys(f"runs/{job['id']}/") == []
        assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
        assert service.keys(f"datasets/{dataset['id']}/") == []


def assert_same_as_uninterrupted(service: BucketService, manifest: dict, dataset: dict, tmp_path: Path) -> None:
    from model.config import TrainConfig
    from model.data import read_dataset
    from model.training import fit

    def read(name: str) -> bytes:
        key = f"{PREFIX}/{manifest['files'][name]}"
        return service.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    config = TrainConfig.from_dict(json.loads(read("config.json"))["train_config"])
    shapes(tmp_path / "files", num_images=16, seed=3)  # the same images the dataset was made of
    alone = fit(config, read_dataset(tmp_path / "files"), tmp_path / "uninterrupted")
    resumed = [json.loads(line) for line in read("metrics.jsonl").decode().splitlines()]
    for mine, theirs in zip(resumed, alone.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4), (mine, theirs)


def test_records_redis_lost_come_back_from_the_bucket(bucket_service):
    service = bucket_service
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        dataset = upload_dataset(service, client, "kept")
        service.start_worker("keeper")
        response = client.post("/train", json={"dataset_id": dataset["id"], **JOB, "epochs": 1})
        done = wait_for_job(client, response.json()["id"], ENDED, timeout=120)
        assert done["status"] == "succeeded", done

        service.store.redis.flushall()  # every record gone; the worker's reaper rebuilds from the bucket
        wait_until(lambda: client.get(f"/jobs/{done['id']}").status_code == 200, 30, "the job rebuilt")
        assert client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded"
        assert client.get(f"/datasets/{dataset['id']}").status_code == 200
        assert epochs(client, done["id"]) == [1]


def test_a_job_whose_bucket_stays_away_fails_after_its_storage_pauses_saying_so(bucket_service):
    service = bucket_service
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        dataset = upload_dataset(service, client, "unreached")
        away = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "SSD_MAX_STORAGE_PAUSES": "1"}  # nothing listens there
        service.start_worker("cut-off", **away)
        response = client.post("/train", json={"dataset_id": dataset["id"], **JOB, "epochs": 1})
        done = wait_for_job(client, response.json()["id"], ENDED, timeout=120)
        assert done["status"] == "failed" and done["storage_pauses"] == 2, done  # put back once, then failed
        assert f"s3://{BUCKET}/{PREFIX}/" in done["error"] and "SSD_MAX_STORAGE_PAUSES is 1" in done["error"], done


def test_jobs_that_start_while_the_bucket_is_away_wait_for_it(bucket_service):
    """The worker's link to the bucket goes down before two jobs start (MinIO restarting, say): each is
    put back, sent again later, and trains once the bucket is back, instead of failing for good."""
    service = bucket_service
    proxy = CuttableProxy(int(service.s3.endpoint.rsplit(":", 1)[1]))
    try:
        with httpx.Client(base_url=service.base_url, timeout=60) as client:
            dataset = upload_dataset(service, client, "outage")
            # However long the outage lasts on a busy machine, this test is not about the bound.
            service.start_worker("patient", AWS_ENDPOINT_URL=proxy.http_url, SSD_MAX_STORAGE_PAUSES="100")
            proxy.cut()
            jobs = [client.post("/train", json={"dataset_id": dataset["id"], **JOB, "epochs": 1}).json() for _ in "ab"]

            def put_back_or_ended() -> list[dict] | None:
                found = [client.get(f"/jobs/{job['id']}").json() for job in jobs]
                ended = any(job["status"] in ENDED for job in found)
                return found if ended or all(job.get("storage_pauses", 0) >= 1 for job in found) else None

            found = wait_until(put_back_or_ended, 90, "both jobs to be put back", interval=0.2)
            assert [job["status"] for job in found] == ["queued", "queued"], found
            proxy.restore()
            done = [wait_for_job(client, job["id"], ENDED, timeout=120) for job in jobs]
        assert [job["status"] for job in done] == ["succeeded", "succeeded"], done
        assert all(job["crashes"] == 0 and "could not reach" in job["restart_reason"] for job in done), done
    finally:
        proxy.close()


def test_an_api_that_cannot_reach_the_bucket_says_so(service, log_dir):
    away = {**service.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    with api_process(away, log_dir, name="bucket-api-away") as base_url, httpx.Client(base_url=base_url) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and f"s3://{BUCKET}/{PREFIX}/" in ready.json()["storage"], ready.text
        made = client.post("/datasets/synthetic", json={"num_images": 4})
        assert made.status_code == 503 and "s3://" in made.json()["detail"], made.text


def _cache_bytes(data_dir: Path) -> dict[str, int]:
    """The cache's entries (named by a hash of their key) and the bytes of each."""
    entries = {}
    for entry in (data_dir / "cache").iterdir():
        if "." not in entry.name:  # not a temporary, nor an entry's .size, .lock or .fill
            files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
            entries[entry.name] = sum(p.stat().st_size for p in files)
    return entries


def test_the_api_cache_keeps_to_its_bound_and_forgets_deleted_datasets(service, log_dir):
    folder = service.folder / "bounded"
    shapes(folder / "images", num_images=16, seed=3)
    archive = zip_folder(folder / "images")
    one = sum(p.stat().st_size for p in (folder / "images").rglob("*") if p.is_file())
    bound = int(2.5 * one)  # two datasets fit, three do not
    data_dir = folder / "api"
    env = {**service.env, "SSD_DATA_DIR": str(data_dir), "SSD_CACHE_BYTES": str(bound)}
    with api_process(env, log_dir, name="bucket-api-bounded") as base_url, httpx.Client(base_url=base_url) as client:
        ids = []
        for n in range(3):
            response = client.post("/datasets", files={"file": (f"d{n}.zip", archive)}, timeout=60)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
            held = _cache_bytes(data_dir)
            assert sum(held.values()) <= bound, (n, held, bound)
        assert client.delete(f"/datasets/{ids[-1]}").status_code == 204
        # Entries are named by a hash of their key: the dataset's archive in the bucket.
        deleted = hashlib.sha256(f"datasets/{ids[-1]}/files.zip".encode()).hexdigest()[:32]
        assert deleted not in _cache_bytes(data_dir)
        assert sum(_cache_bytes(data_dir).values()) <= bound


def test_a_resume_whose_claim_outlasts_the_lease_finishes(bucket_service):
    """The worker that resumes the job reaches the bucket over a link so slow that copying the run's
    files takes longer than the whole lease (3 s): the run renews its lease meanwhile and trains on."""
    service = bucket_service
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        dataset = upload_dataset(service, client, "far")
        leaving = service.start_worker("leaving")
        job = train_into_epoch_two(client, dataset["id"])
        leaving.popen.send_signal(signal.SIGTERM)  # the job pauses with its checkpoints in the bucket
        assert leaving.popen.wait(30) == 0, leaving.tail()
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
        s3 = service.s3.client()
        manifest = json.loads(
            s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/{job['id']}/manifest.json")["Body"].read()
        )
        run_bytes = sum(
            s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["ContentLength"] for key in manifest["files"].values()
        )
        proxy = CuttableProxy(int(service.s3.endpoint.rsplit(":", 1)[1]), bytes_per_second=run_bytes / 5)
        try:
            # No crash is forgiven: a run that lost its lease to its claim would fail the job at once.
            far = service.start_worker("far", AWS_ENDPOINT_URL=proxy.http_url, SSD_MAX_JOB_RESTARTS="0")
            done = wait_for_job(client, job["id"], ENDED, timeout=180)
        finally:
            proxy.close()
        assert done["status"] == "succeeded" and done["crashes"] == 0, (done, far.tail())
        assert epochs(client, job["id"]) == [1, 2, 3]
    claimed = re.search(r"claimed its run files in ([0-9.]+)s", far.log.read_text())
    assert claimed and float(claimed[1]) > 3, far.tail()  # longer than the lease


def test_an_api_killed_while_it_publishes_a_dataset_leaves_nothing_after_its_next_start(service, log_dir):
    """The API is SIGKILLed once the dataset's archive has landed in the bucket and before its record
    was written anywhere: its next start removes both the local folder and the archive."""
    folder = service.folder / "killed"
    shapes(folder / "images", num_images=16, seed=3)
    archive = zip_folder(folder / "images")
    data_dir = folder / "api"
    proxy = CuttableProxy(int(service.s3.endpoint.rsplit(":", 1)[1]))
    port = free_port()
    env = {**service.env, "SSD_DATA_DIR": str(data_dir), "SSD_PORT": str(port), "AWS_ENDPOINT_URL": proxy.http_url}
    api = start_process(f"bucket-api-killed-{port}", [PYTHON, "-m", "app"], env, log_dir)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
        before = set(service.keys("datasets/"))
        proxy.delay = 3.0  # from now on the bucket's answers come late: an upload lands, its answer waits

        def upload() -> None:
            try:
                httpx.post(f"http://127.0.0.1:{port}/datasets", files={"file": ("k.zip", archive)}, timeout=60)
            except httpx.HTTPError:
                pass  # the API dies under it

        threading.Thread(target=upload, daemon=True).start()
        landed = wait_until(lambda: set(service.keys("datasets/")) - before, 60, "the archive in the bucket")
        api.stop(signal.SIGKILL)
    finally:
        api.stop(signal.SIGKILL)
        proxy.close()
    [key] = landed
    dataset_id = key.split("/")[2]
    assert key.endswith("/files.zip") and any(dataset_id in p.name for p in (data_dir / "datasets").iterdir())

    with api_process({**service.env, "SSD_DATA_DIR": str(data_dir)}, log_dir, name="bucket-api-after") as base_url:

        def clean() -> bool:
            left = [p.name for p in (data_dir / "datasets").iterdir() if dataset_id in p.name]
            return not left and not service.keys(f"datasets/{dataset_id}/")

        wait_until(clean, 30, "the next start to settle the interrupted import")
        assert httpx.get(f"{base_url}/datasets/{dataset_id}").status_code == 404
