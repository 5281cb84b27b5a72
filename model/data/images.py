"""Image files as the readers, writers, the dataset, ``ssd detect`` and ``/detect`` meet them.

One decoding rule (``decode_rgb``) for every path that turns a file into pixels: the image
as displayed, that is with its EXIF orientation applied (as OpenCV's ``imread`` and
Pillow's ``ImageOps.exif_transpose`` do), converted to RGB. Sizes and boxes refer to that
displayed image. The orientation is read from the file's header only (``exif_orientation``),
so reading it costs microseconds, never a decode.

One exception, decided once when a dataset is read (``annotated_frame``): a COCO or VOC
annotation that declares the stored size, not the displayed one, was drawn on the stored
pixels, so that image is used as stored (its record's ``orientation`` is 1).
"""

from __future__ import annotations

import glob
import shutil
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from model.data.annotations import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@contextmanager
def _open_checked(path: Path) -> Iterator[Image.Image]:
    """Open an image lazily (header only) with decompression bombs as errors, not warnings.

    Raises:
        OSError: not an image, truncated or unreadable (``PIL.UnidentifiedImageError`` is one).
        PIL.Image.DecompressionBombWarning / DecompressionBombError: too many pixels.
    """
    # PIL only warns above MAX_IMAGE_PIXELS (and raises above twice that). The warning filter
    # is process-wide state that concurrent threads restore under each other, so the size
    # check below is the guard; the filter only stops the warning from reaching logs.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{image.width}x{image.height} pixels is over the limit of {Image.MAX_IMAGE_PIXELS}"
                )
            yield image


