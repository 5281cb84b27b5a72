"""Where jobs start from, over HTTP with the real worker: init checks before queueing, the record of what
was used, training on from a job, patience; and the COCO-trained model at /detect?model=coco."""

from __future__ import annotations

import httpx
import pytest

from model.pretrained import COCO_CLASSES, COCO_WEIGHTS
from tests.support.processes import api_process
from tests.support.service import TINY, image_bytes, wait_for_job

NARROW = {k: v for k, v in TINY.items() if k != "width_multiplier"}


def test_inits_that_cannot_start_a_job_answer_422_before_anything_is_queued(client, trained):
    dataset, job_id = trained["coco"]["id"], trained["job"]["id"]
    stopped = client.post("/train", json={"dataset_id": dataset, "epochs": 50, **TINY}).json()
    client.post(f"/jobs/{stopped['id']}/cancel")
    wait_for_job(client, stopped["id"], ("cancelled", "succeeded"))
    cases = [
        ({"init": "imagenet2"}, "init must be one of 'auto', 'scratch', 'imagenet', 'coco' or 'job:<id>'"),
        ({"init": "job:"}, "must be followed by a job id"),
        ({"init": "job:../../etc"}, "12 lowercase hex digits"),
        ({"init": "job:*:status:queued"}, "12 lowercase hex digits"),
        ({"init": "coco", "backbone": "vgg16_bn"}, "init 'coco' needs the vgg16 backbone"),
        ({"init": "imagenet", "width_multiplier": 0.5}, "init 'imagenet' needs width_multiplier 1.0"),
        ({"init": "job:0123456789ab"}, "there is no job 0123456789ab"),
        ({"init": f"job:{stopped['id']}"}, f"job {stopped['id']} is cancelled"),
        ({"init": f"job:{job_id}", "backbone": "vgg16"}, f"job {job_id} trained a vgg16_bn backbone, not vgg16"),
        ({"init": f"job:{job_id}", "width_multiplier": 1.0}, "trained width_multiplier 0.125, not 1.0"),
        ({"patience": 2, "val_fraction": 0}, "patience needs a validation split"),
        ({"pretrained_backbone": "imagenet", "init": "coco"}, "contradicts init 'coco'"),
    ]
    before = client.get("/jobs").json()
    for change, words in cases:
        response = client.post("/train", json={"dataset_id": dataset, **change})
        assert response.status_code == 422 and words in response.text, (change, response.text)
    assert client.get("/jobs").json() == before


def test_the_job_record_says_where_its_weights_started(trained, client):
    job = client.get(f"/jobs/{trained['job']['id']}").json()
    assert job["init"] == job["config"]["init"] == "auto"
    assert job["init_used"] == "scratch" and job["backbone"] == "vgg16_bn"
    assert "pretrained weights need width_multiplier 1.0" in job["init_note"]


def test_a_job_trains_on_from_a_succeeded_jobs_model(trained, client):
    first = trained["job"]
    response = client.post(
        "/train", json={"dataset_id": trained["voc"]["id"], "epochs": 1, "init": f"job:{first['id']}", **NARROW}
    )
    assert response.status_code == 202, response.text
    assert response.json()["config"]["width_multiplier"] == 0.125  # the job's, as none was asked for
    job = wait_for_job(client, response.json()["id"], ("succeeded", "failed"), timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["init_used"] == f"job:{first['id']}" and job["init_note"] is None and job["backbone"] == "vgg16_bn"


def test_an_explicit_init_whose_weights_are_missing_fails_the_job_saying_why(trained, client):
    response = client.post("/train", json={"dataset_id": trained["coco"]["id"], "epochs": 1, "init": "coco"})
    assert response.status_code == 202 and response.json()["config"]["backbone"] is None
    job = wait_for_job(client, response.json()["id"], ("succeeded", "failed"), timeout=60)
    assert job["status"] == "failed"
    assert f"{COCO_WEIGHTS.file_name} is not in" in job["error"] and "downloads are off" in job["error"]


def test_patience_stops_a_job_early_as_succeeded_with_a_note(trained, client):
    # A learning rate this small changes nothing the validation mAP@0.5 can see.
    body = {"dataset_id": trained["coco"]["id"], "epochs": 5, "patience": 1, "val_fraction": 0.5, **TINY}
    job = client.post("/train", json={**body, "learning_rate": 1e-9}).json()
    job = wait_for_job(client, job["id"], ("succeeded", "failed"), timeout=120)
    assert job["status"] == "succeeded" and job["epochs_completed"] == 2
    assert job["note"].startswith("stopped early after epoch 2")


def test_detect_with_model_coco_needs_its_weights(trained, client):
    response = client.post("/detect?model=coco", files={"file": ("a.jpg", image_bytes(64, 48))})
    assert response.status_code == 404 and "ssd-service weights fetch coco" in response.json()["detail"]
    assert client.get("/weights").json()["coco_model"] is False


@pytest.fixture(scope="module")
def coco_api(env, log_dir, published, tmp_path_factory):
    """An API whose weights folder holds the COCO file (made by torchvision's constructor)."""
    weights = published.folder_with(tmp_path_factory.mktemp("weights"), COCO_WEIGHTS)
    with api_process(env, log_dir, "coco-api", SSD_WEIGHTS_DIR=str(weights)) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            yield client


def test_detect_with_model_coco_answers_with_coco_category_names(coco_api):
    listed = coco_api.get("/weights").json()
    assert listed["coco_model"] is True and listed["inits"]["coco"] == f"{COCO_WEIGHTS.file_name} (present)"
    photo = {"file": ("street.jpg", image_bytes(320, 240, colour=(120, 110, 90)))}
    query = "model=coco&score_threshold=0&max_detections=5"
    response = coco_api.post(f"/detect?{query}", files=photo)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "coco" and body["job_id"] is None and body["image"] == {"width": 320, "height": 240}
    assert len(body["detections"]) == 5 and {d["label"] for d in body["detections"]} <= set(COCO_CLASSES)
    assert all(d["label"] == COCO_CLASSES[d["class_id"] - 1] for d in body["detections"])
    assert "detect;dur=" in response.headers["server-timing"]

    batch = coco_api.post(f"/detect/batch?{query}", files=[("files", photo["file"]), ("files", photo["file"])])
    assert batch.status_code == 200 and batch.json()["model"] == "coco"
    assert [r["detections"] for r in batch.json()["results"]] == [body["detections"]] * 2

    drawn = coco_api.post("/detect?model=coco&format=png", files=photo)
    assert drawn.headers["content-type"] == "image/png" and drawn.headers["x-model"] == "coco"
    both = coco_api.post("/detect?model=coco&job_id=abc", files=photo)
    assert both.status_code == 422 and "not both" in both.text
    assert coco_api.post("/detect?model=imagenet", files=photo).status_code == 422
