"""GET /jobs/{id}/model.onnx through the real API and worker: the trained job's model as ONNX."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import onnxruntime
from PIL import Image
from torchvision.transforms.v2 import functional as F

from app.main import create_app
from core.layout import ONNX_MODEL
from model.detector import Detector
from model.export import GRAPH_VERSION
from tests.model.test_onnx import assert_same_detections
from tests.support.service import TINY, shapes, wait_for_job, zip_folder


def test_a_succeeded_jobs_model_downloads_as_onnx_with_the_detectors_detections(trained, client, settings, store):
    job = trained["job"]
    response = client.get(f"/jobs/{job['id']}/model.onnx")
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == f'attachment; filename="{job["id"]}.onnx"'
    assert response.headers["content-type"] == "application/octet-stream"

    session = onnxruntime.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == job["classes"]
    image = Image.open(trained["data"].images[0].path).convert("RGB")
    resized = F.resize(F.pil_to_tensor(image).float() / 255, [300, 300], antialias=True)  # as the Detector resizes
    (boxes,), (scores,), (labels,) = session.run(None, {"images": resized[None].numpy()})

    run_dir = settings.layout.run_dir(job["id"])
    # ONNX runs in float32, so the float32 Detector is the reference (bf16 on this CPU would differ).
    checkpoint = run_dir / Path(store.get_job(job["id"]).checkpoint).name
    detector = Detector.from_checkpoint(checkpoint, device="cpu", amp=False)
    (expected,) = detector.predict([resized], score_threshold=0.01, max_detections=100)
    assert assert_same_detections(boxes, scores, labels, expected, 300) == len(expected["scores"]) > 0

    # Exported once, into the run folder (deleted with the job); the next download is that file.
    assert (run_dir / ONNX_MODEL).read_bytes() == response.content
    assert f".v{GRAPH_VERSION}." in ONNX_MODEL  # a new graph is a new file: old exports are never served for it
    again = client.get(f"/jobs/{job['id']}/model.onnx")
    assert again.status_code == 200 and again.content == response.content


def test_only_a_succeeded_job_has_an_onnx_model(api, worker, client, tmp_path):
    assert client.get("/jobs/nope/model.onnx").status_code == 404
    shapes(tmp_path / "data", num_images=4, seed=3)
    dataset = client.post("/datasets", files={"file": ("onnx.zip", zip_folder(tmp_path / "data"))}).json()
    job = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 200, "val_fraction": 0.0, **TINY}).json()
    try:
        refused = client.get(f"/jobs/{job['id']}/model.onnx")
        assert refused.status_code == 409 and "only a succeeded job" in refused.json()["detail"], refused.text
    finally:
        client.post(f"/jobs/{job['id']}/cancel")
    job = wait_for_job(client, job["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    refused = client.get(f"/jobs/{job['id']}/model.onnx")  # ended, but not succeeded
    assert refused.status_code == 409 and "is cancelled" in refused.json()["detail"], refused.text


def test_without_the_onnx_extra_the_route_says_what_to_install(trained, settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it fails

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(f"/jobs/{trained['job']['id']}/model.onnx")

    response = asyncio.run(get())
    assert response.status_code == 501
    assert 'pip install "ssd-service[onnx]"' in response.json()["detail"]
