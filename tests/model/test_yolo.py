"""The YOLO reader and writer: layouts (Ultralytics, Roboflow, CVAT), the problems it reports, and
agreement with the COCO and VOC readers on the same data."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import (
    AnnotatedImage,
    DatasetError,
    DetectionData,
    DetectionDataset,
    eval_transforms,
    make_shapes_dataset,
    read_coco,
    read_dataset,
    read_voc,
    read_yolo,
    write_coco,
    write_voc,
    write_yolo,
)


def _image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _sample(root: Path, names: str = "names: [dog, cat]") -> Path:
    """data.yaml with classes dog (0), cat (1); images/a.png 40x30 with two boxes, images/b.png 50x20 without labels."""
    _image(root / "images" / "a.png", (40, 30))
    _image(root / "images" / "b.png", (50, 20))
    _write(root / "labels" / "a.txt", "0 0.5 0.5 0.5 0.2\n\n1 0.125 0.25 0.25 0.5\n")
    return _write(root / "data.yaml", names + "\n")


def test_yolo_reads_relative_centre_boxes_as_pixels_in_names_order(tmp_path):
    data = read_yolo(_sample(tmp_path))
    assert data.format == "yolo"
    assert data.classes == ["dog", "cat"]  # names order, not sorted: class i is label i + 1
    first, second = data.images
    assert first.path == (tmp_path / "images" / "a.png").resolve()
    assert (first.width, first.height, second.width, second.height) == (40, 30, 50, 20)
    # cx 0.5, cy 0.5, w 0.5, h 0.2 of 40x30 -> [10, 12, 30, 18]; 0.125, 0.25, 0.25, 0.5 -> [0, 0, 10, 15]
    torch.testing.assert_close(first.boxes, torch.tensor([[10.0, 12.0, 30.0, 18.0], [0.0, 0.0, 10.0, 15.0]]))
    torch.testing.assert_close(first.labels, torch.tensor([1, 2]))
    assert second.boxes.shape == (0, 4) and second.labels.shape == (0,)  # no label file: no objects
    assert data.warnings == []


@pytest.mark.parametrize(
    "names",
    [
        "names:\n  0: dog\n  1: cat",
        "names: {1: cat, 0: dog}",
        "names:\n  '0': dog\n  '1': cat\nnc: 2",
    ],
    ids=["map", "map-out-of-order", "map-string-keys-with-nc"],
)
def test_yolo_names_as_an_index_map_read_like_the_list(tmp_path, names):
    assert read_yolo(_sample(tmp_path, names)).classes == ["dog", "cat"]


def test_yolo_clips_values_rounded_just_past_the_border(tmp_path):
    path = _sample(tmp_path)
    _write(tmp_path / "labels" / "a.txt", "0 0.5 0.5 1.0005 1.0\n0 0.975 0.5 0.05 0.2\n")
    boxes = read_yolo(path).images[0].boxes
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 40.0, 30.0], [38.0, 12.0, 40.0, 18.0]]))


# --- layouts --------------------------------------------------------------------------------


def _splits(root: Path, images: str = "images/{split}", labels: str = "labels/{split}") -> None:
    """Two train images and one val image; each label's class is its split's index."""
    for index, (split, stem) in enumerate([("train", "t1"), ("train", "t2"), ("val", "v1")]):
        _image(root / images.format(split=split) / f"{stem}.jpg", (32 + index, 24))
        _write(root / labels.format(split=split) / f"{stem}.txt", f"{int(split == 'val')} 0.5 0.5 0.5 0.5\n")


def _summary(data: DetectionData, root: Path) -> list[tuple[str, list[int]]]:
    return [(image.path.relative_to(root.resolve()).as_posix(), image.labels.tolist()) for image in data.images]


def test_yolo_split_folders_without_keys_are_all_read(tmp_path):
    _splits(tmp_path)
    _write(tmp_path / "data.yaml", "names: [a, b]\n")
    assert _summary(read_dataset(tmp_path), tmp_path) == [
        ("images/train/t1.jpg", [1]),
        ("images/train/t2.jpg", [1]),
        ("images/val/v1.jpg", [2]),
    ]


def test_yolo_ultralytics_keys_relative_to_path(tmp_path):
    _splits(tmp_path / "data")
    _write(tmp_path / "data.yaml", "path: data\ntrain: images/train\nval: [images/val]\ntest:\nnames: [a, b]\n")
    assert [p for p, _ in _summary(read_yolo(tmp_path / "data.yaml"), tmp_path)] == [
        "data/images/train/t1.jpg",
        "data/images/train/t2.jpg",
        "data/images/val/v1.jpg",
    ]


def test_yolo_roboflow_layout_with_parent_relative_paths(tmp_path):
    _splits(tmp_path, images="{split}/images", labels="{split}/labels")
    (tmp_path / "val").rename(tmp_path / "valid")
    _write(tmp_path / "data.yaml", "train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['a', 'b']\n")
    assert _summary(read_dataset(tmp_path), tmp_path) == [
        ("train/images/t1.jpg", [1]),
        ("train/images/t2.jpg", [1]),
        ("valid/images/v1.jpg", [2]),
    ]


def test_yolo_cvat_layout_with_an_image_list_file(tmp_path):
    _splits(tmp_path)
    _write(tmp_path / "train.txt", "images/train/t2.jpg\n./images/train/t1.jpg\n\n")
    _write(tmp_path / "data.yaml", "path: ./\ntrain: train.txt\nnames:\n  0: a\n  1: b\n")
    assert _summary(read_dataset(tmp_path), tmp_path) == [("images/train/t2.jpg", [1]), ("images/train/t1.jpg", [1])]


def test_a_split_key_naming_the_dataset_folder_reads_the_images_below_it(tmp_path):
    path = _sample(tmp_path)
    _write(path, "train: .\nnames: [dog, cat]\n")
    assert _summary(read_yolo(path), tmp_path) == [("images/a.png", [1, 2]), ("images/b.png", [])]


def test_read_dataset_recognises_yolo_folders_and_yaml_files(tmp_path):
    _sample(tmp_path / "one")
    assert read_dataset(tmp_path / "one").format == "yolo"
    assert read_dataset(tmp_path / "one" / "data.yaml").format == "yolo"
    (tmp_path / "one" / "data.yaml").rename(tmp_path / "one" / "dataset.yaml")
    assert read_dataset(tmp_path / "one").classes == ["dog", "cat"]
    _write(tmp_path / "one" / "data.yaml", "names: [x]\n")
    with pytest.raises(DatasetError, match=re.escape("both data.yaml and dataset.yaml")):
        read_dataset(tmp_path / "one")


def test_yolo_without_any_label_file_warns_that_nothing_is_labelled(tmp_path):
    path = _sample(tmp_path)
    (tmp_path / "labels" / "a.txt").unlink()
    data = read_yolo(path)
    assert data.num_boxes == 0
    assert len(data.warnings) == 1 and "no label files found" in data.warnings[0]


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    _sample(tmp_path)
    _write(tmp_path / "data.yaml", f"names: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DatasetError, match=re.escape("data.yaml: malformed YAML")):
        read_yolo(tmp_path / "data.yaml")
    assert not marker.exists()


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    _sample(tmp_path)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    _write(tmp_path / "data.yaml", "\n".join(levels) + "\nnames: *a8\nnc: *a8\ntrain: *a8\n")
    with pytest.raises(DatasetError) as caught:  # 10**9 names if expanded; each is reported as "a list"
        read_yolo(tmp_path / "data.yaml")
    assert "class 0 is a list" in str(caught.value) and "nc is a list" in str(caught.value)


def test_label_files_with_a_byte_order_mark_read(tmp_path):
    path = _sample(tmp_path)
    (tmp_path / "labels" / "a.txt").write_bytes("\ufeff0 0.5 0.5 0.5 0.2\r\n".encode())
    torch.testing.assert_close(read_yolo(path).images[0].boxes, torch.tensor([[10.0, 12.0, 30.0, 18.0]]))


# --- problems -------------------------------------------------------------------------------


def _labels(text: str):
    def change(root: Path) -> None:
        _write(root / "labels" / "a.txt", text)

    return change


def _yaml(text: str):
    def change(root: Path) -> None:
        _write(root / "data.yaml", text)

    return change


def _orphan_label(root: Path) -> None:
    _write(root / "labels" / "gone.txt", "0 0.5 0.5 0.1 0.1\n")


def _pictures_folder(root: Path) -> None:
    _image(root / "pictures" / "p.png", (8, 8))
    _write(root / "data.yaml", "train: [images, pictures]\nnames: [dog, cat]\n")


def _image_pair_sharing_a_label(root: Path) -> None:
    _image(root / "images" / "a.jpg", (40, 30))


YOLO_PROBLEMS = [
    ("class out of range", _labels("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n"), ["a.txt: line 2", "class index 2"]),
    ("negative class", _labels("-1 0.5 0.5 0.1 0.1\n"), ["a.txt: line 1", "class index -1 is out of range"]),
    ("class not whole", _labels("0.5 0.5 0.5 0.1 0.1\n"), ["a.txt: line 1", "class index '0.5' is not a whole"]),
    ("value over 1", _labels("0 0.5 1.2 0.1 0.1\n"), ["a.txt: line 1", "cy 1.2 is outside 0-1"]),
    ("pixel values", _labels("1 20 15 10 10\n"), ["a.txt: line 1", "cx 20 is outside 0-1"]),
    ("negative width", _labels("0 0.5 0.5 -0.1 0.1\n"), ["a.txt: line 1", "w -0.1 is outside 0-1"]),
    ("not a number", _labels("0 0.5 0.5 nan 0.1\n"), ["a.txt: line 1", "w nan is outside 0-1"]),
    ("four values", _labels("0 0.5 0.5 0.1\n"), ["a.txt: line 1", "expected 5 values", "got 4"]),
    ("words", _labels("dog 0.5 0.5 0.1 0.1\n"), ["a.txt: line 1", "not numbers"]),
    ("polygon", _labels("0 0.1 0.1 0.2 0.1 0.2 0.2\n"), ["a.txt: line 1", "segmentation polygon"]),
    ("corner far outside", _labels("0 0.95 0.5 0.5 0.1\n"), ["a.txt: line 1", "more than 2 px outside", "40x30"]),
    ("zero size", _labels("0 0.5 0.5 0 0.1\n"), ["a.txt: line 1", "is empty"]),
    ("label without image", _orphan_label, ["labels/gone.txt: label file without an image"]),
    ("two images one label", _image_pair_sharing_a_label, ["labels/a.txt: label file of two images"]),
    ("no names", _yaml("nc: 2\n"), ["data.yaml", "'names' is missing"]),
    ("empty names", _yaml("names: []\n"), ["data.yaml", "names is empty"]),
    ("nc differs", _yaml("nc: 3\nnames: [dog, cat]\n"), ["data.yaml", "nc is 3 but names lists 2"]),
    ("boolean name", _yaml("names: [dog, yes]\n"), ["data.yaml", "class 1 is the boolean true", "quote it"]),
    ("names a word", _yaml("names: dog\n"), ["data.yaml", "'names' must be a list", "got 'dog'"]),
    ("nested name", _yaml("names: [dog, [cat]]\n"), ["data.yaml", "class 1 is a list"]),
    ("same name twice", _yaml("names: [dog, dog]\n"), ["data.yaml", "'dog' is used by more than one"]),
    ("gap in the map", _yaml("names: {0: dog, 2: cat}\n"), ["data.yaml", "indices must be 0 to 1", "missing: 1"]),
    ("not a mapping", _yaml("- dog\n- cat\n"), ["data.yaml", "expected a YAML mapping"]),
    ("malformed yaml", _yaml("names: [dog, cat\n"), ["data.yaml", "malformed YAML", "(line 2, column 1)"]),
    ("absolute path", _yaml("path: /etc\nnames: [dog, cat]\n"), ["data.yaml", "path '/etc' is absolute"]),
    ("path escapes", _yaml("path: ../..\nnames: [dog, cat]\n"), ["data.yaml", "leads out of the dataset"]),
    ("path missing", _yaml("path: coco8\nnames: [dog, cat]\n"), ["data.yaml", "'coco8' is not a folder"]),
    ("absolute split", _yaml("train: /etc\nnames: [dog, cat]\n"), ["train: '/etc'", "absolute paths are refused"]),
    ("split escapes", _yaml("val: ../../../x\nnames: [a, b]\n"), ["val: '../../../x'", "leads out of the dataset"]),
    ("split missing", _yaml("train: images/nope\nnames: [a, b]\n"), ["train: 'images/nope'", "not a folder or a"]),
    ("no images folder", _pictures_folder, ["pictures/p.png is not inside an 'images' folder"]),
    ("no images", _yaml("train: labels\nnames: [a, b]\n"), ["no images found in what it names (train: 'labels')"]),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in YOLO_PROBLEMS], ids=[c[0] for c in YOLO_PROBLEMS])
def test_yolo_problem_is_reported_with_file_line_and_reason(tmp_path, change, expected):
    path = _sample(tmp_path)
    change(tmp_path)
    with pytest.raises(DatasetError) as caught:
        read_yolo(path)
    message = str(caught.value)
    for part in expected:
        assert part in message, message


def test_yolo_image_list_problems_name_the_list_and_line(tmp_path):
    path = _sample(tmp_path)
    _write(tmp_path / "train.txt", "images/a.png\n/etc/passwd\nimages/missing.png\n../outside.png\n")
    _write(path, "train: train.txt\nnames: [dog, cat]\n")
    with pytest.raises(DatasetError) as caught:
        read_yolo(path)
    problems = caught.value.problems
    assert len(problems) == 3
    assert "train.txt: line 2: '/etc/passwd' is not a relative path inside the dataset" in problems[0]
    assert "train.txt: line 3: image file 'images/missing.png' not found" in problems[1]
    assert "train.txt: line 4" in problems[2]


def test_yolo_collects_every_problem_before_raising(tmp_path):
    path = _sample(tmp_path)
    _write(tmp_path / "labels" / "a.txt", "5 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n0 0.5 0.5 0.1 0.1\n")
    _write(tmp_path / "labels" / "b.txt", "0 1.5 0.5 0.1 0.1\n")
    _orphan_label(tmp_path)
    with pytest.raises(DatasetError) as caught:
        read_yolo(path)
    assert len(caught.value.problems) == 4


def test_a_negative_class_index_without_names_is_a_problem_not_a_crash(tmp_path):
    path = _sample(tmp_path, names="nc: 2")
    _write(tmp_path / "labels" / "a.txt", "-1 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError) as caught:
        read_yolo(path)
    assert any("a.txt: line 1: class index -1 is out of range" in problem for problem in caught.value.problems)


def test_yolo_unreadable_image_is_a_problem(tmp_path):
    path = _sample(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"b.png: not a readable image"):
        read_yolo(path)


# --- the same data as COCO, VOC and YOLO ---------------------------------------------------


@pytest.fixture
def shapes(tmp_path) -> DetectionData:
    return make_shapes_dataset(tmp_path / "shapes", num_images=6, seed=5, image_size=(40, 64))


def test_coco_voc_and_yolo_readers_agree_box_by_box(tmp_path, shapes):
    readers = {
        "coco": read_coco(write_coco(shapes, tmp_path / "coco")),
        "voc": read_voc(write_voc(shapes, tmp_path / "voc")),
        "yolo": read_yolo(write_yolo(shapes, tmp_path / "yolo")),
    }
    assert {name: data.format for name, data in readers.items()} == {"coco": "coco", "voc": "voc", "yolo": "yolo"}
    for name, data in readers.items():
        assert data.classes == shapes.classes, name
        assert [image.path.name for image in data.images] == [image.path.name for image in shapes.images], name
        for expected, image in zip(shapes.images, data.images, strict=True):
            assert (image.width, image.height) == (expected.width, expected.height), name
            # YOLO's fractions (8 decimals) come back within float32 rounding of the pixel boxes.
            torch.testing.assert_close(image.boxes, expected.boxes, rtol=0, atol=1e-4)
            torch.testing.assert_close(image.labels, expected.labels, rtol=0, atol=0)
    # ...and so do the training targets the dataset makes of them.
    for index in range(len(shapes.images)):
        samples = [DetectionDataset(data.images, eval_transforms(64))[index] for data in readers.values()]
        for image, boxes, labels in samples[1:]:
            torch.testing.assert_close(image, samples[0][0], rtol=0, atol=0)
            torch.testing.assert_close(boxes, samples[0][1], rtol=0, atol=1e-5)
            torch.testing.assert_close(labels, samples[0][2], rtol=0, atol=0)


def test_yolo_round_trip_keeps_fractional_boxes(tmp_path):
    boxes = torch.tensor([[2.25, 3.5, 9.75, 8.125], [0.0, 0.0, 50.0, 20.0], [49.5, 19.5, 50.0, 20.0]])
    image = AnnotatedImage(_image(tmp_path / "x.png", (50, 20)), 50, 20, boxes, torch.tensor([2, 1, 2]))
    again = read_yolo(write_yolo(DetectionData(classes=["a", "b"], images=[image]), tmp_path / "yolo"))
    torch.testing.assert_close(again.images[0].boxes, boxes, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.images[0].labels, image.labels, rtol=0, atol=0)
