"""Image files as the readers, writers and the dataset meet them: size, safe opening, paths.

Pixels are used as stored: EXIF orientation is not applied, so sizes and boxes refer to
the raw pixel grid (what ``PIL.Image.open`` reports), the same grid every reader checks.
"""

from __future__ import annotations

import glob
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from PIL import Image

from model.data.records import DatasetError

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


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, without decoding the pixels.

    Raises:
        OSError, DecompressionBombWarning, DecompressionBombError: see ``describe_image_error``.
    """
    with _open_checked(path) as image:
        return image.size


def open_rgb(path: Path) -> Image.Image:
    """Decode an image to RGB (palette, grey and alpha images are converted).

    Raises:
        DatasetError: naming the file, if it is missing, corrupt, truncated or a decompression bomb.
    """
    try:
        with _open_checked(path) as image:
            return image.convert("RGB")
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
