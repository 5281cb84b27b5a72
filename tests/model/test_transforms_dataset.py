"""Transforms keep boxes on their objects; the Dataset, collation and the train/val split."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.data import (
    AnnotatedImage,
    DatasetError,
    DetectionDataset,
    SeededSampler,
    collate_detections,
    eval_transforms,
    make_shapes_dataset,
    split_train_val,
    train_transforms,
)
from model.data.transforms import IoUCropWithBoxes

S = 64


def _record(tmp_path: Path, boxes: list[list[float]], size=(60, 40), name="img.png") -> AnnotatedImage:
    """A black image with a white rectangle on each box, saved as PNG (exact pixels)."""
    image = Image.new("RGB", size, (0, 0, 0))
    for x1, y1, x2, y2 in boxes:
        image.paste((255, 255, 255), (int(x1), int(y1), int(x2), int(y2)))
    path = tmp_path / name
    image.save(path)
    return AnnotatedImage(
        path=path,
        width=size[0],
        height=size[1],
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.arange(1, len(boxes) + 1, dtype=torch.int64),
    )


def _bright_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy pixel box around the bright pixels of a uint8 [3, H, W] image."""
    mask = image.float().mean(dim=0) > 127
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()


def test_eval_resize_scales_boxes_exactly(tmp_path):
    record = _record(tmp_path, [[6, 4, 30, 20]], size=(60, 40))
    image, boxes, labels = DetectionDataset([record], eval_transforms(S))[0]
    assert image.shape == (3, S, S) and image.dtype == torch.uint8
    torch.testing.assert_close(boxes, torch.tensor([[6 / 60, 4 / 40, 30 / 60, 20 / 40]]))
    torch.testing.assert_close(labels, torch.tensor([1]))


def test_horizontal_flip_mirrors_the_box(tmp_path):
    record = _record(tmp_path, [[6, 4, 30, 20]], size=(60, 40))
    flip_then_resize = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Resize((S, S))])
    image, boxes, _ = DetectionDataset([record], flip_then_resize)[0]
    torch.testing.assert_close(boxes, torch.tensor([[1 - 30 / 60, 4 / 40, 1 - 6 / 60, 20 / 40]]))
    torch.testing.assert_close(_bright_box(image) / S, boxes[0], atol=2 / S, rtol=0)


def test_geometric_train_transforms_keep_each_box_on_its_object(tmp_path):
    record = _record(tmp_path, [[12, 8, 40, 30]], size=(60, 40))
    # The loader's steps are all geometric (colours are distorted later, on the batch): the object
    # stays the only bright thing.
    dataset = DetectionDataset([record], train_transforms(S, fill=(0, 0, 0)))
    kept = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, boxes, labels = dataset[0]
        assert image.shape == (3, S, S) and image.dtype == torch.uint8
        assert boxes.shape[0] == labels.shape[0] <= 1
        if boxes.shape[0] == 1:
            kept += 1
            torch.testing.assert_close(_bright_box(image), boxes[0] * S, atol=2.0, rtol=0)
    assert kept > 20


def test_full_train_transforms_give_normalised_boxes_and_matching_labels(tmp_path):
    record = _record(tmp_path, [[2, 2, 20, 12], [30, 10, 58, 38]], size=(60, 40))
    dataset = DetectionDataset([record], train_transforms(S, fill=(123, 117, 104)))
    torch.manual_seed(0)
    for _ in range(20):
        image, boxes, labels = dataset[0]
        assert image.shape == (3, S, S) and image.dtype == torch.uint8
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (labels.shape[0], 4)
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert set(labels.tolist()) <= {1, 2}


