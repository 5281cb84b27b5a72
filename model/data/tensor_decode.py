"""Encoded images (the bytes of files or uploads) to uint8 tensors on a device, many at a time.

The same rule as ``images.decode_rgb`` (RGB, EXIF orientation applied), with the pixels
decoded where the model runs: JPEGs go through torchvision's ``decode_jpeg`` as one batch,
which on a CUDA device is nvJPEG on the GPU (the host only reads headers); other formats, and
JPEGs nvJPEG does not take (CMYK, multi-picture files), are decoded by Pillow and copied over.
The orientation is read from each header (``images.exif_orientation``) and applied to the
decoded tensor, because nvJPEG does not apply it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from model.data.images import decode_rgb, exif_orientation

# What nvJPEG (and torchvision's CPU decoder) decode as RGB: Pillow's modes of baseline and
# progressive JPEGs, colour or grey.
_JPEG_MODES = ("RGB", "L")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Tensor[..., H, W] as displayed under EXIF ``orientation`` (1-8), like ``Image.transpose`` does
    for ``decode_rgb``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
    7 transverse, 8 rotate 90 counter-clockwise."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


def decode_images(
    data: Sequence[bytes], device: torch.device | str = "cpu", max_pixels: int | None = None
) -> list[torch.Tensor]:
    """Each encoded image as uint8 Tensor[3, H, W] on ``device``: RGB, its EXIF orientation applied.

    ``max_pixels``: the most pixels an image may have, checked on its header before anything is
    decoded (default: Pillow's ``Image.MAX_IMAGE_PIXELS``).

    Raises:
        OSError: an image that is not one, or is truncated (``PIL.UnidentifiedImageError`` is one);
        PIL.Image.DecompressionBombError: an image over ``max_pixels``;
        RuntimeError: a JPEG the decoder refuses.
    """
    device = torch.device(device)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    decoded: list[torch.Tensor | None] = [None] * len(data)
    jpegs: list[int] = []
    orientations = []
    for i, encoded in enumerate(data):
        with Image.open(io.BytesIO(encoded)) as image:  # the header only
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels is over the limit of {limit}")
            orientations.append(exif_orientation(image))
            if image.format == "JPEG" and image.mode in _JPEG_MODES:
                jpegs.append(i)
            else:
                decoded[i] = F.pil_to_tensor(decode_rgb(image, orientation=1)).to(device, non_blocking=True)
    if jpegs:
        raw = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpegs]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            pixels = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        for i, tensor in zip(jpegs, pixels, strict=True):
            decoded[i] = tensor
    return [orient(tensor, orientation) for tensor, orientation in zip(decoded, orientations, strict=True)]