def describe_image_error(error: Exception) -> str:
    """A short reason for an image that cannot be used, for a problem message."""
    if isinstance(error, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"image has too many pixels (possible decompression bomb): {error}"
    if isinstance(error, FileNotFoundError):
        return "image file not found"
    return f"not a readable image ({type(error).__name__}: {error})"


# EXIF tag 0x0112 (Orientation, 274): how the stored pixels are turned for display. Each
# value maps to the PIL transpose that shows them upright, the table of
# ``PIL.ImageOps.exif_transpose``; 5-8 swap width and height.
ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1-8 (1 = as stored), from what its header holds; 1 if absent or invalid.

    Reads the EXIF block that ``Image.open`` already has (JPEG, WebP, PNG's eXIf before the
    pixel data, TIFF tags; XMP's ``tiff:Orientation`` where EXIF has none), never the pixels.
    """
    # Image.getexif, not the PNG plugin's override: that one decodes the whole image to look
    # for an eXIf chunk after the pixel data, which would make this cost a decode. Reading
    # the header only is also what makes the rule the same before and after decoding.
    try:
        value = Image.Image.getexif(image).get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):  # corrupt EXIF
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """``(width, height)`` of a ``width`` x ``height`` stored image once ``orientation`` is applied."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: its stored size and its EXIF orientation."""

    width: int
    height: int
    orientation: int = 1

    @property
    def stored_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def displayed_size(self) -> tuple[int, int]:
        return displayed_size(self.width, self.height, self.orientation)


def read_image_header(path: Path) -> ImageHeader:
    """Stored size and EXIF orientation of an image, without decoding the pixels.

    Raises:
        OSError, DecompressionBombWarning, DecompressionBombError: see ``describe_image_error``.
    """
    with _open_checked(path) as image:
        return ImageHeader(image.width, image.height, exif_orientation(image))


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the stored pixels from the header (before any EXIF orientation).

    Raises:
        OSError, DecompressionBombWarning, DecompressionBombError: see ``describe_image_error``.
    """
    return read_image_header(path).stored_size


def annotated_frame(header: ImageHeader, declared: tuple[float, float] | None) -> tuple[int, int, int] | None:
    """The frame an annotation's boxes refer to: ``(width, height, orientation to apply)``.

    The image as displayed, unless ``declared`` (the size the annotation file gives, None if
    it gives none) is the stored size and not the displayed one: then the boxes were drawn on
    the stored pixels and the image is used as stored (orientation 1). Where both sizes agree
    (no orientation, a mirror or 180-degree turn, a square image) the displayed image is meant.

    Returns:
        None if ``declared`` is neither size.
    """
    if declared is None or tuple(declared) == header.displayed_size:
        return (*header.displayed_size, header.orientation)
    if tuple(declared) == header.stored_size:
        return (*header.stored_size, 1)
    return None


def wrong_size_problem(path: Path, header: ImageHeader) -> str:
    """The end of a problem message for a declared size that is neither of ``path``'s sizes."""
    width, height = header.displayed_size
    message = f"but the file {path} is {width}x{height}"
    if header.displayed_size != header.stored_size:
        message += f" as displayed ({header.width}x{header.height} as stored, EXIF orientation {header.orientation})"
    return message


def stored_frame_warning(path: Path, header: ImageHeader) -> str:
    """The end of a warning for a declared size that is ``path``'s stored size, not its displayed one."""
    width, height = header.displayed_size
    return (
        f"is the stored size of {path}, which its EXIF orientation {header.orientation} displays as "
        f"{width}x{height}: the boxes were drawn on the stored pixels, so this image is used as stored (not turned)"
    )


def decode_rgb(image: Image.Image, orientation: int | None = None) -> Image.Image:
    """Decode an opened image into RGB pixels as displayed: the one decoding rule of the project.

    Args:
        image: as ``Image.open`` returns it (pixels not yet loaded).
        orientation: the EXIF orientation to apply (1 = the pixels as stored); None, the
            default, reads it from the image's header (``exif_orientation``).

    Returns:
        An RGB image; for orientations 5-8 its width and height are the stored ones swapped.

    Raises:
        Whatever decoding raises: OSError (truncated, corrupt), DecompressionBombError...
    """
    if orientation is None:
        orientation = exif_orientation(image)
    rgb = image.convert("RGB")  # palette, grey, 16-bit and alpha images alike; loads the pixels
    method = _TRANSPOSE.get(orientation)
    return rgb if method is None else rgb.transpose(method)


def open_rgb(path: Path, orientation: int | None = None) -> Image.Image:
    """Decode an image file with ``decode_rgb``: RGB, EXIF orientation applied (or ``orientation``, if given).

    Raises:
        DatasetError: naming the file, if it is missing, corrupt, truncated or a decompression bomb.
    """
    try:
        with _open_checked(path) as image:
            return decode_rgb(image, orientation)
    except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: {describe_image_error(error)}") from error


def safe_relative_path(name: str) -> PurePosixPath | None:
    """A file name from an annotation file as a relative path, or None if it could escape its folder.

    Dataset files come from users: an absolute name or a ``..`` component would let an
    annotation point the reader at any file on the machine.
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if not path.parts or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        return None
    return path


def find_by_stem(folder: Path, stem: str) -> Path | None:
    """The image in ``folder`` named ``stem`` plus any image suffix (case-insensitive), or None."""
    if not folder.is_dir():
        return None
    matches = sorted(
        p for p in folder.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    return matches[0] if matches else None


def export_names(paths: Sequence[Path]) -> list[str]:
    """File names for copying ``paths`` into one folder: their own names if unique, else numbered.

    Numbered names (``000000.jpg``...) keep the original suffix; stems stay unique too, which
    VOC needs because each image's XML is named after its stem.
    """
    names = [path.name for path in paths]
    stems = {path.stem for path in paths}
    if len(stems) == len(paths):
        return names
    return [f"{index:06d}{path.suffix.lower()}" for index, path in enumerate(paths)]


def copy_image(source: Path, destination: Path) -> None:
    """Copy an image file for a writer, leaving it alone if it is already at ``destination``."""
    if destination.exists() and destination.resolve() == Path(source).resolve():
        return
    shutil.copyfile(source, destination)