def test_images_without_boxes_pass_through_train_transforms(tmp_path):
    dataset = DetectionDataset([_record(tmp_path, [])], train_transforms(S, fill=(123, 117, 104)))
    torch.manual_seed(0)
    for _ in range(20):
        image, boxes, labels = dataset[0]
        assert image.shape == (3, S, S)
        assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_iou_crop_leaves_images_without_boxes_unchanged_at_once():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(30, 50))}
    # Plain RandomIoUCrop would draw random crops until it happened on "keep the image".
    rng_state = torch.get_rng_state()
    out_image, out_target = IoUCropWithBoxes()(image, target)
    torch.testing.assert_close(torch.get_rng_state(), rng_state)
    torch.testing.assert_close(out_image, image)
    assert out_target["boxes"].shape == (0, 4)


def _crop_draws(transform: v2.RandomIoUCrop, count: int, seed: int) -> torch.Tensor:
    """Float64 Tensor[count, 6] of (left, top, width, height, area, kept whole) drawn on a 160x120 image
    with two boxes; the whole image for the "keep it" option."""
    image = tv_tensors.Image(torch.zeros(3, 120, 160, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[10, 10, 50, 40], [90, 60, 150, 115]], format="XYXY", canvas_size=(120, 160))
    torch.manual_seed(seed)
    rows = []
    for _ in range(count):
        params = transform.make_params([image, boxes])
        left, top, width, height = (
            params.get(k, d) for k, d in (("left", 0), ("top", 0), ("width", 160), ("height", 120))
        )
        rows.append((left, top, width, height, width * height, float(not params)))
        if params:  # the boxes kept are exactly those whose centre is strictly inside the crop
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = (centres[:, 0] > left) & (centres[:, 0] < left + width)
            inside &= (centres[:, 1] > top) & (centres[:, 1] < top + height)
            assert torch.equal(params["is_within_crop_area"], inside)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.slow
def test_iou_crop_draws_crops_as_torchvisions_does():
    count = 1500
    ours, theirs = _crop_draws(IoUCropWithBoxes(), count, seed=0), _crop_draws(v2.RandomIoUCrop(), count, seed=1)
    # Each statistic's means agree within 4.5 standard errors of their difference.
    spread = ((ours.var(dim=0) + theirs.var(dim=0)) / count).sqrt()
    assert ((ours.mean(dim=0) - theirs.mean(dim=0)).abs() <= 4.5 * spread).all(), (ours.mean(0), theirs.mean(0))
    for column in range(4):  # and so do their quartiles, within a tenth of the range
        quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        a, b = ours[:, column].quantile(quartiles), theirs[:, column].quantile(quartiles)
        assert ((a - b).abs() <= 0.1 * theirs[:, column].max()).all(), (column, a, b)


def test_dataset_with_train_transforms_survives_pickling(tmp_path):
    dataset = DetectionDataset([_record(tmp_path, [[6, 4, 30, 20]])], train_transforms(S, fill=(1, 2, 3)))
    again = pickle.loads(pickle.dumps(dataset))
    image, boxes, labels = again[0]
    assert image.shape == (3, S, S) and boxes.shape[0] == labels.shape[0]


def test_dataset_reports_unreadable_images_and_size_changes(tmp_path, monkeypatch):
    record = _record(tmp_path, [[6, 4, 30, 20]])
    resized = AnnotatedImage(record.path, 61, 40, record.boxes, record.labels)
    with pytest.raises(DatasetError, match=r"img.png: image is 60x40 but was annotated as 61x40"):
        DetectionDataset([resized], eval_transforms(S))[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 60x40 = 2400 pixels: a bomb warning
    with pytest.raises(DatasetError, match=re.escape("img.png: image has too many pixels")):
        DetectionDataset([record], eval_transforms(S))[0]
    monkeypatch.undo()
    record.path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=re.escape("img.png: not a readable image")):
        DetectionDataset([record], eval_transforms(S))[0]


