"""A client generated from the service's own OpenAPI document (openapi-python-client, as a user would make
one) walks the main path against the real API and worker: upload a dataset, train, wait, detect.

Its method names are the document's operation ids, so this also holds them to names that say what each
call does (``upload_dataset``, ``start_training``, ``get_job``, ``detect``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import PYTHON
from tests.support.service import TINY, image_bytes, shapes, zip_folder

GENERATOR = Path(PYTHON).parent / "openapi-python-client"
# Its generator knows no image/png: those answers are bytes to it.
CONFIG = "content_type_overrides:\n  image/png: application/octet-stream\n"


@pytest.fixture(scope="module")
def ssd_client(api, tmp_path_factory):
    """The generated package ``ssd_client``, imported from a temporary folder."""
    folder = tmp_path_factory.mktemp("generated")
    (folder / "openapi.json").write_bytes(httpx.get(f"{api}/openapi.json").content)
    (folder / "config.yml").write_text(CONFIG)
    command = [str(GENERATOR), "generate", "--path", "openapi.json", "--output-path", "ssd_client"]
    done = subprocess.run([*command, "--meta", "none", "--config", "config.yml"], cwd=folder, capture_output=True)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("ssd_client")
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == "ssd_client" or m.startswith("ssd_client.")]:
            del sys.modules[name]


def test_the_operation_ids_say_what_each_call_does(ssd_client):
    from ssd_client.api import datasets, detection, jobs

    calls = {path.stem for package in (datasets, detection, jobs) for path in Path(package.__path__[0]).glob("*.py")}
    expected = {"upload_dataset", "create_synthetic_dataset", "start_training", "get_job", "get_losses", "detect"}
    assert expected <= calls


def test_a_generated_client_uploads_trains_waits_and_detects(ssd_client, api, worker, tmp_path):
    from ssd_client import Client
    from ssd_client.api.datasets import upload_dataset
    from ssd_client.api.detection import detect
    from ssd_client.api.jobs import get_job, start_training
    from ssd_client.models import BodyDetect, BodyUploadDataset, TrainRequest
    from ssd_client.types import File

    shapes(tmp_path / "coco", num_images=8, seed=3)
    with Client(base_url=api, timeout=httpx.Timeout(60)) as client:
        archive = File(payload=zip_folder(tmp_path / "coco"), file_name="shapes.zip", mime_type="application/zip")
        dataset = upload_dataset.sync(client=client, body=BodyUploadDataset(file=archive, name="generated"))
        assert dataset.num_images == 8 and dataset.classes == ["circle", "square", "triangle"]

        request = TrainRequest.from_dict({"dataset_id": dataset.id, "epochs": 1, "val_fraction": 0.25, **TINY})
        job = start_training.sync(client=client, body=request)
        deadline = time.monotonic() + 180
        while job.status.value not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = get_job.sync(job_id=job.id, client=client)
        assert job.status.value == "succeeded", job.error

        photo = File(payload=image_bytes(320, 240), file_name="photo.jpg", mime_type="image/jpeg")
        found = detect.sync(client=client, body=BodyDetect(file=photo), job_id=job.id, score_threshold=0.0)
        assert found.job_id == job.id and (found.image.width, found.image.height) == (320, 240)
        assert found.detections and all(d.label in dataset.classes for d in found.detections)
