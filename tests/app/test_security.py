"""API keys on every route (walked from the OpenAPI schema), local mode without keys, request limits, bounds."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
import uuid

import httpx
import pytest

from app.main import create_app
from core.settings import Settings
from core.store import Store
from tests.support.processes import PYTHON, api_process, free_port, start_process, wait_for_http, wait_until
from tests.support.service import DATASET, coco_zip

KEY = "k" * 20
OTHER_KEY = "o" * 24
KNOWN = DATASET.model_copy(update={"id": "0000000000d1"})  # a dataset record with an id of the service's form


@pytest.fixture
def keyed_settings(redis_server, tmp_path) -> Settings:
    prefix = f"keys-{uuid.uuid4().hex[:8]}"
    return Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=prefix, api_key=f"{OTHER_KEY}, {KEY}")


def run_requests(settings: Settings, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """The requests, in order, to one app built in this process with ``settings``."""

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
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
        "description": "One of the keys in SSD_API_KEY.",
    }


def test_without_keys_nothing_is_asked_for(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=f"open-{uuid.uuid4().hex[:8]}")
    assert [r.status_code for r in run_requests(settings, [("GET", "/jobs", {}), ("GET", "/datasets", {})])] == [
        200,
        200,
    ]


@pytest.fixture
def local_settings(redis_server, tmp_path) -> Settings:
    """No API keys: the API answers only for the hosts in ``allowed_hosts`` (the default list)."""
    return Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=f"local-{uuid.uuid4().hex[:8]}")


def _host(host: str) -> dict:
    return {"headers": {"Host": host}}


def test_without_keys_only_this_machines_names_are_answered(local_settings):
    local = ["localhost:8000", "127.0.0.1:1234", "[::1]:8000", "localhost", "LocalHost:80"]
    # evil.example and the rest are names a web page can point at 127.0.0.1 (DNS rebinding).
    foreign = ["evil.example", "evil.example:8000", "localhost.evil.example:8000", "127.0.0.1.nip.io", "[::2]:8000"]
    requests = [("GET", "/jobs", _host(host)) for host in local + foreign]
    requests += [("GET", "/", _host("evil.example")), ("GET", "/healthz", _host("evil.example:8000"))]
    requests += [("GET", "/jobs", _host("evil.example@localhost")), ("GET", "/jobs", _host("::1"))]
    answers = run_requests(local_settings, requests)
    statuses = [r.status_code for r in answers]
    assert statuses == [200] * len(local) + [403] * len(foreign) + [403, 200, 400, 400], statuses
    detail = answers[len(local)].json()["detail"]
    assert "'evil.example'" in detail and "SSD_ALLOWED_HOSTS" in detail and "SSD_API_KEY" in detail, detail
    assert "localhost, 127.0.0.1, [::1]" in detail  # what is allowed, in the setting's order


def test_the_allowed_hosts_come_from_the_setting(local_settings):
    settings = local_settings.model_copy(update={"allowed_hosts": "gpu-box.lan, [FD00::1]"})
    hosts = ["gpu-box.lan:8000", "GPU-BOX.LAN", "[fd00::1]:8000", "localhost:8000", "127.0.0.1:8000"]
    answers = run_requests(settings, [("GET", "/jobs", _host(host)) for host in hosts])
    assert [r.status_code for r in answers] == [200, 200, 200, 403, 403]


@pytest.mark.parametrize("hosts", ["", "http://localhost", "localhost:8000", "::1", "*.example", "a,,b"])
def test_allowed_hosts_that_no_host_header_could_match_are_refused(hosts):
    with pytest.raises(ValueError, match="allowed_hosts"):
        Settings(allowed_hosts=hosts)


def _cross_site(origin: str | None, site: str | None, host: str = "127.0.0.1:8000") -> dict:
    headers = {"Host": host}
    headers.update({"Origin": origin} if origin else {})
    headers.update({"Sec-Fetch-Site": site} if site else {})
    return headers


# What browsers send with a page's requests to 127.0.0.1:8000 that is not the server's own page.
CROSS_SITE = [
    _cross_site("http://evil.example", "cross-site"),  # a form on another site
    _cross_site("http://evil.example", None),  # the same, from a browser without Sec-Fetch-* headers
    _cross_site(None, "cross-site"),  # no Origin (some navigations), still marked cross-site
    _cross_site("http://localhost:3000", "same-site"),  # another program's page on this machine
    _cross_site("http://127.0.0.1:3000", "same-origin"),  # Origin names another port than Host
    _cross_site("null", "cross-site"),  # a sandboxed frame or a local file
]


def test_cross_site_posts_are_refused_before_anything_is_created(local_settings, tmp_path_factory):
    store = Store.from_url(local_settings.redis_url, local_settings.key_prefix)
    store.put_dataset(KNOWN)
    # Each request would succeed from curl: a valid archive, a known dataset, a deletable one.
    archive = {"file": ("shapes.zip", coco_zip(tmp_path_factory.mktemp("coco"), 2), "application/zip")}
    requests = []
    for headers in CROSS_SITE:
        requests.append(("POST", "/datasets", {"headers": headers, "files": archive, "data": {"name": "x"}}))
        requests.append(("POST", "/datasets/synthetic", {"headers": headers, "json": {"num_images": 1}}))
        requests.append(("POST", "/train", {"headers": headers, "json": {"dataset_id": KNOWN.id, "epochs": 1}}))
        requests.append(("DELETE", f"/datasets/{KNOWN.id}", {"headers": headers}))
    requests += [("GET", "/datasets", {}), ("GET", "/jobs", {})]
    answers = run_requests(local_settings, requests)
    for (method, path, kwargs), answer in zip(requests[:-2], answers, strict=False):
        assert answer.status_code == 403, (method, path, kwargs["headers"], answer.text)
        assert "curl" in answer.json()["detail"] and method in answer.json()["detail"]
    assert "'http://evil.example'" in answers[0].json()["detail"]
    assert [d["id"] for d in answers[-2].json()] == [KNOWN.id] and answers[-1].json() == []  # nothing made or queued
    assert not local_settings.datasets_dir.exists()  # no upload was even spooled to disk
    store.redis.close()


def test_same_origin_and_curl_posts_are_accepted(local_settings):
    synthetic = {"json": {"num_images": 1, "seed": 0}}
    own_page = _cross_site("http://localhost:8000", "same-origin", host="localhost:8000")
    typed = _cross_site(None, "none", host="[::1]:8000")  # the user's own action: Sec-Fetch-Site none
    curl = {"Host": "127.0.0.1:8000", "User-Agent": "curl/8.5.0"}  # no Origin, no Sec-Fetch-Site
    requests = [
        ("POST", "/datasets/synthetic", {"headers": headers, **synthetic}) for headers in (own_page, typed, curl)
    ]
    requests.append(("GET", "/jobs", {"headers": _cross_site("http://evil.example", "cross-site")}))  # reads nothing
    answers = run_requests(local_settings, requests)
    assert [r.status_code for r in answers] == [201, 201, 201, 200], [r.text for r in answers]


def test_with_keys_any_host_and_page_is_answered_for_the_key(keyed_settings):
    cross_site = {"Host": "evil.example:8000", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    answers = run_requests(
        keyed_settings,
        [
            ("GET", "/jobs", _host("evil.example")),
            ("GET", "/jobs", {"headers": {"Host": "evil.example", "X-API-Key": KEY}}),
            ("POST", "/datasets/synthetic", {"headers": cross_site, "json": {"num_images": 1, "seed": 0}}),
        ],
    )
    assert [r.status_code for r in answers] == [401, 200, 401]  # the key is checked, not the host
    assert "X-API-Key" in answers[0].json()["detail"]


def test_a_real_server_without_keys_refuses_other_sites(api, client, tmp_path):
    """The session's keyless uvicorn: Host and cross-site refusals, the page's own posts, Docker's probe."""
    assert client.get("/jobs", headers={"Host": "evil.example:8000"}).status_code == 403
    archive = coco_zip(tmp_path / "coco", num_images=2, seed=3)
    files = {"file": ("coco.zip", archive, "application/zip")}
    evil = _cross_site("http://evil.example", "cross-site", host=api.removeprefix("http://"))
    refused = client.post("/datasets", files=files, data={"name": "from-evil"}, headers=evil)
    assert refused.status_code == 403 and "evil.example" in refused.json()["detail"], refused.text
    own = _cross_site(api, "same-origin", host=api.removeprefix("http://"))
    created = client.post("/datasets", files=files, data={"name": "from-the-page"}, headers=own)
    assert created.status_code == 201, created.text
    names = [d["name"] for d in client.get("/datasets").json()]
    assert "from-the-page" in names and "from-evil" not in names
    assert client.delete(f"/datasets/{created.json()['id']}").status_code == 204  # a bare curl-like DELETE
    # docker-compose.yml's healthcheck, as it runs inside the container.
    with urllib.request.urlopen(f"{api}/healthz", timeout=10) as answer:
        assert answer.status == 200


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
    prefix = f"full-{uuid.uuid4().hex[:8]}"  # a queue no worker reads
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix=prefix, max_queued_jobs=2)
    store = Store.from_url(redis_server.url, prefix)
    store.put_dataset(KNOWN)
    train = ("POST", "/train", {"json": {"dataset_id": KNOWN.id, "epochs": 1}})
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


