"""POST /jobs/{id}/evaluate through the real API, worker and Redis; its turn-taking with /detect."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

from app.inference import DetectionService
from app.routers.evaluation import ClientGone, score_in_batches
from model.data import AnnotatedImage, make_shapes_dataset, read_dataset
from model.detector import Detector
from model.metrics import DetectorEvaluation, evaluate_detector
from tests.support.service import TINY, image_bytes, shapes, wait_for_job, zip_folder

UNUSED_CHECKPOINT = partial(nullcontext, Path("unused.pt"))  # the test's model needs no file


def _evaluate(client, job_id: str, dataset_id: str):
    return client.post(f"/jobs/{job_id}/evaluate", json={"dataset_id": dataset_id})


def _upload(client, folder: Path, name: str) -> dict:
    response = client.post("/datasets", files={"file": (f"{name}.zip", zip_folder(folder))})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def detector(trained, settings, store) -> Detector:
    """The trained job's model, loaded here from its checkpoint (CPU, like the API in these tests)."""
    job = store.get_job(trained["job"]["id"])
    return Detector.from_checkpoint(settings.layout.run_dir(job.id) / job.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def reference(trained, detector, settings, store) -> dict:
    """The job's figures on its COCO dataset, computed here by the model core."""
    dataset = store.get_dataset(trained["coco"]["id"])
    data = read_dataset(settings.layout.dataset_dir(dataset.id) / dataset.root)
    return evaluate_detector(detector, data.images, dataset_classes=data.classes)


@pytest.fixture(scope="module")
def own_boxes(trained, detector, tmp_path_factory) -> dict:
    """The COCO images annotated with the model's own best box of each class in each image.

    Two tiny epochs find nothing the ground truth holds (every AP is 0 there): on its own boxes the
    model scores well, differently per class, so a class matched to the wrong one would show.
    Written twice: categories in the model's order, and the other way round.
    """
    folder = tmp_path_factory.mktemp("own-boxes")
    data = shapes(folder / "model-order", num_images=8, seed=7)
    document = json.loads((folder / "model-order" / "annotations.json").read_text())
    annotations = []
    for image, entry in zip(data.images, document["images"], strict=True):
        (found,) = detector.predict([Image.open(image.path)], score_threshold=0.01)
        for class_id in found["labels"].unique().tolist():
            best = found["boxes"][found["labels"] == class_id][0]  # sorted by score
            x1, y1, x2, y2 = (round(v, 2) for v in best.tolist())
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                bbox = [x1, y1, x2 - x1, y2 - y1]
                annotations.append({"image_id": entry["id"], "category_id": class_id, "bbox": bbox, "iscrowd": 0})
    for number, annotation in enumerate(annotations, start=1):
        annotation |= {"id": number, "area": annotation["bbox"][2] * annotation["bbox"][3]}
    document["annotations"] = annotations
    (folder / "model-order" / "annotations.json").write_text(json.dumps(document))
    # The other way round: category ids 1, 2, 3 become 3, 2, 1, so the dataset's classes are reversed.
    shutil.copytree(folder / "model-order", folder / "reversed")
    flip = {c["id"]: len(document["categories"]) + 1 - c["id"] for c in document["categories"]}
    reversed_document = {
        **document,
        "categories": [{**c, "id": flip[c["id"]]} for c in document["categories"]],
        "annotations": [{**a, "category_id": flip[a["category_id"]]} for a in annotations],
    }
    (folder / "reversed" / "annotations.json").write_text(json.dumps(reversed_document))
    read = read_dataset(folder / "model-order")
    return {
        "folders": {name: folder / name for name in ("model-order", "reversed")},
        "reference": evaluate_detector(detector, read.images, dataset_classes=read.classes),
    }


def _assert_same_figures(answer: dict, reference: dict) -> None:
    assert answer["num_images"] == reference["num_images"]
    assert answer["map50"] == pytest.approx(reference["map50"], abs=1e-3)
    assert answer["map"] == pytest.approx(reference["map"], abs=1e-3)
    assert [c["label"] for c in answer["per_class"]] == [c["label"] for c in reference["per_class"]]
    for ours, theirs in zip(answer["per_class"], reference["per_class"], strict=True):
        assert ours["num_boxes"] == theirs["num_boxes"], ours["label"]
        for key in ("ap50", "ap"):
            assert (ours[key] is None) == (theirs[key] is None), ours
            if ours[key] is not None:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-3), ours


