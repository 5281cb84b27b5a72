"""The web page end to end in headless Chromium, against the real API, worker and Redis."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Route, expect

from model.data import make_shapes_dataset
from model.pretrained import COCO_CLASSES, COCO_WEIGHTS
from tests.support.browser import DESKTOP, new_page, screenshot
from tests.support.processes import PYTHON, api_process, free_port, start_process, wait_for_http
from tests.support.service import TINY, wait_for_job, zip_folder

# The tiny network of the service tests (tests/support/service.py TINY), entered through the form.
TINY_FORM = {
    "#train-epochs": "2",
    "#train-batch_size": "4",
    "#train-width_multiplier": "0.125",
    "#train-image_size": "300",
    "#train-val_fraction": "0.25",
    "#train-num_workers": "0",
    "#train-warmup_steps": "0",
}
TINY_CHECKBOXES = {"#train-augment": False, "#train-amp": False}
SERIES = ("train_loss", "val_loss", "val_map50")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """A small synthetic COCO dataset as a zip, and two of its images."""
    folder = tmp_path_factory.mktemp("web-shapes")
    make_shapes_dataset(folder / "coco", 8, seed=11, image_size=(200, 260))
    archive = folder / "shapes.zip"
    archive.write_bytes(zip_folder(folder / "coco"))
    images = sorted((folder / "coco" / "images").iterdir())
    return {"zip": archive, "images": images[:2]}


def drop_file(page, selector: str, path: Path, mime: str) -> None:
    """Drops a file on an element the way a drag from the desktop does: a drop event with a DataTransfer."""
    transfer = page.evaluate_handle(
        """([name, mime, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [path.name, mime, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def fill_tiny_job(page, epochs: int) -> None:
    """Fills the training form with the tiny settings and submits it."""
    page.click("#train-more summary")
    for selector, value in {**TINY_FORM, "#train-epochs": str(epochs)}.items():
        page.fill(selector, value)
    for selector, checked in TINY_CHECKBOXES.items():
        page.set_checked(selector, checked)
    page.select_option("#train-device", "cpu")
    page.click("#train-form button[type=submit]")


def test_upload_train_watch_and_detect(page, console, api, worker, shapes):
    # Datasets: upload the zip through the form; the progress bar shows while the server imports.
    def slow_import(route: Route) -> None:
        time.sleep(0.6)  # long enough to see "100%: importing…" after the body went up
        route.continue_()

    page.route("**/datasets", lambda route: slow_import(route) if route.request.method == "POST" else route.continue_())
    page.goto("/")
    expect(page.locator("#view-datasets")).to_be_visible()
    page.set_input_files("#upload-file", shapes["zip"])
    page.fill("#upload-name", "web-shapes")
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-percent")).to_have_text("100%: importing…")
    expect(page.locator("#upload-message")).to_contain_text("Imported web-shapes: 8 images")
    expect(page.locator("#upload-progress-line")).to_be_hidden()
    row = page.locator("#datasets-table tbody tr", has_text="web-shapes")
    expect(row).to_contain_text("COCO")
    expect(row).to_contain_text("circle")
    page.unroute("**/datasets")
    screenshot(page, "desktop-datasets")

    # Training: the form holds the API's defaults, but the CPU demo's where every worker trains on a CPU
    # (as here); the new dataset is chosen; tiny settings for speed.
    page.click("nav a[data-view=training]")
    expect(page.locator("#train-epochs")).to_have_value("54")
    expect(page.locator("#train-width_multiplier")).to_have_value("0.25")
    expect(page.locator("#train-batch_size")).to_have_value("16")
    expect(page.locator("#train-cpu-note")).to_be_visible()
    expect(page.locator("#train-learning_rate")).to_have_value("0.001")  # the others keep the API's defaults
    expect(page.locator("#train-backbone")).to_have_value("")  # what the weights need
    expect(page.locator("#train-init")).to_have_value("auto")
    expect(page.locator("#train-init-hint")).to_have_text(
        "Here: scratch: no weights present and downloads are off; at a width other than 1: scratch."
    )
    expect(page.locator("#train-pretrained_backbone")).to_have_count(0)  # deprecated: not offered
    dataset_id = row.get_attribute("data-id")
    expect(page.locator("#train-dataset_id")).to_have_value(dataset_id)
    fill_tiny_job(page, epochs=2)
    job = page.locator("#jobs-list li", has_text="web-shapes").first
    job_id = job.get_attribute("data-id")
    created = httpx.get(f"{api}/jobs/{job_id}").json()
    assert created["dataset_id"] == dataset_id
    assert {k: created["config"][k] for k in ("epochs", "batch_size", "width_multiplier", "augment", "amp")} == {
        "epochs": 2,
        "batch_size": 4,
        "width_multiplier": 0.125,
        "augment": False,
        "amp": False,
    }
    expect(job.locator(".job-progress")).to_contain_text("epoch", timeout=60_000)
    expect(job.locator(".job-init")).to_have_text(
        "weights: scratch (asked: auto), vgg16_bn · pretrained weights need width_multiplier 1.0, this run has 0.125"
    )
    screenshot(page, "desktop-training")

    # Curves: the first stream connection is cut after a made-up epoch 1 (without an event id, so the
    # reconnect replays the history): the chart must end with each real epoch once.
    streams: list[str] = []

    def cut_first_stream(route: Route) -> None:
        streams.append(route.request.url)
        if len(streams) > 1:
            route.continue_()
            return
        fake = {"epoch": 1, "train_loss": 99.0, "val_loss": 98.0, "val_map50": 0.9}
        body = f"retry: 300\nevent: epoch\ndata: {json.dumps(fake)}\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/losses/stream*", cut_first_stream)
    job.locator("[data-action=curves]").click()
    expect(page.locator("#view-curves")).to_be_visible()
    expect(page.locator("#curves-job")).to_have_value(job_id)
    for series in SERIES:
        expect(page.locator(f"[data-series={series}] circle")).to_have_count(2, timeout=120_000)
    expect(page.locator("#curves-state")).to_have_text("job succeeded", timeout=30_000)
    assert len(streams) >= 2, streams
    losses = httpx.get(f"{api}/jobs/{job_id}/losses").json()["losses"]
    for series in SERIES:
        dots = page.locator(f"[data-series={series}] circle")
        drawn = [(int(d.get_attribute("data-epoch")), float(d.get_attribute("data-value"))) for d in dots.all()]
        assert drawn == [(r["epoch"], pytest.approx(r[series])) for r in losses], series
    expect(page.locator("#curves-table tbody tr")).to_have_count(2)
    # Beside the curves: the newest epoch's AP@0.5 per class, in the model's class order.
    expect(page.locator("#per-class-epoch")).to_have_text("(epoch 2)")
    expect(page.locator("#per-class-table tbody tr")).to_have_count(len(created["classes"]))
    assert shown_per_class(page) == {
        label: pytest.approx(ap) for label, ap in losses[-1]["val_ap50_per_class"].items()
    }, losses[-1]
    assert (
        page.locator("#per-class-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.label)")
        == (created["classes"])
    )
    screenshot(page, "desktop-curves")

    # Detect: the trained job's model, an image dropped on the zone, then the slider filters locally.
    detect_requests: list[str] = []
    page.on("request", lambda request: "/detect" in request.url and detect_requests.append(request.url))
    page.click("nav a[data-view=training]")
    job.locator("[data-action=detect]").click()
    expect(page.locator("#view-detect")).to_be_visible()
    expect(page.locator("#detect-model")).to_have_value(job_id)
    drop_file(page, "#dropzone", shapes["images"][0], "image/jpeg")
    boxes = page.locator("#detect-overlay g.detection")
    expect(page.locator("#detect-count")).to_contain_text("detections with score ≥ 0.50")
    result = json.loads(page.locator("#detect-json").text_content())
    assert result["job_id"] == job_id
    assert result["detections"], "the model found nothing at all, even at the request's low threshold"
    assert "score_threshold=0.05" in detect_requests[0] and f"job_id={job_id}" in detect_requests[0]
    scores = [d["score"] for d in result["detections"]]

    def shown_at(threshold: float) -> int:
        expected = sum(score >= threshold for score in scores)
        expect(boxes).to_have_count(expected)
        return expected

    assert boxes.count() == shown_at(0.5)
    page.fill("#score-threshold", "0.05")
    low = shown_at(0.05)
    assert low == len(scores) > 0
    page.focus("#score-threshold")
    page.keyboard.press("End")  # the keyboard moves the slider too: 1.0 keeps only perfect scores
    expect(page.locator("#score-threshold-value")).to_have_text("1.00")
    high = shown_at(1.0)
    assert high < low
    page.fill("#score-threshold", f"{sorted(scores)[len(scores) // 2]:.2f}")
    middle = boxes.count()
    assert high <= middle <= low
    assert len(detect_requests) == 1, "moving the slider sent a new request"
    expect(page.locator("#detect-json")).to_be_hidden()
    page.click("#detect-json-details summary")
    expect(page.locator("#detect-json")).to_be_visible()
    screenshot(page, "desktop-detect")

    # The file picker works as well as the drop.
    page.set_input_files("#detect-file", shapes["images"][1])
    expect(page.locator("#detect-image")).to_have_attribute(
        "alt", f"{shapes['images'][1].name}, with the detected boxes drawn"
    )
    assert len(detect_requests) == 2
    console.assert_clean()


def shown_per_class(page) -> dict:
    """The per-class table as {label: AP@0.5 or None (shown as a dash)}."""
    rows = page.locator("#per-class-table tbody tr").all()
    values = {row.get_attribute("data-label"): row.locator("td").get_attribute("data-value") for row in rows}
    return {label: float(value) if value else None for label, value in values.items()}


def test_per_class_ap_follows_the_newest_epoch(page, console):
    # A made-up job's stream: epoch 1, then the connection ends and EventSource comes back after
    # `retry` for epoch 2 and the end. The table shows each newest epoch as it arrives.
    first = {"epoch": 1, "train_loss": 9.0, "val_ap50_per_class": {"circle": 0.2, "square": None, "triangle": 0.5}}
    second = {"epoch": 2, "train_loss": 7.0, "val_ap50_per_class": {"circle": 0.9, "square": 0.4, "triangle": 1}}
    job = {"id": "made-up-job", "status": "succeeded", "epochs": 2, "classes": ["circle", "square", "triangle"]}
    bodies = [
        f"retry: 4000\nevent: epoch\nid: 1\ndata: {json.dumps(first)}\n\n",
        f"event: epoch\nid: 2\ndata: {json.dumps(second)}\n\nevent: status\ndata: {json.dumps(job)}\n\n",
    ]
    served: list[str] = []

    def stream(route: Route) -> None:
        body = bodies[min(len(served), 1)]
        served.append(route.request.url)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/jobs/made-up-job/losses/stream*", stream)
    page.goto("/#curves/made-up-job")
    expect(page.locator("#per-class-epoch")).to_have_text("(epoch 1)")
    assert shown_per_class(page) == {"circle": 0.2, "square": None, "triangle": 0.5}
    expect(page.locator("#per-class-table tr[data-label=square] td")).to_have_text("–")  # noqa: RUF001 - the page shows an en dash
    expect(page.locator("#per-class-table tr[data-label=circle] td")).to_have_text("0.200")
    expect(page.locator("#per-class-empty")).to_be_hidden()

    expect(page.locator("#per-class-epoch")).to_have_text("(epoch 2)", timeout=15_000)
    assert shown_per_class(page) == {"circle": 0.9, "square": 0.4, "triangle": 1}
    widths = page.locator("#per-class-table .bar > span").evaluate_all("spans => spans.map(s => s.style.width)")
    assert widths == ["90%", "40%", "100%"]
    expect(page.locator("#curves-state")).to_have_text("job succeeded")
    assert len(served) == 2

    # Epochs without a validation split carry none.
    unvalidated = {"epoch": 1, "train_loss": 9.0, "val_loss": None, "val_ap50_per_class": None}
    body = f"event: epoch\nid: 1\ndata: {json.dumps(unvalidated)}\n\nevent: status\ndata: {json.dumps(job)}\n\n"
    page.route(
        "**/jobs/unvalidated-job/losses/stream*",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
    )
    page.goto("/#curves/unvalidated-job")
    expect(page.locator("#per-class-empty")).to_have_text("None in these epochs (no validation split).")
    expect(page.locator("#per-class-table")).to_be_hidden()
    expect(page.locator("#per-class-epoch")).to_have_text("")


def test_synthetic_dataset_and_cancel(page, console, api, worker):
    page.goto("/#datasets")
    expect(page.locator("#synthetic-num-images")).to_have_value("300")  # the CPU demo's size: CPU workers here
    page.fill("#synthetic-num-images", "8")
    page.fill("#synthetic-seed", "5")
    page.click("#synthetic-form button[type=submit]")
    expect(page.locator("#synthetic-message")).to_contain_text("Generated shapes-8-seed5: 8 images")
    expect(page.locator("#datasets-table tbody tr", has_text="shapes-8-seed5")).to_be_visible()

    page.click("nav a[data-view=training]")
    expect(page.locator("#train-dataset_id option:checked")).to_have_text("shapes-8-seed5 (8 images)")
    fill_tiny_job(page, epochs=500)
    job = page.locator("#jobs-list li", has_text="shapes-8-seed5").first
    expect(job.locator("[data-action=cancel]")).to_be_visible()
    job.locator("[data-action=cancel]").click()
    expect(job.locator(".badge")).to_have_text("cancelled", timeout=60_000)
    expect(job.locator("[data-action=cancel]")).to_be_hidden()
    assert httpx.get(f"{api}/jobs/{job.get_attribute('data-id')}").json()["status"] == "cancelled"


def test_rejections_show_the_servers_words(page, console, api, tmp_path):
    console.expect_error("status of 400")
    console.expect_error("status of 422")
    not_a_zip = tmp_path / "notes.zip"
    not_a_zip.write_text("these are notes, not an archive")
    direct = httpx.post(f"{api}/datasets", files={"file": ("notes.zip", not_a_zip.read_bytes())})
    assert direct.status_code == 400

    page.goto("/#datasets")
    page.set_input_files("#upload-file", not_a_zip)
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-error")).to_have_text(direct.json()["detail"])

    page.click("nav a[data-view=training]")
    expect(page.locator("#train-epochs")).to_have_value("54")  # the CPU demo's: this service's workers use CPUs
    page.fill("#train-epochs", "0")
    page.fill("#train-learning_rate", "-1")
    page.click("#train-more summary")
    page.fill("#train-num_workers", "100")
    page.click("#train-more summary")  # closed again: an error inside must open it
    page.click("#train-form button[type=submit]")
    expect(page.locator("#train-epochs-error")).to_have_text("Input should be greater than or equal to 1")
    expect(page.locator("#train-learning_rate-error")).to_have_text("Input should be greater than 0")
    expect(page.locator("#train-num_workers-error")).to_have_text("Input should be less than or equal to 64")
    expect(page.locator("#train-num_workers-error")).to_be_visible()
    expect(page.locator("#train-epochs")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#train-epochs")).to_be_focused()
    screenshot(page, "desktop-training-errors")


API_KEY = "web-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_api(env, log_dir):
    """A second API process on the same Redis and data, with API keys on (``SSD_API_KEY``)."""
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = start_process("api-keyed", args, {**env, "SSD_API_KEY": API_KEY}, log_dir)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", process)
    yield base_url
    process.stop()


def test_an_api_key_is_asked_for_once_kept_and_sent(browser, console, keyed_api, worker):
    console.expect_error("status of 401")
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=keyed_api, headers=headers, timeout=60) as client:
        dataset = client.post("/datasets/synthetic", json={"num_images": 4, "seed": 3}).json()
        job = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 100, **TINY}).json()
        client.post(f"/jobs/{job['id']}/cancel")
        wait_for_job(client, job["id"], ("cancelled",), timeout=60)

    context, page = new_page(browser, keyed_api, console, DESKTOP)
    requests: list[tuple[str, str | None]] = []
    page.on("request", lambda r: requests.append((r.url[len(keyed_api) :], r.headers.get("x-api-key"))))
    page.goto("/#datasets")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()  # one prompt for the several requests that got a 401
    page.fill("#key-input", "not-the-key")
    page.click("#key-dialog button[value=ok]")
    expect(page.locator("#key-refused")).to_be_visible()  # asked again, saying the key was refused
    page.fill("#key-input", API_KEY)
    page.click("#key-dialog button[value=ok]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#datasets-table tbody tr", has_text=dataset["name"]).first).to_be_visible()
    expect(page.locator("#service-status")).to_contain_text("Ready")
    assert page.evaluate("localStorage.getItem('ssd-api-key')") == API_KEY

    # EventSource sends no headers: the stream gets the key as ?api_key=.
    page.goto(f"/#curves/{job['id']}")
    expect(page.locator("#curves-state")).to_have_text("job cancelled")
    assert any(path.startswith(f"/jobs/{job['id']}/losses/stream?api_key=") for path, _ in requests), requests

    before_reload = len(requests)
    page.reload()  # kept: no prompt, and every API request carries the key
    expect(page.locator("#service-status")).to_contain_text("Ready")
    expect(page.locator("#train-epochs")).to_have_value("54")  # the CPU demo's: this service's workers use CPUs
    expect(dialog).to_be_hidden()
    api_calls = [
        (path, key) for path, key in requests[before_reload:] if path.split("?")[0] in ("/datasets", "/jobs", "/readyz")
    ]
    assert len(api_calls) >= 3 and all(key == API_KEY for _, key in api_calls), api_calls
    screenshot(page, "desktop-with-api-key")
    context.close()
    console.assert_clean()


