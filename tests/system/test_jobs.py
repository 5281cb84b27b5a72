"""Training through the real worker: end to end, SSE, losses, cancel, bad requests."""

from __future__ import annotations

import io
import threading
import time
import uuid
from contextlib import ExitStack

import httpx
import pytest
from PIL import Image

from core.run_files import read_job_file
from tests.support.processes import api_process, wait_until
from tests.support.service import TINY, read_sse, shapes, wait_for_job, zip_folder


def test_coco_and_voc_uploads_agree(trained):
    coco, voc = trained["coco"], trained["voc"]
    assert (coco["format"], voc["format"]) == ("coco", "voc")
    for key in ("num_images", "num_boxes", "classes"):
        assert coco[key] == voc[key]
    assert coco["num_images"] == 8 and coco["num_boxes"] == trained["data"].num_boxes


def test_training_job_end_to_end(trained, client, settings):
    queued, job = trained["queued"], trained["job"]
    assert queued["status"] == "queued" and queued["config"]["epochs"] == 2 and queued["epoch"] == 0
    assert job["status"] == "succeeded", job
    assert job["epoch"] == 2 and job["epochs"] == 2 and job["epochs_completed"] == 2
    assert job["classes"] == ["circle", "square", "triangle"]
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert job["best_val_loss"] is not None and job["has_model"]
    # TINY turns mixed precision off, so the record says float32 whatever this processor has
    # (test_training shows the bf16 rule on a processor that has it).
    assert (job["device"], job["precision"]) == ("cpu", "fp32")
    progress = job["progress"]
    assert progress["steps_per_epoch"] == 2 and progress["epoch"] in (1, 2) and progress["eta_seconds"] >= 0

    losses = client.get(f"/jobs/{job['id']}/losses").json()
    assert losses["job_id"] == job["id"] and losses["status"] == "succeeded"
    assert [r["epoch"] for r in losses["losses"]] == [1, 2]
    for record in losses["losses"]:
        assert record["train_loss"] > 0 and record["val_loss"] is not None and record["seconds"] > 0
    assert [r["epoch"] for r in client.get(f"/jobs/{job['id']}/losses?after=1").json()["losses"]] == [2]
    assert client.get(f"/jobs/{job['id']}/losses?after=2").json()["losses"] == []

    run_dir = settings.runs_dir / job["id"]
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "losses.png"):
        assert (run_dir / name).is_file(), name
    png = client.get(f"/jobs/{job['id']}/losses.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert job["id"] in [j["id"] for j in client.get("/jobs").json()]
    assert job["id"] in [j["id"] for j in client.get("/jobs?status=succeeded").json()]


def test_sse_stream_yields_each_epoch_once_then_the_final_status(trained, api, client):
    events = trained["events"]
    assert [e[0] for e in events] == ["epoch", "epoch", "status"], events
    assert [e[1]["epoch"] for e in events[:2]] == [1, 2]
    assert [e[2] for e in events[:2]] == ["1", "2"]
    assert events[2][1] == client.get(f"/jobs/{trained['job']['id']}").json()  # the job as GET shows it
    assert events[2][1]["status"] == "succeeded" and "lease_token" not in events[2][1]

    # After the job ended: history (after Last-Event-ID), then the status at once.
    replay, done = [], threading.Event()
    read_sse(api, f"/jobs/{trained['job']['id']}/losses/stream", replay, done, headers={"Last-Event-ID": "1"})
    assert [(e[0], e[1].get("epoch")) for e in replay[:1]] == [("epoch", 2)]
    assert replay[-1][0] == "status" and len(replay) == 2


def test_detect_returns_sorted_boxes_inside_the_image(trained, client):
    job = trained["job"]
    image_path = trained["data"].images[0].path
    width, height = Image.open(image_path).size
    with open(image_path, "rb") as file:
        content = file.read()
    response = client.post(
        "/detect",
        params={"job_id": job["id"], "score_threshold": 0.0, "max_detections": 25},
        files={"file": ("shapes.jpg", content, "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == job["id"] and body["image"] == {"width": width, "height": height}
    detections = body["detections"]
    assert 0 < len(detections) <= 25
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, d
        assert d["label"] in job["classes"] and job["classes"][d["class_id"] - 1] == d["label"]

    # The newest succeeded job is the default model.
    default = client.post("/detect", params={"score_threshold": 0.0}, files={"file": ("a.jpg", content)})
    newest = client.get("/jobs?status=succeeded").json()[0]["id"]
    assert default.status_code == 200 and default.json()["job_id"] == newest

    for kwargs in ({"params": {"job_id": job["id"], "format": "png"}}, {"headers": {"Accept": "image/png"}}):
        png = client.post("/detect", files={"file": ("a.jpg", content)}, **kwargs)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (width, height)


def test_cancel_a_queued_and_a_running_job(api, worker, client, tmp_path, settings):
    folder = tmp_path / "data"
    shapes(folder, num_images=8, seed=11)
    dataset = client.post("/datasets", files={"file": ("cancel.zip", zip_folder(folder))}).json()
    long = {"dataset_id": dataset["id"], "epochs": 500, "val_fraction": 0.0, **TINY, "batch_size": 2}
    running = client.post("/train", json=long).json()
    queued = client.post("/train", json=long).json()  # the one solo worker is busy: this one waits

    wait_for_job(client, running["id"], ("running",), timeout=60)
    start = time.monotonic()
    while not client.get(f"/jobs/{running['id']}/losses").json()["losses"]:
        assert time.monotonic() - start < 60, "no epoch finished"
        time.sleep(0.2)
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 409
    for active in (running, queued):
        refused = client.delete(f"/jobs/{active['id']}")
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"], refused.text

    response = client.post(f"/jobs/{queued['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"

    response = client.post(f"/jobs/{running['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    asked = time.monotonic()
    job = wait_for_job(client, running["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - asked < 10
    assert job["has_model"] and (settings.runs_dir / running["id"] / "last.pt").is_file()
    epochs = [r["epoch"] for r in client.get(f"/jobs/{running['id']}/losses").json()["losses"]]
    assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) < 500
    assert job["epochs_completed"] == len(epochs)

    time.sleep(2)  # the queued job's task reaches the worker now, and must not start it
    never = client.get(f"/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled" and never["started_at"] is None and not never["has_model"]
    # Both cancels reached the run folders' job.json (a rebuild from disk keeps them cancelled).
    for cancelled in (running, queued):
        assert read_job_file(settings.runs_dir / cancelled["id"]).status == "cancelled"
    assert sorted(p.name for p in (settings.runs_dir / queued["id"]).iterdir()) == [".lock", "job.json"]
    assert client.post(f"/jobs/{queued['id']}/cancel").status_code == 202  # idempotent
    detect = client.post("/detect", params={"job_id": queued["id"]}, files={"file": ("a.jpg", b"x")})
    assert detect.status_code == 409

    # An ended job is deleted with its losses and its run folder, checkpoints included.
    assert client.delete(f"/jobs/{running['id']}").status_code == 204
    assert client.get(f"/jobs/{running['id']}").status_code == 404
    assert client.get(f"/jobs/{running['id']}/losses").status_code == 404
    assert not (settings.runs_dir / running["id"]).exists()
    assert running["id"] not in [j["id"] for j in client.get("/jobs").json()]
    assert client.delete(f"/jobs/{running['id']}").status_code == 404
    assert client.delete(f"/jobs/{queued['id']}").status_code == 204
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0},
        {"learning_rate": -1},
        {"val_fraction": 1.0},
        {"image_size": 100},
        {"width_multiplier": 0},
        {"device": "tpu"},
        {"backbone": "resnet"},
        {"pretrained_backbone": "/etc/passwd"},
        {"epochs": "many"},
        {"unknown_knob": 1},
    ],
)
def test_invalid_training_settings_answer_422(client, change):
    response = client.post("/train", json={"dataset_id": "whatever", **change})
    assert response.status_code == 422, response.text


def test_train_requests_naming_no_dataset(client):
    assert client.post("/train", json={}).status_code == 422
    response = client.post("/train", json={"dataset_id": "0123456789ab"})  # the form of an id, naming nothing
    assert response.status_code == 404 and "0123456789ab" in response.json()["detail"]
    response = client.post("/train", json={"dataset_id": "no-such-dataset"})  # not the form of an id
    assert response.status_code == 422 and "dataset_id" in response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/nope"),
        ("GET", "/jobs/nope/losses"),
        ("GET", "/jobs/nope/losses/stream"),
        ("GET", "/jobs/nope/losses.png"),
        ("POST", "/jobs/nope/cancel"),
    ],
)
def test_unknown_job_answers_404(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_event_streams_are_capped_and_a_closed_one_frees_its_place(env, tmp_path, log_dir):
    """Each stream holds a Redis connection: past SSD_MAX_EVENT_STREAMS the route answers 503."""
    overrides = {
        "SSD_MAX_EVENT_STREAMS": "2",
        "SSD_KEY_PREFIX": f"streams-{uuid.uuid4().hex[:8]}",  # a queue no worker reads: the job stays queued
        "SSD_DATA_DIR": str(tmp_path),
    }
    with api_process(env, log_dir, "api-streams", **overrides) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            dataset = client.post("/datasets/synthetic", json={"num_images": 2, "image_size": 64}).json()
            job = client.post("/train", json={"dataset_id": dataset["id"], **TINY}).json()
            path = f"/jobs/{job['id']}/losses/stream"
            with ExitStack() as streams:
                for _ in range(2):
                    opened = streams.enter_context(httpx.stream("GET", base + path, timeout=30))
                    assert opened.status_code == 200
                refused = client.get(path)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "10", refused.text
                assert "SSD_MAX_EVENT_STREAMS" in refused.json()["detail"]
                assert client.get(f"/jobs/{job['id']}").status_code == 200  # the other routes still answer

            def reopened() -> bool:
                with httpx.stream("GET", base + path, timeout=30) as again:
                    return again.status_code == 200

            wait_until(reopened, 20, "a place freed by the closed streams")


def test_jobs_and_datasets_are_listed_a_page_at_a_time(env, tmp_path, log_dir):
    overrides = {"SSD_KEY_PREFIX": f"pages-{uuid.uuid4().hex[:8]}", "SSD_DATA_DIR": str(tmp_path)}
    with api_process(env, log_dir, "api-pages", **overrides) as base, httpx.Client(base_url=base, timeout=30) as client:
        datasets = [
            client.post("/datasets/synthetic", json={"num_images": 1, "image_size": 32}).json() for _ in range(2)
        ]
        posted = [client.post("/train", json={"dataset_id": datasets[n % 2]["id"], **TINY}).json() for n in range(5)]
        client.post(f"/jobs/{posted[0]['id']}/cancel")

        listed, url = [], "/jobs?limit=2"
        while url:
            page = client.get(url)
            assert page.status_code == 200 and len(page.json()) <= 2
            listed += [job["id"] for job in page.json()]
            link = page.headers.get("link")
            url = link[1 : link.index(">")] if link else None
            assert not link or link.endswith('>; rel="next"')
        assert listed == [job["id"] for job in reversed(posted)]

        second = client.get("/jobs", params={"dataset_id": datasets[1]["id"]}).json()
        assert [job["id"] for job in second] == [posted[3]["id"], posted[1]["id"]]
        queued_first = client.get("/jobs", params={"dataset_id": datasets[0]["id"], "status": "queued"}).json()
        assert [job["id"] for job in queued_first] == [posted[4]["id"], posted[2]["id"]]
        assert [d["id"] for d in client.get("/datasets", params={"limit": 1}).json()] == [datasets[1]["id"]]
        bad = client.get("/jobs", params={"cursor": "abc.def"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"], bad.text
