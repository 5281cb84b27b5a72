"""COCO and VOC readers and writers, format detection, and the problems they report."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import (
    AnnotatedImage,
    DatasetError,
    DetectionData,
    make_shapes_dataset,
    read_coco,
    read_dataset,
    read_voc,
    write_coco,
    write_voc,
)


def _image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def _coco_doc() -> dict:
    """Two images (a.png 40x30, b.png 50x20); category ids out of order so renumbering shows."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 50, "height": 20},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30]},
        ],
    }


def _write_coco(folder: Path, doc: dict, image_dir: str = "") -> Path:
    for image in doc["images"]:
        size = (image.get("width", 40), image.get("height", 30))
        _image(folder / image_dir / image["file_name"], size)
    path = folder / "annotations.json"
    path.write_text(json.dumps(doc))
    return path


def _assert_same(first: DetectionData, second: DetectionData) -> None:
    assert first.classes == second.classes
    assert len(first.images) == len(second.images)
    for a, b in zip(first.images, second.images, strict=True):
        assert (a.width, a.height) == (b.width, b.height)
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.labels, b.labels)


# --- COCO -----------------------------------------------------------------------------------


def test_coco_reads_boxes_labels_and_classes_in_category_id_order(tmp_path):
    doc = _coco_doc()
    doc["annotations"].append({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    data = read_coco(_write_coco(tmp_path, doc))

    assert data.format == "coco"
    assert data.classes == ["cat", "dog"]
    first, second = data.images
    assert (first.width, first.height, second.width, second.height) == (40, 30, 50, 20)
    assert first.path == (tmp_path / "a.png").resolve()
    torch.testing.assert_close(first.boxes, torch.tensor([[2.0, 3.0, 12.0, 8.0], [0.0, 0.0, 40.0, 30.0]]))
    torch.testing.assert_close(first.labels, torch.tensor([2, 1]))  # dog is id 7 -> 2, cat id 3 -> 1
    assert second.boxes.shape == (0, 4) and second.labels.shape == (0,)  # no annotations: kept, N = 0
    assert data.num_boxes == 2  # the crowd annotation is skipped


def test_coco_finds_images_beside_in_images_folder_or_in_given_folder(tmp_path):
    doc = _coco_doc()
    doc["images"][1]["file_name"] = "sub/b.png"
    path = _write_coco(tmp_path, doc, image_dir="images")
    assert read_coco(path).images[1].path == (tmp_path / "images" / "sub" / "b.png").resolve()

    moved = tmp_path / "elsewhere" / "annotations.json"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    assert read_coco(moved, images_dir=tmp_path / "images").images[0].path == (tmp_path / "images/a.png").resolve()


def test_coco_clips_boxes_slightly_outside_the_image(tmp_path):
    doc = _coco_doc()
    doc["annotations"] = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [-1.5, -2, 43, 10]}]
    data = read_coco(_write_coco(tmp_path, doc))
    torch.testing.assert_close(data.images[0].boxes, torch.tensor([[0.0, 0.0, 40.0, 8.0]]))


def _bad_box(bbox):
    def mutate(folder, doc):
        doc["annotations"][0]["bbox"] = bbox

    return mutate


def _set(key, value, where=("annotations", 0)):
    def mutate(folder, doc):
        doc[where[0]][where[1]][key] = value

    return mutate


def _overwrite_image(content: bytes):
    def mutate(folder, doc):
        (folder / "a.png").write_bytes(content)

    return mutate


def _truncate_image(folder, doc):
    data = (folder / "a.png").read_bytes()
    (folder / "a.png").write_bytes(data[:12])


def _duplicate_image_id(folder, doc):
    doc["images"][1]["id"] = 1


def _duplicate_image_file(folder, doc):
    doc["images"][1]["file_name"] = "a.png"
    doc["images"][1]["width"], doc["images"][1]["height"] = 40, 30


def _no_images(folder, doc):
    doc["images"] = []
    doc["annotations"] = []


def _drop_top_level(folder, doc):
    del doc["categories"]


def _drop_bbox(folder, doc):
    del doc["annotations"][1]["bbox"]


def _delete_image(folder, doc):
    (folder / "b.png").unlink()


def _escape_folder(folder, doc):
    doc["images"][1]["file_name"] = "../b.png"