def _headers_only(
    base_url: str, method: str, path: str, content_type: str, length: int, extra: str = ""
) -> tuple[socket.socket, bytes]:
    """Send a request's headers (``extra``: more header lines), announcing a body of ``length`` bytes,
    and none of the body; the open socket and what the server answered within 10 s (b"" if nothing)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
    sock.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode())
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        pass
    return sock, answer


def _length(answer: bytes) -> int:
    found = re.search(rb"content-length: *([0-9]+)", answer.lower())
    return int(found[1]) if found else 0


def test_with_keys_a_request_without_one_is_answered_after_its_headers_alone(env, log_dir, tmp_path):
    """Keyless uploads never take an import slot nor send a byte of their bodies to the server's disk."""
    prefix = f"early-{uuid.uuid4().hex[:8]}"
    settings = {"SSD_API_KEY": KEY, "SSD_IMPORT_SLOTS": "1", "SSD_KEY_PREFIX": prefix, "SSD_DATA_DIR": str(tmp_path)}
    with api_process(env, log_dir, "api-early-keys", **settings) as base_url:
        multipart = "multipart/form-data; boundary=never-sent"
        held = []
        for method, path, content_type, length in [
            ("POST", "/datasets", multipart, 2_000_000),
            ("POST", "/datasets", multipart, 2_000_000),
            ("POST", "/detect", multipart, 1_000_000),
            ("POST", "/detect/batch", multipart, 2_000_000),
            ("POST", "/train", "application/json", 100),
        ]:
            sock, answer = _headers_only(base_url, method, path, content_type, length)
            held.append(sock)
            assert answer.startswith(b"HTTP/1.1 401"), (method, path, answer[:200])
            assert b"X-API-Key" in answer and b"www-authenticate: apikey" in answer.lower(), answer
        # The keyless uploads hold no import slot: a client with the key is served at once.
        made = httpx.post(
            f"{base_url}/datasets/synthetic", json={"num_images": 1}, headers={"X-API-Key": KEY}, timeout=30
        )
        assert made.status_code == 201, made.text
        stream = httpx.get(f"{base_url}/jobs/0123456789ab/losses/stream?api_key={KEY}", timeout=10)
        assert stream.status_code == 404  # the stream's key may still come in the query
        for sock in held:
            sock.close()


def test_without_keys_a_cross_site_upload_is_refused_after_its_headers_alone(env, log_dir, tmp_path):
    """The Host and Origin rules, like the key, come before the body and the import slot."""
    prefix = f"early-local-{uuid.uuid4().hex[:8]}"
    settings = {"SSD_IMPORT_SLOTS": "1", "SSD_KEY_PREFIX": prefix, "SSD_DATA_DIR": str(tmp_path)}
    with api_process(env, log_dir, "api-early-local", **settings) as base_url:
        multipart = "multipart/form-data; boundary=never-sent"
        held = []
        for extra in (
            "Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n",
            "X-Forwarded-Host: evil.example\r\nOrigin: null\r\n",
        ):
            sock, answer = _headers_only(base_url, "POST", "/datasets", multipart, 2_000_000, extra)
            held.append(sock)
            assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
        made = httpx.post(f"{base_url}/datasets/synthetic", json={"num_images": 1}, timeout=30)
        assert made.status_code == 201, made.text  # no slot was taken
        for sock in held:
            sock.close()
