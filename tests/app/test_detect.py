"""POST /detect's bad inputs, image handling and batching; the operations endpoints."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image, ImageOps

from app.inference import load_detector
from app.main import create_app
from core.settings import Settings
from tests.support.processes import api_process, free_port, service_env, wait_until
from tests.support.service import image_bytes


def in_process(settings: Settings, method: str, path: str, **kwargs) -> httpx.Response:
    """One request to an app built in this process (its own settings), through httpx's ASGI transport."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def post_image(client, content: bytes, filename: str = "image.jpg", **params):
    return client.post("/detect", params=params, files={"file": (filename, content, "application/octet-stream")})


def _truncated_jpeg() -> bytes:
    return image_bytes(400, 300)[:2000]


def _huge_png_header(width: int = 10_000, height: int = 10_000) -> bytes:
    """A small PNG whose header claims 100 megapixels (it is refused before any pixel is decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)  # far fewer than the header claims: never read
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _mpo() -> bytes:
    """A two-picture MPO (what phones save as .jpg): Pillow calls it MPO, it is a JPEG."""
    first, second = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (96, 64), (30, 30, 200))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """A 200x100 JPEG whose EXIF says: rotate 90 degrees to display (so it shows as 100x200).

    A white square in one corner makes the frame matter: turned, it lies in another corner.
    """
    image = Image.new("RGB", (200, 100), (200, 30, 30))
    image.paste((255, 255, 255), (10, 10, 70, 70))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b"just some text, not an image", 415, ["not an image"]),
        (image_bytes(64, 64, "GIF"), 415, ["GIF images are not accepted"]),
        (image_bytes(64, 64, "TIFF"), 415, ["TIFF images are not accepted"]),
        (_truncated_jpeg(), 400, ["truncated"]),
        (image_bytes(2100, 2000, "PNG"), 413, ["pixels", "limit"]),
        (_huge_png_header(), 413, ["pixels"]),
        (bytes(2_200_000), 413, ["limit"]),
    ],
    ids=["text-named-jpg", "gif", "tiff", "truncated-jpeg", "too-many-pixels", "100-megapixels", "too-many-bytes"],
)
def test_bad_images(trained, client, settings, content, status, words):
    before = sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*"))
    response = post_image(client, content, job_id=trained["job"]["id"])
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["detail"]
    assert sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*")) == before


def test_decompression_bomb_warning_is_an_error(trained, client, monkeypatch):
    # Pillow's own bomb check: over Image.MAX_IMAGE_PIXELS it warns; the API makes that a 413.
    from app.inference import ImageRejected, decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected) as caught:
        decode_image(image_bytes(40, 30, "PNG"), max_pixels=10**9)
    assert caught.value.status_code == 413


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_png_webp_and_bmp_are_accepted(trained, client, fmt):
    response = post_image(client, image_bytes(120, 90, fmt), f"x.{fmt.lower()}", job_id=trained["job"]["id"])
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 120, "height": 90}


@pytest.mark.parametrize("fmt", ["json", "png"])
def test_server_timing_says_where_the_time_went(trained, client, fmt):
    response = post_image(client, image_bytes(120, 90), "x.jpg", job_id=trained["job"]["id"], format=fmt)
    assert response.status_code == 200, response.text
    phases = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
    expected = ["decode", "detect", "draw", "total"] if fmt == "png" else ["decode", "detect", "total"]
    assert list(phases) == expected
    durations = {name: float(ms) for name, ms in phases.items()}
    assert all(ms >= 0 for ms in durations.values())
    assert durations["total"] >= sum(ms for name, ms in durations.items() if name != "total")


def test_mpo_jpegs_are_accepted(trained, client):
    response = post_image(client, _mpo(), "phone.jpg", job_id=trained["job"]["id"])
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 96, "height": 64}


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        ("application/json, image/png;q=0.1", False),
        ("image/png, application/json;q=0.5", True),
        ("image/*", True),
        ("*/*", False),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
    ],
)
def test_accept_header_is_parsed_with_its_qualities(trained, client, accept, png):
    response = client.post(
        "/detect",
        params={"job_id": trained["job"]["id"]},
        files={"file": ("a.png", image_bytes(64, 48, "PNG"))},
        headers={"Accept": accept},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == ("image/png" if png else "application/json")


def test_a_gpu_that_is_not_there_is_named(trained, settings):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    on_cuda = settings.model_copy(update={"device": "cuda"})
    image = {"file": ("a.png", image_bytes(64, 48, "PNG"))}
    response = in_process(on_cuda, "POST", "/detect", params={"job_id": trained["job"]["id"]}, files=image)
    assert response.status_code == 503 and "SSD_DEVICE" in response.json()["detail"], response.text


def _same_detections(first: list[dict], second: list[dict]) -> bool:
    """The same labels, scores (to 1e-4) and boxes (to 0.01 px) in the same order."""
    return len(first) == len(second) and all(
        a["label"] == b["label"]
        and abs(a["score"] - b["score"]) < 1e-4
        and all(abs(u - v) < 1e-2 for u, v in zip(a["box"], b["box"], strict=True))
        for a, b in zip(first, second, strict=True)
    )


def test_exif_orientation_is_applied_as_ssd_detect_applies_it(trained, client, settings, tmp_path, capsys):
    """A phone photo stored 200x100 and shown 100x200: /detect answers in the displayed frame, with the
    boxes ``ssd detect`` finds in the same file, and those it finds in the already-turned pixels."""
    from core.layout import BEST_CHECKPOINT
    from model.cli import main

    job_id = trained["job"]["id"]
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(_exif_rotated_jpeg())
    upright = io.BytesIO()
    ImageOps.exif_transpose(Image.open(photo)).save(upright, format="PNG")  # the same pixels, no EXIF
    query = {"job_id": job_id, "score_threshold": 0.01, "max_detections": 10}

    served = post_image(client, photo.read_bytes(), **query)
    assert served.status_code == 200, served.text
    served = served.json()
    assert served["image"] == {"width": 100, "height": 200}
    assert served["detections"], "the comparison needs detections"
    turned = post_image(client, upright.getvalue(), "upright.png", **query).json()
    assert _same_detections(served["detections"], turned["detections"])

    checkpoint = settings.layout.run_dir(job_id) / BEST_CHECKPOINT
    args = ["detect", str(checkpoint), str(photo), "--score-threshold", "0.01", "--max-detections", "10"]
    assert main([*args, "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)[str(photo)]
    assert cli["image"] == served["image"]
    assert _same_detections(cli["detections"], served["detections"])


def post_batch(client, uploads: list[tuple[str, bytes]], **params) -> httpx.Response:
    files = [("files", (name, content, "application/octet-stream")) for name, content in uploads]
    return client.post("/detect/batch", params=params, files=files)


def test_a_batch_answers_each_image_as_detect_does_in_the_order_sent(trained, client):
    query = {"job_id": trained["job"]["id"], "score_threshold": 0.01, "max_detections": 10}
    uploads = [
        ("wide.jpg", image_bytes(160, 120)),
        ("small.png", image_bytes(120, 90, "PNG")),
        ("phone.jpg", _exif_rotated_jpeg()),
        ("wide-again.jpg", image_bytes(160, 120)),
    ]
    response = post_batch(client, uploads, **query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == trained["job"]["id"]
    assert [r["file"] for r in body["results"]] == [name for name, _ in uploads]
    assert [r["image"] for r in body["results"]] == [
        {"width": 160, "height": 120},
        {"width": 120, "height": 90},
        {"width": 100, "height": 200},
        {"width": 160, "height": 120},
    ]
    for (name, content), result in zip(uploads, body["results"], strict=True):
        alone = post_image(client, content, name, **query).json()
        assert result["detections"], "the comparison needs detections"
        assert _same_detections(result["detections"], alone["detections"]), name
    phases = [part.split(";dur=")[0] for part in response.headers["Server-Timing"].split(", ")]
    assert phases == ["decode", "detect", "total"]


def test_a_refused_image_fails_its_batch_naming_the_first_one(trained, client, settings):
    job_id, good = trained["job"]["id"], ("good.jpg", image_bytes(64, 64))
    before = sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*"))
    cases = [
        ([good, ("notes.txt", b"not an image"), ("anim.gif", image_bytes(64, 64, "GIF"))], 415, "notes.txt"),
        ([good, ("cut.jpg", _truncated_jpeg())], 400, "cut.jpg: "),
        ([("huge.png", _huge_png_header()), good], 413, "huge.png: "),
        ([good] * 7, 422, "7 images in one request; the limit is 6"),
        ([good, ("big.bin", bytes(2_200_000)), ("big2.bin", bytes(900_000))], 413, "limit"),
    ]
    for uploads, status, words in cases:
        response = post_batch(client, uploads, job_id=job_id)
        assert response.status_code == status, (words, response.text)
        detail = response.json()["detail"]
        assert words in (detail if status != 422 else detail[0]["msg"]), response.text
    assert client.post("/detect/batch", params={"job_id": job_id}).status_code == 422
    document = client.get("/openapi.json").json()["components"]["schemas"]
    assert document["Body_detect_batch"]["properties"]["files"]["maxItems"] == 6
    assert post_batch(client, [good], job_id="no-such-job").status_code == 404
    assert sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*")) == before


def test_bad_detect_parameters(trained, client):
    job_id = trained["job"]["id"]
    assert post_image(client, image_bytes(64, 64), job_id="no-such-job").status_code == 404
    assert post_image(client, image_bytes(64, 64), job_id=job_id, score_threshold=2).status_code == 422
    assert post_image(client, image_bytes(64, 64), job_id=job_id, max_detections=0).status_code == 422
    assert post_image(client, image_bytes(64, 64), job_id=job_id, format="gif").status_code == 422
    assert client.post("/detect", params={"job_id": job_id}).status_code == 422


def test_no_trained_model_answers_409(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix="no-models-yet", device="cpu")
    response = in_process(settings, "POST", "/detect", files={"file": ("a.jpg", image_bytes(64, 64))})
    assert response.status_code == 409
    assert "no trained model yet" in response.json()["detail"]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_concurrent_requests_share_forward_passes(trained, client):
    before = client.get("/metrics").text
    content, job_id, answers = image_bytes(160, 120), trained["job"]["id"], []

    def one() -> None:
        answers.append(post_image(client, content, job_id=job_id, score_threshold=0.0).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = client.get("/metrics").text
    assert answers == [200] * 8
    images = _metric(after, "ssd_detect_batch_size_sum") - _metric(before, "ssd_detect_batch_size_sum")
    batches = _metric(after, "ssd_detect_batch_size_count") - _metric(before, "ssd_detect_batch_size_count")
    assert images == 8 and batches < 8, (images, batches)


def test_operations_endpoints(trained, client, worker):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"
    assert any("test-worker" in w["name"] for w in ready.json()["workers"])
    metrics = client.get("/metrics").text
    assert 'ssd_jobs{status="succeeded"}' in metrics
    assert re.search(r'ssd_http_requests_total\{method="POST",route="/detect",status="200"\} [1-9]', metrics)
    assert 'ssd_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/jobs/{job_id}"}' in metrics
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    expected = {
        "/datasets",
        "/datasets/synthetic",
        "/datasets/{dataset_id}",
        "/train",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/losses",
        "/jobs/{job_id}/losses/stream",
        "/jobs/{job_id}/losses.png",
        "/detect",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert expected <= set(schema["paths"])
    assert schema["components"]["schemas"]["TrainRequest"]["examples"]


def test_made_up_methods_share_one_metrics_label(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, key_prefix="made-up-methods", device="cpu")

    async def requests() -> tuple[list[int], str]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            sent = [await client.request(method, "/healthz") for method in ("BREW", "X-ANYTHING-12345")]
            return [r.status_code for r in sent], (await client.get("/metrics")).text

    statuses, metrics = asyncio.run(requests())
    assert statuses == [405, 405]
    assert re.search(r'^ssd_http_requests_total\{method="other",route="/healthz",status="405"\} 2\.0$', metrics, re.M)
    assert 'method="BREW"' not in metrics and "X-ANYTHING" not in metrics


def test_readyz_answers_503_when_redis_is_unreachable(tmp_path):

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path)
    assert in_process(settings, "GET", "/healthz").status_code == 200
    ready = in_process(settings, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    jobs = in_process(settings, "GET", "/jobs")
    assert jobs.status_code == 503 and "Redis" in jobs.json()["detail"]


def test_a_detection_that_takes_too_long_answers_503(trained, settings):
    hurried = settings.model_copy(update={"detect_timeout_seconds": 0.001})  # less than loading the model
    image = {"file": ("a.png", image_bytes(64, 48, "PNG"))}
    response = in_process(hurried, "POST", "/detect", params={"job_id": trained["job"]["id"]}, files=image)
    assert response.status_code == 503 and "took longer" in response.json()["detail"], response.text
    assert response.headers["retry-after"] == "5"


@pytest.fixture(scope="module")
def capped_api(trained, redis_server, data_dir, log_dir) -> Iterator[str]:
    """An API of its own (the same Redis and models) that admits 2 detections at once; each waits up to
    1 s for a batch to fill, so the first two stay admitted while more arrive."""
    env = service_env(redis_server.url, data_dir)
    limits = {"SSD_MAX_PENDING_DETECTIONS": "2", "SSD_DETECT_BATCH_SIZE": "256", "SSD_DETECT_BATCH_WAIT_MS": "1000"}
    with api_process(env, log_dir, "capped-api", **limits) as base_url:
        yield base_url


def _pending(client: httpx.Client) -> float:
    return _metric(client.get("/metrics").text, "ssd_detect_pending")


def _in_threads(count: int, send) -> tuple[list[threading.Thread], list]:
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(send())) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


def test_detections_past_the_cap_answer_503_with_retry_after(trained, capped_api):
    job_id, content = trained["job"]["id"], image_bytes(160, 120)
    with httpx.Client(base_url=capped_api, timeout=60) as client:
        held_threads, held = _in_threads(2, lambda: post_image(client, content, job_id=job_id))
        wait_until(lambda: _pending(client) == 2, 30, "two admitted detections")
        burst_threads, burst = _in_threads(6, lambda: post_image(client, content, job_id=job_id))
        for thread in held_threads + burst_threads:
            thread.join()
        assert [r.status_code for r in held] == [200, 200], [r.text for r in held]
        statuses = sorted(r.status_code for r in burst)
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        for refused in (r for r in burst if r.status_code == 503):
            assert refused.headers["retry-after"] == "2"
            assert "2 detections are already waiting or running" in refused.json()["detail"]
        wait_until(lambda: _pending(client) == 0, 30, "every admission to be given back")
        assert post_image(client, content, job_id=job_id).status_code == 200


def test_a_batch_may_send_at_most_half_the_detections_admitted_at_once(trained, capped_api):
    job_id, content = trained["job"]["id"], image_bytes(160, 120)
    with httpx.Client(base_url=capped_api, timeout=60) as client:  # 2 admitted at once: batches of 1
        too_many = post_batch(client, [("a.jpg", content)] * 2, job_id=job_id)
        assert too_many.status_code == 422 and "the limit is 1" in too_many.json()["detail"][0]["msg"]
        assert post_batch(client, [("a.jpg", content)], job_id=job_id).status_code == 200
        document = client.get("/openapi.json").json()["components"]["schemas"]
        assert document["Body_detect_batch"]["properties"]["files"]["maxItems"] == 1


def test_a_batch_takes_a_place_per_image_all_or_none():
    from app.inference import DetectionsBusy, DetectionService

    service = DetectionService(
        load=lambda path: None, cache_size=1, threads=1, max_batch=8, max_wait_ms=1, max_pending=4, image_threads=1
    )
    try:
        with service.admit(3):
            assert service.pending == 3
            with pytest.raises(DetectionsBusy, match="this request's 2 images do not fit: 3 of the 4"):
                service.admit(2)
            assert service.pending == 3  # a refusal takes nothing
            with service.admit(1):
                assert service.pending == 4
        assert service.pending == 0
        with pytest.raises(RuntimeError), service.admit(4):  # an error inside gives the places back too
            raise RuntimeError("the request failed")
        assert service.pending == 0
    finally:
        service.close()


def _send_without_reading(base_url: str, request: httpx.Request) -> socket.socket:
    """Sends ``request`` over a socket of its own and returns the socket, the answer unread."""
    url = httpx.URL(base_url)
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in request.headers.items()) + "\r\n"
    sock = socket.create_connection((url.host, url.port))
    sock.sendall(head.encode() + request.read())
    return sock


def test_errors_and_disconnects_give_their_admission_back(trained, capped_api, settings):
    job_id, content = trained["job"]["id"], image_bytes(160, 120)
    too_many_pixels, too_many_bytes = image_bytes(2100, 2000, "PNG"), bytes(settings.max_image_bytes + 1000)
    with httpx.Client(base_url=capped_api, timeout=60) as client:
        for _ in range(3):  # one round past the cap of 2: a leaked admission would make it answer 503
            assert post_image(client, b"not an image", job_id=job_id).status_code == 415
            assert post_image(client, _truncated_jpeg(), job_id=job_id).status_code == 400
            assert post_image(client, too_many_pixels, job_id=job_id).status_code == 413
            over = post_image(client, too_many_bytes, job_id=job_id)  # within the body limit's slack: the route's
            assert over.status_code == 413 and "the image is" in over.json()["detail"], over.text
            assert post_image(client, content, job_id="no-such-job").status_code == 404
        assert _pending(client) == 0

        request = client.build_request(
            "POST", "/detect", params={"job_id": job_id}, files={"file": ("a.jpg", content, "image/jpeg")}
        )
        hung_up = [_send_without_reading(capped_api, request) for _ in range(2)]
        wait_until(lambda: _pending(client) == 2, 30, "the two requests to be admitted")
        for sock in hung_up:
            sock.close()  # the clients go away while their detections wait for a batch
        wait_until(lambda: _pending(client) == 0, 30, "the disconnected requests' admissions to be given back")
        assert [post_image(client, content, job_id=job_id).status_code for _ in range(3)] == [200, 200, 200]


def test_detection_on_the_cpu_follows_ssd_cpu_precision(overfitted, monkeypatch):
    monkeypatch.setattr("model.device.cpu_has_native_bf16", lambda: True)
    checkpoint = overfitted[0].best_checkpoint
    assert load_detector(checkpoint, "cpu").precision == "bf16"
    assert load_detector(checkpoint, "cpu", cpu_precision="fp32").precision == "fp32"
    monkeypatch.setattr("model.device.cpu_has_native_bf16", lambda: False)
    assert load_detector(checkpoint, "cpu").precision == "fp32"
