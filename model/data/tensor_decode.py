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
from typing import cast

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


class ImageDecodeError(ValueError):
    """One image of a batch could not be decoded; ``index`` is its position in the batch."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"image {index}: {reason}")
        self.index = index


class ImageTooLarge(ImageDecodeError):
    """One image of a batch has more pixels than allowed (checked on its header, before decoding)."""


def decode_images(
    data: Sequence[bytes], device: torch.device | str = "cpu", max_pixels: int | None = None
) -> list[torch.Tensor]:
    """Each encoded image as uint8 Tensor[3, H, W] on ``device``: RGB, its EXIF orientation applied.

    ``max_pixels``: the most pixels an image may have, checked on its header before anything is
    decoded (default: Pillow's ``Image.MAX_IMAGE_PIXELS``).

    Raises:
        ImageTooLarge: naming an image with more than ``max_pixels`` pixels;
        ImageDecodeError: naming an image that is not one, or is corrupt (headers are all read
            before any JPEG is decoded: a bad header is named before a corrupt JPEG earlier on).
        Either way nothing of the batch is returned.
        torch.cuda.OutOfMemoryError: the device's, passed on as it is.
    """
    device = torch.device(device)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    decoded: list[torch.Tensor | None] = [None] * len(data)
    jpegs: list[int] = []
    orientations = []
    for i, encoded in enumerate(data):
        try:
            with Image.open(io.BytesIO(encoded)) as image:  # the header only
                if limit and image.width * image.height > limit:
                    raise ImageTooLarge(i, f"{image.width}x{image.height} pixels is over the limit of {limit}")
                orientations.append(exif_orientation(image))
                if image.format == "JPEG" and image.mode in _JPEG_MODES:
                    jpegs.append(i)
                else:
                    decoded[i] = F.pil_to_tensor(decode_rgb(image, orientation=1)).to(device, non_blocking=True)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(i, str(error)) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageDecodeError(i, f"not a readable image ({error})") from error
    for i, tensor in zip(jpegs, _decode_jpegs([data[i] for i in jpegs], device), strict=True):
        if isinstance(tensor, Exception):
            raise ImageDecodeError(i, f"the JPEG decoder refused it ({tensor})") from tensor
        decoded[i] = tensor
    filled = cast(list[torch.Tensor], decoded)  # every slot by now: by Pillow above, or by the JPEG decoder
    return [orient(tensor, orientation) for tensor, orientation in zip(filled, orientations, strict=True)]


def _decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | Exception]:
    """``decode_jpeg`` on all of ``data`` as one batch; if the batch fails, image by image, so the
    refused one is named and the others are not blamed for it."""
    if not data:
        return []
    raw = [torch.frombuffer(bytearray(encoded), dtype=torch.uint8) for encoded in data]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except torch.cuda.OutOfMemoryError:
            raise  # the device's fault, not an image's
        except RuntimeError:
            results: list[torch.Tensor | Exception] = []
            for one in raw:
                try:
                    results.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as error:
                    results.append(error)
            return results
