"""Building test archives and images, and waiting on jobs."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import httpx
from PIL import Image

from core.records import DatasetRecord
from model.data import DetectionData, make_shapes_dataset, write_voc, write_yolo

# A dataset record for store-level tests: no files behind it.
DATASET = DatasetRecord(id="d1", name="x", format="coco", num_images=1, num_boxes=1, classes=["a"], root="files")


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """Every file under ``folder`` in a zip, paths relative to it (under ``prefix/`` if given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                archive.write(path, f"{prefix}/{name}" if prefix else name)
    return buffer.getvalue()


def zip_entries(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def shapes(folder: Path, num_images: int = 8, seed: int = 0) -> DetectionData:
    """A small synthetic COCO dataset written to ``folder`` (annotations.json + images/)."""
    return make_shapes_dataset(folder, num_images, seed=seed, image_size=(200, 260))


def coco_zip(folder: Path, num_images: int = 8, seed: int = 0, prefix: str = "") -> bytes:
    shapes(folder, num_images, seed)
    return zip_folder(folder, prefix)


def voc_zip(data: DetectionData, folder: Path) -> bytes:
    write_voc(data, folder)
    return zip_folder(folder)


def yolo_zip(data: DetectionData, folder: Path) -> bytes:
    write_yolo(data, folder)
    return zip_folder(folder)


def coco_document(folder: Path) -> dict:
    return json.loads((folder / "annotations.json").read_text())


def image_bytes(width: int, height: int, fmt: str = "JPEG", colour=(90, 140, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def wait_for_job(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    """Poll GET /jobs/{id} until its status is one of ``statuses``; the job record."""
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s; last record: {job}")


# A tiny network with SSD300's topology: a step on a few 300x300 images takes well under a second on CPU.
TINY = {
    "width_multiplier": 0.125,
    "image_size": 300,
    "num_workers": 0,
    "batch_size": 4,
    "learning_rate": 0.001,
    "warmup_steps": 0,
    "amp": False,
    "device": "cpu",
    "augment": False,
}


def read_sse(base_url: str, path: str, events: list, done: threading.Event, headers: dict | None = None) -> None:
    """Collect ``(event, data, id)`` from a Server-Sent Events stream until it ends."""
    try:
        with httpx.stream("GET", base_url + path, timeout=120, headers=headers) as response:
            assert response.status_code == 200, response.read()
            event, data, event_id = None, [], None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line == "" and event:
                    events.append((event, json.loads("\n".join(data)), event_id))
                    event, data, event_id = None, [], None
    finally:
        done.set()
