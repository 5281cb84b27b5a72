"""/datasets over real HTTP: COCO, VOC and YOLO zips, synthetic, list/get/delete, warnings, and every bad archive."""

from __future__ import annotations

import io
import json
import socket
import stat
import struct
import time
import zipfile

import httpx
import pytest
from PIL import Image

from core.records import DatasetRecord
from tests.support.processes import api_process, wait_until
from tests.support.service import (
    coco_document,
    coco_zip,
    image_bytes,
    shapes,
    voc_zip,
    yolo_zip,
    zip_entries,
    zip_folder,
)


def upload(client, data: bytes, filename: str = "data.zip", name: str | None = None):
    form = {"name": name} if name else None
    return client.post("/datasets", files={"file": (filename, data, "application/zip")}, data=form)


@pytest.fixture
def dataset_dirs(settings):
    """The dataset folder's entries now; the test asserts that a failed import added none."""

    def entries() -> set[str]:
        return {p.name for p in settings.datasets_dir.iterdir()} if settings.datasets_dir.exists() else set()

    return entries


def test_coco_voc_and_yolo_zips_of_the_same_data_import_with_the_same_counts(client, tmp_path, settings):
    data = shapes(tmp_path / "coco", num_images=6, seed=3)
    coco = upload(client, zip_folder(tmp_path / "coco"), "shapes-coco.zip", name="coco copy")
    voc = upload(client, voc_zip(data, tmp_path / "voc"), "shapes-voc.zip")
    yolo = upload(client, yolo_zip(data, tmp_path / "yolo"), "shapes-yolo.zip")
    for response in (coco, voc, yolo):
        assert response.status_code == 201, response.text
    coco, voc, yolo = coco.json(), voc.json(), yolo.json()
    assert (coco["format"], voc["format"], yolo["format"]) == ("coco", "voc", "yolo")
    assert coco["name"] == "coco copy" and voc["name"] == "shapes-voc" and yolo["name"] == "shapes-yolo"
    for record in (coco, voc, yolo):
        assert record["num_images"] == 6
        assert record["num_boxes"] == data.num_boxes
        assert record["classes"] == ["circle", "square", "triangle"]
        assert record["warnings"] == []
    assert client.get(f"/datasets/{coco['id']}").json() == coco
    listed = [d["id"] for d in client.get("/datasets").json()]
    assert listed.index(voc["id"]) < listed.index(coco["id"])  # newest first
    on_disk = json.loads((settings.datasets_dir / coco["id"] / "dataset.json").read_text())
    assert on_disk["num_boxes"] == data.num_boxes


def test_a_dataset_inside_one_top_level_folder_is_found(client, tmp_path):
    response = upload(client, coco_zip(tmp_path, num_images=2, prefix="my-shapes"), "nested.zip")
    assert response.status_code == 201, response.text
    assert response.json()["num_images"] == 2


def test_synthetic_dataset_and_delete(client, settings):
    response = client.post("/datasets/synthetic", json={"num_images": 4, "seed": 1, "image_size": [120, 160]})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["format"] == "coco" and record["num_images"] == 4 and record["num_boxes"] >= 4
    assert (settings.datasets_dir / record["id"] / "files" / "annotations.json").is_file()
    assert client.delete(f"/datasets/{record['id']}").status_code == 204
    assert client.get(f"/datasets/{record['id']}").status_code == 404
    assert not (settings.datasets_dir / record["id"]).exists()
    assert client.delete(f"/datasets/{record['id']}").status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"num_images": 0}, {"num_images": 100000}, {"num_images": 2, "image_size": [300, 100]}, {"bogus": 1}],
)
def test_bad_synthetic_requests_answer_422(client, body):
    assert client.post("/datasets/synthetic", json=body).status_code == 422


def test_unknown_dataset_answers_404(client):
    assert client.get("/datasets/nope").status_code == 404
    assert client.delete("/datasets/nope").status_code == 404


def _bad_coco(tmp_path, change) -> bytes:
    folder = tmp_path / "bad"
    shapes(folder, num_images=3)
    document = coco_document(folder)
    change(document, folder)
    (folder / "annotations.json").write_text(json.dumps(document))
    return zip_folder(folder)


def _box_outside(document, _folder):
    image = document["images"][0]
    annotation = next(a for a in document["annotations"] if a["image_id"] == image["id"])
    annotation["bbox"] = [image["width"] - 5, 10, 50, 20]