COCO_PROBLEMS: list[tuple[str, Callable, list[str]]] = [
    ("box far outside", _bad_box([35, 0, 10, 10]), ["annotation id 10", "more than 2 px outside", "40x30"]),
    ("zero width", _bad_box([5, 5, 0, 4]), ["annotation id 10", "is empty"]),
    ("negative height", _bad_box([5, 5, 4, -3]), ["annotation id 10", "is empty"]),
    ("bbox not 4 numbers", _bad_box([1, 2, 3]), ["annotation id 10", "bbox must be a list of 4 numbers"]),
    ("missing image file", _delete_image, ["image id 2", "'b.png'", "image file not found"]),
    ("unknown category", _set("category_id", 99), ["annotation id 10", "unknown category id 99"]),
    ("unknown image", _set("image_id", 42), ["annotation id 10", "unknown image id 42"]),
    ("not an image", _overwrite_image(b"definitely not a PNG"), ["image id 1", "a.png", "not a readable image"]),
    ("truncated header", _truncate_image, ["image id 1", "a.png", "not a readable image"]),
    ("image id twice", _duplicate_image_id, ["image id 1 is listed twice"]),
    ("image file twice", _duplicate_image_file, ["image id 2", "a.png", "is listed twice"]),
    ("no images", _no_images, ["annotations.json", "no images listed"]),
    ("missing top-level key", _drop_top_level, ["annotations.json", "missing required key", "categories"]),
    ("annotation without bbox", _drop_bbox, ["annotation #1", "missing required key", "bbox"]),
    ("declared size differs", _set("width", 41, ("images", 0)), ["image id 1", "declared size 41x30", "40x30"]),
    ("file name escapes", _escape_folder, ["image id 2", "relative path inside the dataset folder"]),
]


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in COCO_PROBLEMS], ids=[c[0] for c in COCO_PROBLEMS])
def test_coco_problem_is_reported_with_file_annotation_and_reason(tmp_path, mutate, expected):
    doc = _coco_doc()
    path = _write_coco(tmp_path, doc)
    mutate(tmp_path, doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as caught:
        read_coco(path)
    message = str(caught.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_coco_malformed_json_is_a_dataset_error(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match="malformed JSON"):
        read_coco(path)


def test_coco_decompression_bomb_is_a_problem_not_a_warning(tmp_path, monkeypatch):
    path = _write_coco(tmp_path, _coco_doc())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x30 = 1200 pixels: warns, under 2x: no error
    with pytest.raises(DatasetError, match="decompression bomb"):
        read_coco(path)


def test_coco_collects_every_problem_before_raising(tmp_path):
    doc = _coco_doc()
    doc["annotations"][0]["category_id"] = 99
    doc["annotations"][1]["bbox"] = [0, 0, 90, 90]
    with pytest.raises(DatasetError) as caught:
        read_coco(_write_coco(tmp_path, doc))
    assert len(caught.value.problems) == 2


# --- VOC ------------------------------------------------------------------------------------


def _voc_xml(filename: str, objects: list[tuple[str, tuple]], size: tuple[int, int] | None = None) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(name == 'cat')}</difficult><bndbox>"
        + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
        + "</bndbox></object>"
        for name, box in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{body}</annotation>"


def _write_voc(root: Path, files: dict[str, str], images: dict[str, tuple[int, int]]) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / "Annotations" / name).write_text(text)
    for name, size in images.items():
        _image(root / "JPEGImages" / name, size)
    return root


def _voc_sample(root: Path) -> Path:
    return _write_voc(
        root,
        {
            "a.xml": _voc_xml("a.png", [("dog", (1, 1, 10, 5)), ("cat", (3, 4, 40, 30))], size=(40, 30)),
            "b.xml": _voc_xml("renamed.png", []),  # falls back to b.<image suffix>
        },
        {"a.png": (40, 30), "b.png": (50, 20)},
    )


def test_voc_reads_one_based_inclusive_boxes_and_sorted_classes(tmp_path):
    data = read_voc(_voc_sample(tmp_path))
    assert data.format == "voc"
    assert data.classes == ["cat", "dog"]
    first, second = data.images
    assert first.path == (tmp_path / "JPEGImages" / "a.png").resolve()
    torch.testing.assert_close(first.boxes, torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 3.0, 40.0, 30.0]]))
    torch.testing.assert_close(first.labels, torch.tensor([2, 1]))  # the difficult cat is kept
    assert second.path.name == "b.png" and (second.width, second.height) == (50, 20)
    assert second.boxes.shape == (0, 4)


def test_voc_clips_boxes_slightly_outside_the_image(tmp_path):
    root = _write_voc(tmp_path, {"a.xml": _voc_xml("a.png", [("dog", (-1, 0, 42, 31))])}, {"a.png": (40, 30)})
    torch.testing.assert_close(read_voc(root).images[0].boxes, torch.tensor([[0.0, 0.0, 40.0, 30.0]]))


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
    "<annotation><filename>&lol2;</filename></annotation>"
)

