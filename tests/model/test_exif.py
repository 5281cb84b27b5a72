"""One image-decoding rule: EXIF orientation applied alike by the readers, training, ``ssd detect`` and
/detect's ``decode_image``; and the one exception, a COCO or VOC record sized for the stored pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.inference import decode_image
from model.checkpoint import save_checkpoint
from model.cli import main
from model.config import ModelConfig
from model.data import (
    AnnotatedImage,
    DatasetError,
    DetectionData,
    DetectionDataset,
    eval_transforms,
    read_coco,
    read_voc,
    read_yolo,
    write_coco,
    write_voc,
    write_yolo,
)
from model.data.images import decode_rgb, exif_orientation, open_rgb, read_image_header
from model.network import SSD300

UPRIGHT = (60, 40)  # the image as displayed, width x height
BOX = [6.0, 4.0, 30.0, 20.0]  # a white rectangle on black, in the displayed frame
S = 64


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _upright() -> Image.Image:
    image = Image.new("RGB", UPRIGHT, (0, 0, 0))
    image.paste((255, 255, 255), tuple(int(v) for v in BOX))
    return image


def _phone_photo(path: Path) -> Path:
    """A JPEG that stores the upright image turned on its side, with EXIF orientation 6 to show it upright."""
    stored = _upright().transpose(Image.Transpose.ROTATE_90)  # 40x60; orientation 6 turns it back
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, format="JPEG", quality=100, subsampling=0, exif=_exif(6))
    return path


def _bright_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy pixel box around the bright pixels of a uint8 [3, H, W] image."""
    mask = image.float().mean(dim=0) > 127
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()


# --- the rule, against Pillow's reference ---------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "P", "LA"])
def test_decoding_matches_pillow_exif_transpose(tmp_path, orientation, mode):
    pixels = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path = tmp_path / "x.png"  # lossless, with an eXIf chunk
    image.save(path, exif=_exif(orientation))

    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    for decoded in (open_rgb(path), decode_rgb(Image.open(path))):
        assert decoded.mode == "RGB" and decoded.size == expected.size
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))
    header = read_image_header(path)
    assert (header.orientation, header.stored_size, header.displayed_size) == (orientation, (7, 5), expected.size)
    # An explicit orientation overrides the file's; 1 is the pixels as stored.
    np.testing.assert_array_equal(np.asarray(open_rgb(path, orientation=1)), np.asarray(image.convert("RGB")))


def test_the_orientation_comes_from_the_header_without_decoding(tmp_path):
    data = _phone_photo(tmp_path / "p.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    start_of_scan = data.index(b"\xff\xda")
    truncated.write_bytes(data[: start_of_scan + 20])  # the header whole, the pixel data cut: any decode fails
    assert exif_orientation(Image.open(truncated)) == 6
    assert read_image_header(truncated).displayed_size == UPRIGHT
    with pytest.raises(DatasetError, match="not a readable image"):
        open_rgb(truncated)


def test_an_unreadable_or_out_of_range_orientation_counts_as_none(tmp_path):
    for name, exif in (("garbage", b"Exif\x00\x00garbage"), ("nine", _exif(9)), ("zero", _exif(0))):
        path = tmp_path / f"{name}.jpg"
        Image.new("RGB", (6, 4)).save(path, exif=exif)
        assert exif_orientation(Image.open(path)) == 1, name
        assert open_rgb(path).size == (6, 4), name


def test_training_ssd_detect_and_the_api_decode_the_same_pixels(tmp_path):
    path = _phone_photo(tmp_path / "p.jpg")
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert reference.shape == (UPRIGHT[1], UPRIGHT[0], 3)
    from_api = decode_image(path.read_bytes(), max_pixels=10**6)  # /detect's decoding
    np.testing.assert_array_equal(np.asarray(from_api), reference)
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), reference)  # ssd detect's, evaluation's
    record = AnnotatedImage(path, *UPRIGHT, torch.tensor([BOX]), torch.tensor([1]), orientation=6)
    image, _, _ = DetectionDataset([record], lambda image, target: (image, target))[0]  # training's
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), reference)


# --- readers: boxes in the displayed frame, or the record's when it was made on the stored one ------


def _displayed_record(path: Path) -> DetectionData:
    record = AnnotatedImage(path, *UPRIGHT, torch.tensor([BOX]), torch.tensor([1]), orientation=6)
    return DetectionData(classes=["box"], images=[record])