def test_collate_pads_boxes_with_zeros_and_label_zero():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    two = (image, torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.4, 0.9]]), torch.tensor([3, 1]))
    none = (image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    images, boxes, labels = collate_detections([two, none])
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    torch.testing.assert_close(boxes[0], two[1])
    torch.testing.assert_close(boxes[1], torch.zeros(2, 4))
    torch.testing.assert_close(labels, torch.tensor([[3, 1], [0, 0]]))

    _, boxes, labels = collate_detections([none, none])
    assert boxes.shape == (2, 1, 4) and labels.shape == (2, 1)
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert not labels.any()


def test_dataloader_batches_with_collate(tmp_path):
    records = [_record(tmp_path, [[6, 4, 30, 20]] * n, name=f"{n}.png") for n in (0, 1, 3)]
    loader = torch.utils.data.DataLoader(
        DetectionDataset(records, eval_transforms(S)), batch_size=3, collate_fn=collate_detections
    )
    images, boxes, labels = next(iter(loader))
    assert images.shape == (3, 3, S, S) and boxes.shape == (3, 3, 4)
    torch.testing.assert_close((labels > 0).sum(dim=1), torch.tensor([0, 1, 3]))


@pytest.mark.parametrize(
    "num_images, val_fraction, val_count",
    [(10, 0.1, 1), (10, 0.3, 3), (100, 0.15, 15), (2, 0.1, 1), (5, 0.01, 1), (3, 0.9, 2), (1, 0.5, 0), (8, 0.0, 0)],
)
def test_split_sizes(num_images, val_fraction, val_count):
    train, val = split_train_val(num_images, val_fraction, seed=0)
    assert len(val) == val_count
    assert sorted(train + val) == list(range(num_images))
    assert not set(train) & set(val)


def test_split_is_deterministic_per_seed():
    assert split_train_val(50, 0.2, seed=1) == split_train_val(50, 0.2, seed=1)
    assert split_train_val(50, 0.2, seed=1) != split_train_val(50, 0.2, seed=2)
    assert split_train_val(0, 0.2, seed=0) == ([], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(10, 1.0, seed=0)


def _epoch_batches(data, num_workers: int, epochs: list[int]) -> list[list]:
    from model.config import ModelConfig, TrainConfig
    from model.training import build_loaders, epoch_seed

    config = TrainConfig(batch_size=3, num_workers=num_workers, val_fraction=0.0, seed=5)
    loader, _ = build_loaders(data, config, ModelConfig(num_classes=4), torch.device("cpu"))
    batches = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch_seed(config.seed, epoch))
        batches.append([[t.clone() for t in batch] for batch in loader])
    return batches


def test_augmentation_follows_the_epoch_seed_whatever_the_loader_workers(tmp_path):
    data = make_shapes_dataset(tmp_path, 7, seed=2, image_size=(80, 120))
    alone = _epoch_batches(data, 0, [1, 2])
    with_workers = _epoch_batches(data, 2, [1, 2])  # persistent workers, kept from epoch 1 to epoch 2
    assert [len(epoch) for epoch in alone] == [3, 3]
    for epoch_alone, epoch_workers in zip(alone, with_workers, strict=True):
        for batch_alone, batch_workers in zip(epoch_alone, epoch_workers, strict=True):
            for a, b in zip(batch_alone, batch_workers, strict=True):
                assert torch.equal(a, b)
    assert not torch.equal(alone[0][0][0], alone[1][0][0])  # each epoch draws anew


def test_a_seeded_sampler_skips_to_where_a_paused_epoch_stopped():
    sampler = SeededSampler(10)
    sampler.set_epoch(123)
    whole = list(sampler)
    assert sorted(index for index, _ in whole) == list(range(10))
    sampler.set_epoch(123, skip=4)
    assert len(sampler) == 6 and list(sampler) == whole[4:]
    sampler.set_epoch(124)
    assert list(sampler) != whole


def test_a_seeded_sample_leaves_the_callers_random_state_alone(tmp_path):
    data = make_shapes_dataset(tmp_path, 2, seed=1, image_size=(64, 64))
    dataset = DetectionDataset(data.images, train_transforms(64, (0, 0, 0)))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = dataset[(1, 99)]
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[(1, 99)], strict=True))