def test_a_trained_model_is_scored_overall_and_per_class(trained, client, reference):
    job, coco = trained["job"], trained["coco"]
    response = _evaluate(client, job["id"], coco["id"])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"job_id", "dataset_id", "num_images", "map50", "map", "per_class"}
    assert (answer["job_id"], answer["dataset_id"], answer["num_images"]) == (job["id"], coco["id"], 8)
    assert [c["label"] for c in answer["per_class"]] == job["classes"]
    assert sum(c["num_boxes"] for c in answer["per_class"]) == coco["num_boxes"]
    _assert_same_figures(answer, reference)
    # The same images and boxes as Pascal VOC give the same figures.
    voc = _evaluate(client, job["id"], trained["voc"]["id"])
    assert voc.status_code == 200, voc.text
    _assert_same_figures(voc.json(), reference)


def test_evaluations_and_detections_at_once(trained, client, reference):
    job_id, dataset_id = trained["job"]["id"], trained["coco"]["id"]
    with ThreadPoolExecutor(6) as pool:
        evaluations = [pool.submit(_evaluate, client, job_id, dataset_id) for _ in range(2)]
        image = {"file": ("a.jpg", image_bytes(220, 200))}
        detections = [pool.submit(client.post, "/detect", params={"job_id": job_id}, files=image) for _ in range(4)]
        for future in detections:
            assert future.result().status_code == 200, future.result().text
        for future in evaluations:
            assert future.result().status_code == 200, future.result().text
            _assert_same_figures(future.result().json(), reference)


def test_classes_are_matched_by_name_in_any_order(trained, client, own_boxes):
    reference = own_boxes["reference"]
    ap50 = [c["ap50"] for c in reference["per_class"]]
    assert reference["map50"] > 0.3 and len(set(ap50)) > 1, reference  # figures a mix-up would change
    uploaded = {name: _upload(client, folder, name) for name, folder in own_boxes["folders"].items()}
    assert uploaded["model-order"]["classes"] == trained["job"]["classes"]
    assert uploaded["reversed"]["classes"] == trained["job"]["classes"][::-1]
    for dataset in uploaded.values():
        response = _evaluate(client, trained["job"]["id"], dataset["id"])
        assert response.status_code == 200, response.text
        _assert_same_figures(response.json(), reference)
        assert client.delete(f"/datasets/{dataset['id']}").status_code == 204


def test_other_class_names_answer_409_naming_them(trained, client, tmp_path):
    folder = tmp_path / "renamed"
    shapes(folder, num_images=2, seed=1)
    document = json.loads((folder / "annotations.json").read_text())
    document["categories"] = [{**c, "name": "disc"} if c["name"] == "circle" else c for c in document["categories"]]
    (folder / "annotations.json").write_text(json.dumps(document))
    dataset = _upload(client, folder, "renamed")

    response = _evaluate(client, trained["job"]["id"], dataset["id"])
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "missing from the dataset: circle" in detail and "not classes of the model: disc" in detail
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204


def test_a_dataset_past_the_image_limit_answers_413(trained, client, settings):
    size = settings.max_eval_images + 1
    dataset = client.post("/datasets/synthetic", json={"num_images": size, "seed": 2, "image_size": 32}).json()
    response = _evaluate(client, trained["job"]["id"], dataset["id"])
    assert response.status_code == 413, response.text
    assert f"{size} images" in response.json()["detail"] and "SSD_MAX_EVAL_IMAGES" in response.json()["detail"]
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204


def test_unknown_ids_and_bad_bodies(trained, client):
    job_id, dataset_id = trained["job"]["id"], trained["coco"]["id"]
    response = _evaluate(client, "no-such-job", dataset_id)
    assert response.status_code == 404 and "no-such-job" in response.json()["detail"]
    response = _evaluate(client, job_id, "0123456789ab")  # the form of an id, naming no dataset
    assert response.status_code == 404 and "0123456789ab" in response.json()["detail"]
    assert _evaluate(client, job_id, "no-such-dataset").status_code == 422  # not the form of an id
    assert client.post(f"/jobs/{job_id}/evaluate", json={}).status_code == 422
    assert client.post(f"/jobs/{job_id}/evaluate", json={"dataset_id": dataset_id, "x": 1}).status_code == 422