@pytest.mark.parametrize(
    "write, read",
    [(write_coco, read_coco), (write_voc, read_voc), (write_yolo, read_yolo)],
    ids=["coco", "voc", "yolo"],
)
def test_training_targets_are_in_the_displayed_frame_for_every_format(tmp_path, write, read):
    data = read(write(_displayed_record(_phone_photo(tmp_path / "p.jpg")), tmp_path / "out"))
    (image,) = data.images
    assert (image.width, image.height, image.orientation) == (*UPRIGHT, 6)
    torch.testing.assert_close(image.boxes, torch.tensor([BOX]), rtol=0, atol=1e-4)
    assert data.warnings == []

    pixels, boxes, labels = DetectionDataset(data.images, eval_transforms(S))[0]
    scale = torch.tensor([S / UPRIGHT[0], S / UPRIGHT[1]] * 2)
    torch.testing.assert_close(boxes[0] * S, torch.tensor(BOX) * scale, rtol=0, atol=1e-3)
    # The white rectangle is where the target says (within the resize's one-pixel blur).
    torch.testing.assert_close(_bright_box(pixels), torch.tensor(BOX) * scale, rtol=0, atol=1.5)
    assert labels.tolist() == [1]


STORED_BOX = [4.0, 30.0, 20.0, 54.0]  # BOX as it lies in the stored 40x60 pixels


def _coco_on_stored_pixels(folder: Path) -> Path:
    _phone_photo(folder / "p.jpg")
    document = {
        "images": [{"id": 1, "file_name": "p.jpg", "width": 40, "height": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 30, 16, 24]}],
        "categories": [{"id": 1, "name": "box"}],
    }
    (folder / "annotations.json").write_text(json.dumps(document))
    return folder / "annotations.json"


def _voc_on_stored_pixels(folder: Path) -> Path:
    _phone_photo(folder / "JPEGImages" / "p.jpg")
    (folder / "Annotations").mkdir()
    (folder / "Annotations" / "p.xml").write_text(
        "<annotation><filename>p.jpg</filename><size><width>40</width><height>60</height></size>"
        "<object><name>box</name><bndbox><xmin>5</xmin><ymin>31</ymin><xmax>20</xmax><ymax>54</ymax></bndbox>"
        "</object></annotation>"
    )
    return folder


@pytest.mark.parametrize(
    "make, read", [(_coco_on_stored_pixels, read_coco), (_voc_on_stored_pixels, read_voc)], ids=["coco", "voc"]
)
def test_a_record_sized_for_the_stored_pixels_is_followed_and_warned_about(tmp_path, make, read):
    data = read(make(tmp_path))
    (image,) = data.images
    assert (image.width, image.height, image.orientation) == (40, 60, 1)
    torch.testing.assert_close(image.boxes, torch.tensor([STORED_BOX]))
    (warning,) = data.warnings
    assert "p.jpg" in warning and "40x60" in warning and "EXIF orientation 6" in warning
    assert "used as stored (not turned)" in warning

    pixels, boxes, _ = DetectionDataset(data.images, eval_transforms(S))[0]
    scale = torch.tensor([S / 40, S / 60] * 2)
    torch.testing.assert_close(_bright_box(pixels), torch.tensor(STORED_BOX) * scale, rtol=0, atol=1.5)
    torch.testing.assert_close(boxes[0] * S, torch.tensor(STORED_BOX) * scale, rtol=0, atol=1e-3)


def test_a_declared_size_that_is_neither_names_both(tmp_path):
    path = _coco_on_stored_pixels(tmp_path)
    document = json.loads(path.read_text())
    document["images"][0]["width"] = 41
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"declared size 41x60 but the file .*p.jpg is 60x40 as displayed"):
        read_coco(path)


# --- ssd detect: the displayed frame ---------------------------------------------------------


def test_ssd_detect_answers_in_the_displayed_frame(tmp_path, capsys):
    torch.manual_seed(0)
    model = SSD300(ModelConfig(num_classes=2, width_multiplier=0.125))
    checkpoint = tmp_path / "model.pt"
    state = {"epoch": 1, "classes": ["box"], "model_config": model.config.to_dict(), "model": model.state_dict()}
    save_checkpoint(checkpoint, state)
    photo = _phone_photo(tmp_path / "p.jpg")
    upright = tmp_path / "upright.png"  # the same pixels, already turned, without EXIF
    ImageOps.exif_transpose(Image.open(photo)).save(upright)

    args = ["detect", str(checkpoint), str(photo), str(upright), "--score-threshold", "0", "--max-detections", "5"]
    assert main([*args, "--device", "cpu", "--annotated-dir", str(tmp_path / "drawn")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found[str(photo)]["image"] == {"width": UPRIGHT[0], "height": UPRIGHT[1]}
    assert len(found[str(photo)]["detections"]) == 5
    assert found[str(photo)]["detections"] == found[str(upright)]["detections"]
    assert Image.open(tmp_path / "drawn" / "p.png").size == UPRIGHT