def _empty_box(document, _folder):
    document["annotations"][0]["bbox"][2] = 0


def _missing_image(document, folder):
    (folder / document["images"][1]["file_name"]).unlink()


def _bad_yolo(tmp_path, change) -> bytes:
    folder = tmp_path / "bad-yolo"
    yolo_zip(shapes(tmp_path / "bad-coco", num_images=3), folder)
    change(folder)
    return zip_folder(folder)


def _class_out_of_range(folder):
    (folder / "labels" / "000001.txt").write_text("7 0.5 0.5 0.2 0.2\n")


def _absolute_split(folder):
    (folder / "data.yaml").write_text("train: /etc\nnames: [circle, square, triangle]\n")


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("images/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
        archive.writestr("annotations.json", "{}")
    return buffer.getvalue()


def _lying_entry_count() -> bytes:
    """301 entries whose end record claims 3: counted from the central directory, before zipfile."""
    data = bytearray(zip_entries({f"f{i}.txt": b"x" for i in range(301)}))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<2H", data, end + 8, 3, 3)
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda tmp: b"this is not a zip file at all", 400, ["bad.zip", "not a zip"]),
        (
            lambda tmp: zip_entries({"images/a.jpg": image_bytes(32, 32)}),
            400,
            ["bad.zip", "no dataset found", "COCO", "VOC", "YOLO folder with data.yaml"],
        ),
        (lambda tmp: zip_entries({}), 400, ["bad.zip", "no files"]),
        (lambda tmp: _bad_coco(tmp, _box_outside), 400, ["annotations.json", "outside"]),
        (lambda tmp: _bad_coco(tmp, _empty_box), 400, ["annotations.json", "x2 > x1"]),
        (lambda tmp: _bad_coco(tmp, _missing_image), 400, ["annotations.json", "not found"]),
        (lambda tmp: _bad_yolo(tmp, _class_out_of_range), 400, ["bad.zip: labels/000001.txt: line 1: class index 7"]),
        (lambda tmp: _bad_yolo(tmp, _absolute_split), 400, ["bad.zip: data.yaml: train: '/etc': absolute paths"]),
        (lambda tmp: zip_entries({"../escape.json": b"{}"}), 400, ["../escape.json", "escaping"]),
        (lambda tmp: zip_entries({"/etc/cron.d/x": b"{}"}), 400, ["/etc/cron.d/x", "escaping"]),
        (lambda tmp: _symlink_zip(), 400, ["images/link.jpg", "symbolic link"]),
        (lambda tmp: zip_entries({f"f{i}.txt": b"x" for i in range(301)}), 413, ["entries", "limit"]),
        (lambda tmp: _lying_entry_count(), 413, ["more than 300 entries", "limit"]),
        (lambda tmp: zip_entries({"bomb.bin": bytes(25_000_000)}), 413, ["bomb.bin", "zip bomb"]),
        (lambda tmp: zip_entries({f"z{i}.bin": bytes(1_000_000) for i in range(21)}), 413, ["unpacks to more than"]),
        (lambda tmp: bytes(3_500_000), 413, ["limit"]),
        (lambda tmp: zip_entries({"a": b"x", "a/b.json": b"{}"}), 400, ["a/b.json", "cannot be extracted"]),
        (lambda tmp: zip_entries({"d/" + "n" * 300 + ".json": b"{}"}), 400, ["cannot be extracted"]),
        (lambda tmp: b"PK\x03\x04" + bytes(100), 400, ["not a zip"]),
    ],
    ids=[
        "not-a-zip",
        "no-annotations",
        "empty-zip",
        "box-outside-image",
        "empty-box",
        "missing-image",
        "yolo-class-out-of-range",
        "yolo-absolute-path",
        "dotdot-path",
        "absolute-path",
        "symlink",
        "too-many-files",
        "entry-count-understated",
        "zip-bomb",
        "too-large-unpacked",
        "upload-too-large",
        "file-then-folder-of-the-same-name",
        "name-too-long",
        "truncated-zip",
    ],
)
def test_bad_archives_are_refused_and_leave_nothing_behind(client, tmp_path, dataset_dirs, make, status, words):
    before_disk, before_list = dataset_dirs(), client.get("/datasets").json()
    response = upload(client, make(tmp_path), "bad.zip")
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail
    assert str(tmp_path) not in detail and ".incoming-" not in detail  # paths inside the archive, not ours
    assert dataset_dirs() == before_disk
    assert client.get("/datasets").json() == before_list