def test_a_job_without_a_model_answers_409(trained, client):
    coco = trained["coco"]
    job = client.post("/train", json={"dataset_id": coco["id"], "epochs": 500, **TINY}).json()
    client.post(f"/jobs/{job['id']}/cancel")  # before its first epoch ends: no checkpoint
    job = wait_for_job(client, job["id"], ("cancelled",), timeout=60)
    assert not job["has_model"]
    response = _evaluate(client, job["id"], coco["id"])
    assert response.status_code == 409 and "no trained model" in response.json()["detail"], response.text
    assert client.delete(f"/jobs/{job['id']}").status_code == 204


# --- Turn-taking with /detect, on the API's own DetectionService and a slow stand-in model --------------


class _SlowModel:
    """Takes ``seconds`` per forward pass and finds nothing; logs each call as ("evaluate"|"detect", images)."""

    classes: ClassVar[list[str]] = ["circle", "square", "triangle"]

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _forward(self, kind: str, count: int) -> None:
        with self.lock:
            self.calls.append((kind, count))
        time.sleep(self.seconds)

    def predict(self, pictures, score_threshold, max_detections):
        self._forward("evaluate", len(pictures))
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        return [empty for _ in pictures]

    def detect(self, images, score_threshold, max_detections):
        self._forward("detect", len(images))
        return [[] for _ in images]


class _Client:
    """``Request.is_disconnected`` of a client that leaves after ``checks`` checks (never: None)."""

    def __init__(self, checks: int | None = None):
        self.checks = checks

    async def is_disconnected(self) -> bool:
        if self.checks is None:
            return False
        self.checks -= 1
        return self.checks < 0


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> list[AnnotatedImage]:
    return make_shapes_dataset(tmp_path_factory.mktemp("few"), num_images=10, seed=4, image_size=(32, 48)).images


def _service(model: _SlowModel) -> DetectionService:
    return DetectionService(
        load=lambda _path: model,
        cache_size=1,
        threads=1,
        max_batch=8,
        max_wait_ms=0,
        max_pending=8,
        image_threads=1,
    )


def test_a_detection_waits_for_one_evaluation_batch_not_the_whole_evaluation(few_images):
    model = _SlowModel(seconds=0.05)
    service = _service(model)

    async def scenario():
        detector = await service.cache.get("job", UNUSED_CHECKPOINT)
        evaluation = DetectorEvaluation(detector.classes)
        scoring = asyncio.create_task(score_in_batches(service, detector, evaluation, few_images, 1, _Client()))
        while not model.calls:  # the evaluation's first forward pass is running
            await asyncio.sleep(0.005)
        await service.detect("job", UNUSED_CHECKPOINT, Image.open(few_images[0].path), 0.5, 10)
        answered_during_evaluation = not scoring.done()
        return answered_during_evaluation, await scoring

    try:
        answered_during_evaluation, scores = asyncio.run(scenario())
    finally:
        service.close()
    assert answered_during_evaluation
    assert scores["num_images"] == 10 and scores["map50"] == 0.0
    kinds = [kind for kind, _ in model.calls]
    assert kinds.count("evaluate") == 10 and kinds.count("detect") == 1
    assert kinds.index("detect") <= 2, kinds  # after the batch running when it came (and at most the next one)


def test_an_evaluation_stops_when_its_client_leaves(few_images):
    model = _SlowModel(seconds=0.0)
    service = _service(model)

    async def scenario():
        detector = await service.cache.get("job", UNUSED_CHECKPOINT)
        evaluation = DetectorEvaluation(detector.classes)
        await score_in_batches(service, detector, evaluation, few_images, 2, _Client(checks=2))

    try:
        with pytest.raises(ClientGone):
            asyncio.run(scenario())
    finally:
        service.close()
    assert model.calls == [("evaluate", 2), ("evaluate", 2)]
