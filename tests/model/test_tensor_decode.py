"""Batched decoding to tensors (``model.data.tensor_decode``) against Pillow's ``exif_transpose`` and the
project's one decoding rule (``decode_rgb``): every orientation, JPEG and other formats, grey and CMYK
JPEGs. On CUDA the JPEGs go through nvJPEG with the same orientation code checked here on CPU tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model.config import ModelConfig
from model.data.images import decode_rgb
from model.data.tensor_decode import ImageDecodeError, ImageTooLarge, decode_images, orient
from model.detector import Detector
from model.network import SSD300


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _asymmetric(width: int = 48, height: int = 32, mode: str = "RGB") -> Image.Image:
    """A picture whose every flip and rotation differs: a gradient with a bright corner block."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, 0 * x + y, (x + y) / 2], axis=-1).astype(np.uint8)
    pixels[:8, :12] = 255
    return Image.fromarray(pixels).convert(mode)


def _encoded(image: Image.Image, fmt: str, orientation: int = 1) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    image.save(buffer, format=fmt, exif=_exif(orientation), **options)
    return buffer.getvalue()


def _reference(data: bytes) -> torch.Tensor:
    """What the project's one rule gives: Pillow's decode, EXIF orientation applied, RGB."""
    return torch.from_numpy(np.array(decode_rgb(Image.open(io.BytesIO(data))))).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pillows_exif_transpose(orientation):
    stored = _asymmetric()
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=_exif(orientation))
    expected = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    oriented = orient(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation)
    assert torch.equal(oriented.permute(1, 2, 0), torch.from_numpy(expected))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_batch_of_every_format_decodes_as_the_one_rule_does(orientation):
    images = [
        _encoded(_asymmetric(), "JPEG", orientation),
        _encoded(_asymmetric(40, 24, "L"), "JPEG", orientation),  # grey JPEG: three equal channels
        _encoded(_asymmetric(40, 24, "CMYK"), "JPEG", orientation),  # Pillow decodes those
        _encoded(_asymmetric(), "PNG", orientation),
        _encoded(_asymmetric(20, 30), "WEBP", orientation),
    ]
    decoded = decode_images(images, "cpu")
    for data, tensor in zip(images, decoded, strict=True):
        expected = _reference(data)
        assert tensor.dtype == torch.uint8 and tensor.shape == expected.shape
        # The same libjpeg-turbo may upsample chroma differently: a level or two, on edges only.
        difference = (tensor.int() - expected.int()).abs()
        assert difference.float().mean() < 1.0 and difference.max() <= 16, Image.open(io.BytesIO(data)).format


def test_a_corrupt_image_or_one_over_the_pixel_limit_is_an_error_naming_it():
    good = _encoded(_asymmetric(), "JPEG")
    with pytest.raises(ImageDecodeError, match="image 1: not a readable image") as raised:
        decode_images([good, b"not an image"])
    assert raised.value.index == 1
    with pytest.raises(ImageTooLarge, match="image 0: 48x32 pixels is over the limit of 1535"):
        decode_images([good], max_pixels=48 * 32 - 1)


def test_a_jpeg_the_decoder_refuses_is_named_and_the_others_are_not_blamed():
    good = _encoded(_asymmetric(), "JPEG")
    start_of_scan = good.index(b"\xff\xda")
    cut_in_its_pixels, cut_in_its_header = good[: start_of_scan + 20], good[: start_of_scan // 2]
    with pytest.raises(ImageDecodeError, match="image 1: the JPEG decoder refused it") as raised:
        decode_images([good, cut_in_its_pixels, good])  # Pillow reads its header: the batch decode refuses it
    assert raised.value.index == 1
    with pytest.raises(ImageDecodeError, match="image 2: not a readable image"):
        decode_images([good, good, cut_in_its_header])


def test_the_detector_gives_the_same_boxes_from_bytes_as_from_pillow_images():
    torch.manual_seed(0)
    model = SSD300(ModelConfig(num_classes=3, width_multiplier=0.125)).eval()
    detector = Detector(model, ["a", "b"], "cpu")
    images = [_encoded(_asymmetric(64, 48), "PNG", orientation) for orientation in (1, 6)]
    from_bytes = detector.detect_encoded(images, score_threshold=0.01)
    from_pillow = detector.detect([decode_rgb(Image.open(io.BytesIO(data))) for data in images], score_threshold=0.01)
    assert from_bytes == from_pillow