def _phone_photo_coco(folder, width: int, height: int) -> bytes:
    """A COCO zip of one JPEG stored 40x60 whose EXIF orientation (6) displays it as 60x40; ``width``
    and ``height`` are the sizes its annotation declares."""
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 60), (90, 140, 200)).save(folder / "phone.jpg", exif=exif)
    document = {
        "images": [{"id": 1, "file_name": "phone.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "annotations.json").write_text(json.dumps(document))
    return zip_folder(folder)


def test_an_image_used_as_stored_against_its_exif_orientation_is_a_warning(client, tmp_path):
    displayed = upload(client, _phone_photo_coco(tmp_path / "displayed", 60, 40), "displayed.zip")
    assert displayed.status_code == 201, displayed.text
    assert displayed.json()["warnings"] == []

    stored = upload(client, _phone_photo_coco(tmp_path / "stored", 40, 60), "stored.zip")
    assert stored.status_code == 201, stored.text
    record = stored.json()
    (warning,) = record["warnings"]
    assert warning.startswith("annotations.json: image id 1 ('phone.jpg'): declared size 40x60 is the stored size")
    assert "phone.jpg, which its EXIF orientation 6 displays as 60x40" in warning and "used as stored" in warning
    assert str(tmp_path) not in warning and ".incoming-" not in warning  # paths inside the archive, not ours
    assert client.get(f"/datasets/{record['id']}").json()["warnings"] == record["warnings"]


def test_a_dataset_record_written_before_warnings_existed_still_loads():
    old = {"id": "a1", "name": "old", "format": "voc", "num_images": 2, "num_boxes": 3, "classes": ["x"]}
    old["root"] = "files"
    record = DatasetRecord.model_validate_json(json.dumps(old))
    assert record.warnings == [] and record.public().warnings == []


def test_upload_without_a_file_answers_422(client):
    assert client.post("/datasets", data={"name": "x"}).status_code == 422


def test_imports_run_on_their_own_bounded_pool():
    """Two slots: a third import while both are reserved is turned away at once; a slot comes back
    when its import's thread is done."""
    import asyncio
    import threading

    from app.uploads import ImportsBusy, ImportSlots

    release = threading.Event()

    async def scenario() -> list:
        slots = ImportSlots(2)
        first = asyncio.ensure_future(slots.run(slots.reserve(), release.wait, 10))
        second = asyncio.ensure_future(slots.run(slots.reserve(), release.wait, 10))
        await asyncio.sleep(0.05)
        try:
            slots.reserve()
            third = "reserved"
        except ImportsBusy as error:
            third = str(error)
        release.set()
        done = await asyncio.gather(first, second)
        after = await slots.run(slots.reserve(), lambda: threading.current_thread().name)
        unused = slots.reserve()
        unused.release()
        unused.release()  # once only: the semaphore is bounded and would complain
        slots.close()
        return [third, done, after]

    third, done, thread = asyncio.run(scenario())
    assert "2 dataset imports are running" in third and done == [True, True]
    assert thread.startswith("ssd-import")


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def _status_of(sock: socket.socket) -> tuple[int, str]:
    """The status and text of a JSON answer (headers and body) read off a raw socket."""
    reply = b""
    while b'"}' not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    text = reply.decode(errors="replace")
    return int(text.split(" ", 2)[1]), text


def test_an_upload_is_refused_before_its_body_when_every_import_slot_is_busy(env, tmp_path, log_dir):
    with api_process(env, log_dir, "api-slots", SSD_IMPORT_SLOTS="1", SSD_DATA_DIR=str(tmp_path)) as base:
        port = int(base.rsplit(":", 1)[1])
        head = (
            "POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 2000000\r\n\r\n"
        )
        slow = _raw_request(port, head, b"--b\r\n")  # takes the one slot, then sends nothing more
        time.sleep(0.5)
        refused = _raw_request(port, head)  # headers only: the answer must not wait for the body
        status, text = _status_of(refused)
        assert status == 503 and "retry-after: 30" in text.lower() and "dataset imports" in text, text
        refused.close()
        slow.close()  # the slow upload goes away: its slot comes back
        zipped = coco_zip(tmp_path / "coco", num_images=2)

        def imported() -> httpx.Response | None:
            response = httpx.post(f"{base}/datasets", files={"file": ("d.zip", zipped)}, timeout=30)
            return response if response.status_code != 503 else None

        response = wait_until(imported, 20, "the slot to come back")
        assert response.status_code == 201, response.text