def test_phone_width_and_keyboard(phone_page, console, api):
    page = phone_page
    page.goto("/#datasets")
    for view in ("datasets", "training", "curves", "detect"):
        page.click(f"nav a[data-view={view}]")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the {view} view is wider than a phone's screen by {overflow}px"
        screenshot(page, f"phone-{view}")
    # Tab order starts with the skip link, then the views' links; Enter follows a link.
    page.goto("/#datasets")
    page.reload()  # a fresh load: focus starts at the top of the document
    page.keyboard.press("Tab")
    expect(page.locator("a.skip")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("nav a[data-view=training]")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#view-training")).to_be_visible()


def test_job_progress_line(page, console):
    """A running job's bar and line: epoch, step and ETA (a real job runs too briefly here to catch reliably)."""
    page.goto("/#training")
    running = {
        "status": "running",
        "epochs": 4,
        "epochs_completed": 1,
        "progress": {"epoch": 2, "step": 5, "steps_per_epoch": 10, "eta_seconds": 75.0},
    }
    fraction, line = page.evaluate("(job) => import('/static/training.js').then((m) => m.progressOf(job))", running)
    assert fraction == pytest.approx(0.375)
    assert line == "epoch 2 of 4 · step 5 of 10 · ETA 1 min 15 s"
    done = {**running, "status": "succeeded", "epochs_completed": 4}
    assert page.evaluate("(job) => import('/static/training.js').then((m) => m.progressOf(job))", done) == [
        1,
        "4 of 4 epochs",
    ]


def test_the_jobs_list_pages_through_older_jobs(browser, console, env, log_dir, tmp_path):
    """105 jobs on an API of their own (a queue no worker reads): the newest 100 first, then the rest."""
    overrides = {"SSD_KEY_PREFIX": f"web-pages-{uuid.uuid4().hex[:8]}", "SSD_DATA_DIR": str(tmp_path)}
    with api_process(env, log_dir, "api-web-pages", **overrides) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            dataset = client.post("/datasets/synthetic", json={"num_images": 1, "image_size": 32}).json()
            ids = [client.post("/train", json={"dataset_id": dataset["id"], **TINY}).json()["id"] for _ in range(105)]
        context, page = new_page(browser, base, console, DESKTOP)
        try:
            page.goto("/#training")
            items = page.locator("#jobs-list > li")
            expect(items).to_have_count(100)
            assert items.first.get_attribute("data-id") == ids[-1]
            page.click("#jobs-more")
            expect(items).to_have_count(105)
            assert items.last.get_attribute("data-id") == ids[0]
            expect(page.locator("#jobs-more")).to_be_hidden()
        finally:
            context.close()
    console.assert_clean()


@pytest.fixture(scope="module")
def coco_api(env, log_dir, published, tmp_path_factory, api):
    """An API on the same Redis whose weights folder holds the COCO file (torchvision's layout, random weights)."""
    weights = published.folder_with(tmp_path_factory.mktemp("web-weights"), COCO_WEIGHTS)
    with api_process(env, log_dir, "api-web-coco", SSD_WEIGHTS_DIR=str(weights)) as base:
        yield base


def test_start_from_a_trained_job_and_detect_with_the_coco_model(browser, console, coco_api, worker, shapes):
    with httpx.Client(base_url=coco_api, timeout=60) as client:
        dataset = client.post("/datasets", files={"file": ("s.zip", shapes["zip"].read_bytes())}).json()
        first = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 1, **TINY}).json()
        wait_for_job(client, first["id"], ("succeeded",), timeout=120)
    context, page = new_page(browser, coco_api, console, DESKTOP)
    try:
        # "Start from" offers the succeeded job; its width follows the job (the form leaves width unset).
        page.goto("/#training")
        expect(page.locator(f"#train-init option[value='job:{first['id']}']")).to_have_count(1)
        expect(page.locator("#train-init-hint")).to_contain_text("Here: coco: ssd300_vgg16_coco-b556d3b4.pth")
        page.select_option("#train-dataset_id", dataset["id"])
        expect(page.locator("#train-width_multiplier")).to_have_value("0.25")  # the CPU demo's width...
        page.select_option("#train-init", f"job:{first['id']}")
        expect(page.locator("#train-init-hint")).to_have_text("Here: that succeeded job's best checkpoint.")
        expect(page.locator("#train-width_multiplier")).to_have_value("1")  # ...gives way to the job's
        page.fill("#train-epochs", "1")
        page.click("#train-more summary")
        for selector in ("#train-batch_size", "#train-num_workers", "#train-warmup_steps"):
            page.fill(selector, TINY_FORM[selector])
        page.set_checked("#train-augment", False)
        page.select_option("#train-device", "cpu")
        page.click("#train-form button[type=submit]")
        item = page.locator("#jobs-list li").first
        expect(item.locator(".job-init")).to_have_text(f"weights: job:{first['id']}, vgg16_bn", timeout=60_000)
        second = httpx.get(f"{coco_api}/jobs/{item.get_attribute('data-id')}").json()
        assert second["config"]["init"] == f"job:{first['id']}" and second["config"]["width_multiplier"] == 0.125
        screenshot(page, "desktop-training-from-a-job")

        # Detect: the COCO-trained model answers before any training of one's own.
        page.click("nav a[data-view=detect]")
        page.select_option("#detect-model", "coco")
        drop_file(page, "#dropzone", shapes["images"][0], "image/jpeg")
        # The first request loads the full-size model beside a training job on the same cores.
        expect(page.locator("#detect-count")).to_contain_text("detections with score", timeout=120_000)
        result = json.loads(page.locator("#detect-json").text_content())
        assert result["model"] == "coco" and result["job_id"] is None
        assert {d["label"] for d in result["detections"]} <= set(COCO_CLASSES)
        screenshot(page, "desktop-detect-coco")
        wait_for_job(httpx.Client(base_url=coco_api, timeout=30), second["id"], ("succeeded", "failed"), timeout=120)
    finally:
        context.close()
    console.assert_clean()
