"""The synthetic shapes generator: deterministic, valid, and readable as COCO and VOC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import make_shapes_dataset, read_coco

SIZE = (48, 80)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return folder, make_shapes_dataset(folder, num_images=40, seed=3, image_size=SIZE)


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    first = make_shapes_dataset(tmp_path / "a", num_images=5, seed=11, image_size=SIZE)
    second = make_shapes_dataset(tmp_path / "b", num_images=5, seed=11, image_size=SIZE)
    make_shapes_dataset(tmp_path / "c", num_images=5, seed=12, image_size=SIZE)

    def contents(name: str) -> tuple[bytes, list[bytes]]:
        folder = tmp_path / name
        images = [p.read_bytes() for p in sorted((folder / "images").iterdir())]
        return (folder / "annotations.json").read_bytes(), images

    assert contents("a") == contents("b")
    assert contents("a")[0] != contents("c")[0]
    assert contents("a")[1] != contents("c")[1]
    for a, b in zip(first.images, second.images, strict=True):
        torch.testing.assert_close(a.boxes, b.boxes)


def test_classes_counts_and_sizes(shapes):
    _, data = shapes
    assert data.classes == ["circle", "square", "triangle"]
    sizes = [(image.width, image.height) for image in data.images]
    assert all(SIZE[0] <= w <= SIZE[1] and SIZE[0] <= h <= SIZE[1] for w, h in sizes)
    assert all(w != h for w, h in sizes)
    assert len(set(sizes)) > 1
    counts = [int(image.boxes.shape[0]) for image in data.images]
    assert min(counts) >= 1 and max(counts) <= 4
    assert len(set(counts)) > 1
    labels = torch.cat([image.labels for image in data.images])
    assert set(labels.tolist()) == {1, 2, 3}


def test_boxes_are_integer_inside_the_image_and_sized_by_the_short_side(shapes):
    _, data = shapes
    for image in data.images:
        boxes = image.boxes
        torch.testing.assert_close(boxes, boxes.round())
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.width).all() and (boxes[:, 3] <= image.height).all()
        sides = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1)
        short = min(image.width, image.height)
        # Triangles span a little less than their nominal size; the drawn edge adds a pixel.
        assert (sides >= 0.12 * short * 0.7).all() and (sides <= 0.45 * short + 2).all()


def _overlaps_another(boxes: torch.Tensor, index: int) -> bool:
    others = torch.cat([boxes[:index], boxes[index + 1 :]])
    lo = torch.maximum(others[:, :2], boxes[index, :2])
    hi = torch.minimum(others[:, 2:], boxes[index, 2:])
    return bool(((hi - lo) > 0).all(dim=1).any())


def test_each_box_holds_a_shape_that_stands_out_from_around_it(shapes):
    _, data = shapes
    checked = 0
    for image in data.images:
        pixels = np.asarray(Image.open(image.path).convert("RGB"), dtype=np.float32)
        for index, (x1, y1, x2, y2) in enumerate(image.boxes.long().tolist()):
            if _overlaps_another(image.boxes, index):
                continue
            centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
            around = np.zeros(pixels.shape[:2], dtype=bool)
            around[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = True
            around[y1:y2, x1:x2] = False
            if around.any():
                assert np.linalg.norm(centre - pixels[around].mean(axis=0)) > 40
                checked += 1
    assert checked > 20


def test_annotations_read_back_as_returned(shapes):
    folder, data = shapes
    again = read_coco(folder / "annotations.json")
    assert again.classes == data.classes
    for a, b in zip(data.images, again.images, strict=True):
        assert a.path == b.path and (a.width, a.height) == (b.width, b.height)
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.labels, b.labels)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        make_shapes_dataset(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path, num_images=1, image_size=(100, 50))