VOC_PROBLEMS = [
    ("malformed xml", {"a.xml": "<annotation><filename>a.png</filename>"}, {}, ["a.xml", "malformed XML"]),
    ("entity declarations", {"a.xml": BILLION_LAUGHS}, {}, ["a.xml", "DTD/entity declarations are not allowed"]),
    ("missing image", {"c.xml": _voc_xml("c.png", [])}, {}, ["c.xml", "image file not found", "'c.png'"]),
    (
        "box far outside",
        {"c.xml": _voc_xml("c.png", [("dog", (1, 1, 10, 5)), ("cat", (1, 1, 60, 5))])},
        {"c.png": (40, 30)},
        ["c.xml", "object #2 ('cat')", "more than 2 px outside"],
    ),
    ("empty box", {"c.xml": _voc_xml("c.png", [("dog", (5, 5, 4, 9))])}, {"c.png": (40, 30)}, ["object #1", "empty"]),
    (
        "missing coordinate",
        {
            "c.xml": "<annotation><filename>c.png</filename><object><name>dog</name><bndbox><xmin>1</xmin>"
            "</bndbox></object></annotation>"
        },
        {"c.png": (40, 30)},
        ["c.xml", "object #1 ('dog')", "numeric <bndbox>"],
    ),
    (
        "size differs",
        {"c.xml": _voc_xml("c.png", [], size=(41, 30))},
        {"c.png": (40, 30)},
        ["c.xml", "<size> says 41x30", "40x30"],
    ),
    (
        "image twice",
        {"c.xml": _voc_xml("a.png", []), "d.xml": _voc_xml("a.png", [])},
        {},
        ["d.xml", "a.png", "listed twice", "c.xml"],
    ),
]


@pytest.mark.parametrize("files, images, expected", [c[1:] for c in VOC_PROBLEMS], ids=[c[0] for c in VOC_PROBLEMS])
def test_voc_problem_is_reported_with_file_object_and_reason(tmp_path, files, images, expected):
    root = _write_voc(tmp_path, files, {"a.png": (40, 30), **images})
    with pytest.raises(DatasetError) as caught:
        read_voc(root)
    for part in expected:
        assert part in str(caught.value)


def test_voc_corrupt_image_and_empty_folder_are_dataset_errors(tmp_path):
    root = _write_voc(tmp_path / "one", {"a.xml": _voc_xml("a.png", [])}, {})
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / "a.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DatasetError, match="not a readable image"):
        read_voc(root)
    (tmp_path / "two" / "Annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no VOC annotation files"):
        read_voc(tmp_path / "two")


# --- writers: both formats read back the same --------------------------------------------


@pytest.fixture
def shapes(tmp_path) -> DetectionData:
    return make_shapes_dataset(tmp_path / "shapes", num_images=6, seed=5, image_size=(40, 64))


def test_coco_and_voc_readers_agree_on_the_same_data_written_both_ways(tmp_path, shapes):
    from_coco = read_coco(write_coco(shapes, tmp_path / "coco"))
    from_voc = read_voc(write_voc(shapes, tmp_path / "voc"))
    _assert_same(from_coco, shapes)
    _assert_same(from_voc, shapes)
    assert [p.path.name for p in from_voc.images] == [p.path.name for p in from_coco.images]


def test_coco_to_voc_to_coco_round_trip_is_exact_for_integer_boxes(tmp_path, shapes):
    voc = read_voc(write_voc(read_coco(tmp_path / "shapes" / "annotations.json"), tmp_path / "voc"))
    again = read_coco(write_coco(voc, tmp_path / "coco", images_subdir="pictures"))
    _assert_same(again, shapes)


def test_voc_writer_rounds_fractional_boxes_to_whole_pixels_keeping_at_least_one(tmp_path):
    image = AnnotatedImage(
        path=_image(tmp_path / "x.png", (40, 30)),
        width=40,
        height=30,
        boxes=torch.tensor([[2.4, 3.6, 9.6, 3.8], [39.6, 0.0, 40.0, 5.0]]),
        labels=torch.tensor([1, 1]),
    )
    data = DetectionData(classes=["dot"], images=[image])
    boxes = read_voc(write_voc(data, tmp_path / "voc")).images[0].boxes
    torch.testing.assert_close(boxes, torch.tensor([[2.0, 4.0, 10.0, 5.0], [39.0, 0.0, 40.0, 5.0]]))


# --- format detection ---------------------------------------------------------------------


def test_read_dataset_recognises_coco_files_and_folders(tmp_path, shapes):
    folder = tmp_path / "shapes"
    _assert_same(read_dataset(folder / "annotations.json"), shapes)
    _assert_same(read_dataset(folder), shapes)

    layout = tmp_path / "layout"
    (layout / "annotations").mkdir(parents=True)
    (folder / "images").rename(layout / "images")
    doc = json.loads((folder / "annotations.json").read_text())
    for image in doc["images"]:
        image["file_name"] = Path(image["file_name"]).name
    (layout / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    _assert_same(read_dataset(layout), shapes)


def test_read_dataset_recognises_voc_folders_also_one_level_down(tmp_path, shapes):
    write_voc(shapes, tmp_path / "devkit" / "VOC2007")
    assert read_dataset(tmp_path / "devkit" / "VOC2007").format == "voc"
    _assert_same(read_dataset(tmp_path / "devkit"), shapes)


def test_read_dataset_explains_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=re.escape("expected a COCO .json file")):
        read_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "missing")
    (tmp_path / "two" / "x.json").parent.mkdir()
    (tmp_path / "two" / "x.json").write_text("{}")
    (tmp_path / "two" / "y.json").write_text("{}")
    with pytest.raises(DatasetError, match="several JSON files"):
        read_dataset(tmp_path / "two")
