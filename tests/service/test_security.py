"""API keys on every route (walked from the OpenAPI schema), request limits, bounded parameters."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from app.main import create_app
from tests.service.conftest import PYTHON, free_port, start_process, wait_for_http, wait_until
from worker.settings import Settings

KEY = "k" * 20
OTHER_KEY = "o" * 24


@pytest.fixture
def keyed_settings(redis_server, tmp_path) -> Settings:
    prefix = f"keys-{uuid.uuid4().hex[:8]}"
    return Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=prefix, api_key=f"{OTHER_KEY}, {KEY}")


def run_requests(settings: Settings, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """The requests, in order, to one app built in this process with ``settings``."""

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]

    return asyncio.run(send())


def _operations(settings: Settings) -> list[tuple[str, str]]:
    schema = run_requests(settings, [("GET", "/openapi.json", {})])[0].json()
    operations = []
    for path, methods in schema["paths"].items():
        for method in methods:
            operations.append((method.upper(), path.replace("{job_id}", "nope").replace("{dataset_id}", "nope")))
    return operations


def test_every_route_but_health_needs_a_key(keyed_settings):
    operations = _operations(keyed_settings)
    assert len(operations) >= 14 and ("GET", "/healthz") in operations
    protected = [op for op in operations if op != ("GET", "/healthz")]
    requests = []
    for method, path in protected:
        requests.append((method, path, {}))
        requests.append((method, path, {"headers": {"X-API-Key": "wrong-" + KEY}}))
        requests.append((method, path, {"headers": {"X-API-Key": KEY}}))
        requests.append((method, path, {"headers": {"X-API-Key": OTHER_KEY}}))
    answers = run_requests(keyed_settings, requests)
    for index, (method, path) in enumerate(protected):
        missing, wrong, right, other = answers[4 * index : 4 * index + 4]
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"], (method, path, missing.text)
        assert wrong.status_code == 401 and missing.headers["www-authenticate"] == "ApiKey", (method, path)
        for response in (right, other):  # the key opens the route: what follows is the route's own answer
            assert response.status_code not in (401, 403) and response.status_code < 500, (method, path, response.text)


def test_open_routes_and_the_stream_key_in_the_query(keyed_settings):
    answers = run_requests(
        keyed_settings,
        [
            ("GET", "/healthz", {}),
            ("GET", "/", {}),
            ("GET", "/static/style.css", {}),
            ("GET", "/docs", {}),
            ("GET", "/openapi.json", {}),
            ("GET", f"/jobs/nope/losses/stream?api_key={KEY}", {}),
            ("GET", "/jobs/nope/losses/stream?api_key=wrong", {}),
            ("GET", f"/jobs/nope?api_key={KEY}", {}),  # only the stream takes the query parameter
        ],
    )
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 404, 401, 401]
    schema = answers[4].json()
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "One of the keys in SSD_API_KEY (when it is set).",
    }


def test_without_keys_nothing_is_asked_for(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=f"open-{uuid.uuid4().hex[:8]}")
    assert [r.status_code for r in run_requests(settings, [("GET", "/jobs", {}), ("GET", "/datasets", {})])] == [
        200,
        200,
    ]


@pytest.mark.parametrize("keys", ["short", "a" * 20 + ",tiny"])
def test_weak_keys_are_refused(keys):
    with pytest.raises(ValueError, match="16 characters"):
        Settings(api_key=keys)


def test_json_bodies_are_limited_too(client):
    huge = {"dataset_id": "x" * 1_100_000}
    response = client.post("/train", json=huge)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():
        yield b'{"num_images": 1, "name": "'
        for _ in range(20):
            yield b"x" * 100_000  # no Content-Length: counted as it arrives
        yield b'"}'

    response = client.post("/datasets/synthetic", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_stream_positions_are_bounded(trained, client, api):
    job_id = trained["job"]["id"]
    assert client.get(f"/jobs/{job_id}/losses", params={"after": 2**60}).status_code == 422
    assert client.get(f"/jobs/{job_id}/losses/stream", params={"after": 2**60}).status_code == 422
    with httpx.stream("GET", f"{api}/jobs/{job_id}/losses/stream", headers={"Last-Event-ID": "9" * 80}) as stream:
        assert stream.status_code == 200
        body = stream.read().decode()
    assert "event: status" in body and "event: epoch" not in body


def test_cancelling_an_ended_job_answers_202_with_its_record(trained, client):
    job = trained["job"]
    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "succeeded" and response.json()["finished_at"] == job["finished_at"]


def test_past_the_queue_limit_train_answers_429(redis_server, tmp_path):
    from worker.records import DatasetRecord
    from worker.store import Store

    prefix = f"full-{uuid.uuid4().hex[:8]}"  # a queue no worker reads
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=prefix, max_queued_jobs=2)
    store = Store.from_url(redis_server.url, prefix)
    store.put_dataset(
        DatasetRecord(id="d1", name="x", format="coco", num_images=1, num_boxes=1, classes=["a"], root="files")
    )
    train = ("POST", "/train", {"json": {"dataset_id": "d1", "epochs": 1}})
    answers = run_requests(settings, [train, train, train])
    assert [r.status_code for r in answers] == [202, 202, 429], answers[-1].text
    assert "2 jobs are waiting" in answers[2].json()["detail"] and answers[2].headers["retry-after"] == "60"
    assert store.get_job(answers[0].json()["id"]).dispatch_id  # its message is on its way
    store.request_cancel(answers[0].json()["id"])  # a cancelled job leaves the queue: room for one more
    assert run_requests(settings, [train])[0].status_code == 202
    store.redis.close()


def test_a_key_in_the_query_is_masked_in_the_access_log(env, log_dir):
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = start_process(f"api-keys-{port}", args, {**env, "SSD_API_KEY": KEY}, log_dir)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        for query in (f"after=1&api_key={KEY}", f"api%5Fkey={KEY}"):
            answer = httpx.get(f"http://127.0.0.1:{port}/jobs/nope/losses/stream?{query}", timeout=10)
            # The key was accepted: what is missing is the job (a wrong key would give 401).
            assert answer.status_code == 404 and "nope" in answer.json()["detail"], answer.text
        wait_until(lambda: "api%5Fkey=" in process.log.read_text(), 10, "the access log lines")
    finally:
        process.stop()
    log = process.log.read_text()
    assert "/jobs/nope/losses/stream?after=1&api_key=*** HTTP/1.1" in log and KEY not in log
    assert "/jobs/nope/losses/stream?api%5Fkey=*** HTTP/1.1" in log
