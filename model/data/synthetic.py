"""A synthetic detection dataset of coloured shapes on textured backgrounds, for demos and tests.

Images are JPEG (quality 95, no chroma subsampling): like real photos, and small and fast
to write. Boxes are measured on the drawn shape before compression, so they are exact
for the shape; JPEG only softens its edge by a pixel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.data.annotations import AnnotatedImage, DetectionData
from model.data.coco import write_coco

CLASSES = ("circle", "square", "triangle")  # alphabetical, so COCO and VOC readers number them alike
MAX_OBJECTS = 4
SIZE_RANGE = (0.12, 0.45)  # shape size as a share of the image's short side
MAX_SHARED = 0.25  # most of a box's area another box may cover: shapes overlap but stay visible
MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and the mean colour under it


def make_shapes_dataset(
    folder: Path, num_images: int, seed: int = 0, image_size: tuple[int, int] = (240, 400)
) -> DetectionData:
    """Draw ``num_images`` images of circles, squares and triangles and write them as COCO.

    Writes ``folder/images/000000.jpg``... and ``folder/annotations.json``. Each image's
    width and height are drawn independently from ``image_size = (min, max)`` pixels; it
    holds 1-4 shapes, each 12-45% of the short side, none more than a quarter covered.
    Everything depends only on ``seed``: the same seed gives byte-identical annotations.

    Returns:
        ``DetectionData`` with classes ``["circle", "square", "triangle"]`` (ids 1, 2, 3) and
        tight integer boxes, absolute xyxy pixels, float32 Tensor[N, 4].
    """
    low, high = image_size
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 16 <= low <= high:
        raise ValueError(f"image_size must be (min, max) with 16 <= min <= max, got {image_size}")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_images):
        width, height = _draw_size(rng, low, high)
        image = Image.fromarray(_background(rng, width, height))
        _draw_lines(rng, image)
        boxes, labels = _draw_shapes(rng, image)
        path = (image_dir / f"{index:06d}.jpg").resolve()
        image.save(path, quality=95, subsampling=0)
        records.append(
            AnnotatedImage(
                path=path,
                width=width,
                height=height,
                boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                labels=torch.tensor(labels, dtype=torch.int64),
                orientation=1,  # written without EXIF
            )
        )
    data = DetectionData(classes=list(CLASSES), images=records, format="coco")
    write_coco(data, folder)
    return data


def _draw_size(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
    if width == height and low < high:  # keep every image non-square, so aspect handling is exercised
        height = height + 1 if height < high else height - 1
    return width, height


def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
    """float32 ``[size, cells]`` weights that linearly interpolate ``cells`` evenly spaced values to ``size``."""
    position = np.linspace(0, cells - 1, size, dtype=np.float32)
    first = np.minimum(position.astype(np.int64), cells - 2)
    weights = np.zeros((size, cells), dtype=np.float32)
    weights[np.arange(size), first] = 1 - (position - first)
    weights[np.arange(size), first + 1] = position - first
    return weights


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 ``[height, width, 3]``: a colour gradient, smooth colour patches, soft blobs and grain.

    Built channel-first as matrix products, so that each layer costs one BLAS call.
    """
    start, end = rng.uniform(0, 255, size=(2, 3, 1, 1)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    along = xs * math.cos(angle) + ys * math.sin(angle)
    along = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    image = start + (end - start) * along[None]
    # Smooth colour patches: a coarse random grid, bilinearly upsampled.
    grid = rng.normal(0, 30, size=(3, 4, 5)).astype(np.float32)
    image += _interpolation_matrix(height, 4) @ grid @ _interpolation_matrix(width, 5).T
    # Soft Gaussian blobs: texture without crisp edges, so nothing looks like a labelled shape.
    count = int(rng.integers(2, 6))
    centres = (rng.uniform(0, 1, size=(count, 2)) * (width, height)).astype(np.float32)
    sigmas = (rng.uniform(0.03, 0.12, size=count) * min(width, height)).astype(np.float32)
    colours = rng.uniform(-90, 90, size=(3, count)).astype(np.float32)
    across = np.exp(-((xs - centres[:, :1]) ** 2) / (2 * sigmas[:, None] ** 2))  # [count, width]
    down = np.exp(-((ys.T - centres[:, 1:]) ** 2) / (2 * sigmas[:, None] ** 2))  # [count, height]
    blobs = (down[:, :, None] * across[:, None, :]).reshape(count, -1)
    image += (colours @ blobs).reshape(3, height, width)
    image += rng.normal(0, 6, size=(1, height, width)).astype(np.float32)  # grey grain, like sensor noise
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _draw_lines(rng: np.random.Generator, image: Image.Image) -> None:
    """A few thin lines of random colours across the background, as clutter."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(int(rng.integers(1, 5))):
        points = rng.uniform(0, 1, size=(2, 2)) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([tuple(points[0]), tuple(points[1])], fill=colour, width=int(rng.integers(1, 3)))


def _shape_mask(rng: np.random.Generator, kind: int, image_size: tuple[int, int], side: float) -> Image.Image:
    """A mask (mode "L") of one shape of class ``CLASSES[kind]``, ``side`` pixels across, placed inside the image."""
    width, height = image_size
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    mask = Image.new("L", image_size, 0)
    draw = ImageDraw.Draw(mask)
    if CLASSES[kind] == "circle":
        draw.ellipse([x0, y0, x0 + side, y0 + side], fill=255)
    elif CLASSES[kind] == "square":
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=255)
    else:  # an equilateral triangle in the square's circle, turned at random
        turn = rng.uniform(0, 2 * math.pi)
        cx, cy, radius = x0 + side / 2, y0 + side / 2, side / 2
        corners = [
            (cx + radius * math.cos(turn + k * 2 * math.pi / 3), cy + radius * math.sin(turn + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(corners, fill=255)
    return mask


def _mask_box(mask: np.ndarray) -> list[int] | None:
    """Tight ``[x1, y1, x2, y2]`` around a mask's pixels (x2, y2 one past the last pixel), or None if empty."""
    columns, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if columns.size == 0 or rows.size == 0:
        return None
    return [int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1]


def _overlaps_little(box: list[int], others: list[list[int]]) -> bool:
    """True if no box shares more than ``MAX_SHARED`` of either box's area with ``box``."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in others:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            other_area = (other[2] - other[0]) * (other[3] - other[1])
            if iw * ih > MAX_SHARED * min(area, other_area):
                return False
    return True


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough (RGB distance) from ``under``'s mean colour, ``under`` being an array [P, 3]."""
    candidates = rng.integers(0, 256, size=(16, 3))
    distance = np.linalg.norm(candidates - under.mean(axis=0), axis=1)
    good = np.flatnonzero(distance >= MIN_CONTRAST)
    chosen = candidates[good[0]] if good.size else candidates[int(np.argmax(distance))]
    red, green, blue = (int(c) for c in chosen)
    return red, green, blue


def _draw_shapes(rng: np.random.Generator, image: Image.Image) -> tuple[list[list[int]], list[int]]:
    """Draw 1-4 shapes onto ``image``; their tight integer xyxy boxes and 1-based labels."""
    short = min(image.size)
    boxes: list[list[int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(30):
            kind = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(rng, kind, image.size, rng.uniform(*SIZE_RANGE) * short)
            pixels = np.asarray(mask) > 0
            box = _mask_box(pixels)
            if box is not None and _overlaps_little(box, boxes):
                break
        else:
            continue  # no free place found: this image gets fewer shapes
        colour = _contrasting_colour(rng, np.asarray(image)[pixels].astype(np.float32))
        x1, y1, x2, y2 = box
        image.paste(colour, box=(x1, y1, x2, y2), mask=mask.crop((x1, y1, x2, y2)))
        boxes.append(box)
        labels.append(kind + 1)
    return boxes, labels
