"""COCO detection annotations (``instances_*.json`` layout): reader and writer.

COCO boxes are ``[x, y, width, height]`` in absolute pixels; they are converted to
``[x1, y1, x2, y2]`` on reading and back on writing. Category ids may be any integers:
classes are ordered by category id and renumbered 1..K.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.data.annotations import AnnotatedImage, DatasetError, DetectionData
from model.data.images import (
    annotated_frame,
    copy_image,
    describe_image_error,
    export_names,
    read_image_header,
    safe_relative_path,
    stored_frame_warning,
    wrong_size_problem,
)
from model.data.validate import check_box

_IMAGE_ERRORS = (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError)


@dataclass
class _Image:
    """One entry of ``images`` while its annotations are gathered."""

    path: Path
    width: int
    height: int
    orientation: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def read_coco(annotations_json: Path, images_dir: Path | None = None) -> DetectionData:
    """Read a COCO detection dataset.

    Image files are looked up by each image's ``file_name`` (a relative path, possibly with
    folders) in ``images_dir`` if given, else beside the JSON file and then in an ``images/``
    folder beside it; the bare file name is tried last in each place. Sizes come from the
    files' headers, as displayed (EXIF orientation applied), and must match the JSON's
    ``width``/``height`` where those are given; a declared size that is the stored one and not
    the displayed one means the image is used as stored (a warning says so).
    ``iscrowd=1`` annotations are skipped; images without annotations are kept (N = 0).
    Boxes up to 2 px outside the image are clipped.

    Returns:
        ``DetectionData(format="coco")``: boxes float32 Tensor[N, 4] absolute xyxy pixels,
        labels int64 Tensor[N] 1-based in category-id order; ``warnings`` as above.

    Raises:
        DatasetError: listing every problem found, each naming the file and annotation id.
    """
    annotations_json = Path(annotations_json)
    document = _load_json(annotations_json)
    where = str(annotations_json)
    problems: list[str] = []
    warnings: list[str] = []
    classes, label_of = _read_categories(document["categories"], where, problems)
    search_dirs = (
        [Path(images_dir)] if images_dir is not None else [annotations_json.parent, annotations_json.parent / "images"]
    )
    images, rejected = _read_images(document["images"], search_dirs, where, problems, warnings)
    _read_annotations(document["annotations"], images, rejected, label_of, where, problems)
    if problems:
        raise DatasetError(problems)
    records = [
        AnnotatedImage(
            path=image.path,
            width=image.width,
            height=image.height,
            boxes=torch.tensor(image.boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(image.labels, dtype=torch.int64),
            orientation=image.orientation,
        )
        for image in images.values()
    ]
    return DetectionData(classes=classes, images=records, format="coco", warnings=warnings)


# The JSON is parsed whole in memory (about 10x its size): COCO's own largest annotation
# file is under 0.5 GB, so 1 GiB leaves room without letting an upload exhaust memory.
MAX_ANNOTATION_BYTES = 2**30


def _load_json(path: Path) -> dict[str, Any]:
    """The parsed annotation file, with its three required top-level lists present."""
    try:
        size = path.stat().st_size
        if size > MAX_ANNOTATION_BYTES:
            raise DatasetError(f"{path}: annotation file of {size} bytes is over the limit of {MAX_ANNOTATION_BYTES}")
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: annotation file not found") from error
    except RecursionError as error:
        raise DatasetError(f"{path}: malformed JSON: nested too deeply") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read annotation file: {error}") from error
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: malformed JSON: {error}") from error
    if not isinstance(document, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(document.get(key), list)]
    if missing:
        raise DatasetError(f"{path}: missing required key(s) {missing} (each must be a list)")
    return document


def _missing_keys(entry: Any, keys: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return list(keys)
    return [key for key in keys if key not in entry]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """COCO ids are integers; strings are accepted too, as some exporters write them."""
    return _is_int(value) or isinstance(value, str)


def _read_categories(entries: list[Any], where: str, problems: list[str]) -> tuple[list[str], dict[int, int]]:
    """Class names in category-id order and the map from category id to 1-based label."""
    names: dict[int, str] = {}
    for index, entry in enumerate(entries):
        missing = _missing_keys(entry, ("id", "name"))
        if missing:
            problems.append(f"{where}: category #{index} is missing required key(s) {missing}")
        elif not _is_int(entry["id"]) or not isinstance(entry["name"], str):
            problems.append(f"{where}: category #{index} needs an integer 'id' and a string 'name'")
        elif entry["id"] in names:
            problems.append(f"{where}: category id {entry['id']} is listed twice")
        else:
            names[entry["id"]] = entry["name"]
    ids = sorted(names)
    classes = [names[i] for i in ids]
    for name in sorted({n for n in classes if classes.count(n) > 1}):
        problems.append(f"{where}: category name {name!r} is used by more than one category id")
    return classes, {category_id: label for label, category_id in enumerate(ids, start=1)}


def _find_image(file_name: str, search_dirs: list[Path]) -> Path | None:
    relative = safe_relative_path(file_name)
    if relative is None:
        return None
    for folder in search_dirs:
        for candidate in (folder / relative, folder / relative.name):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _read_images(
    entries: list[Any], search_dirs: list[Path], where: str, problems: list[str], warnings: list[str]
) -> tuple[dict[Any, _Image], set[Any]]:
    """Usable images by COCO image id, in file order, and the ids of images already reported as unusable."""
    images: dict[Any, _Image] = {}
    rejected: set[Any] = set()
    seen_paths: dict[Path, Any] = {}
    if not entries:
        problems.append(f"{where}: no images listed")
    for index, entry in enumerate(entries):
        missing = _missing_keys(entry, ("id", "file_name"))
        if missing:
            problems.append(f"{where}: image #{index} is missing required key(s) {missing}")
            continue
        image_id, file_name = entry["id"], entry["file_name"]
        label = f"{where}: image id {image_id!r} ({file_name!r})"
        if not _is_id(image_id):
            problems.append(f"{label}: image id must be an integer")
            continue
        if image_id in images or image_id in rejected:
            problems.append(f"{label}: image id {image_id} is listed twice")
            continue
        rejected.add(image_id)  # until every check below has passed
        if not isinstance(file_name, str) or safe_relative_path(file_name) is None:
            problems.append(f"{label}: file_name must be a relative path inside the dataset folder")
            continue
        path = _find_image(file_name, search_dirs)
        if path is None:
            looked = ", ".join(str(d) for d in search_dirs)
            problems.append(f"{label}: image file not found (looked in {looked})")
            continue
        if path in seen_paths:
            problems.append(f"{label}: image file {path} is listed twice (also image id {seen_paths[path]})")
            continue
        seen_paths[path] = image_id
        try:
            header = read_image_header(path)
        except _IMAGE_ERRORS as error:
            problems.append(f"{label}: {path}: {describe_image_error(error)}")
            continue
        shown_width, shown_height = header.displayed_size
        declared = (entry.get("width", shown_width), entry.get("height", shown_height))
        frame = annotated_frame(header, declared)
        if frame is None:
            problems.append(f"{label}: declared size {declared[0]}x{declared[1]} {wrong_size_problem(path, header)}")
            continue
        width, height, orientation = frame
        if orientation != header.orientation:
            warnings.append(f"{label}: declared size {declared[0]}x{declared[1]} {stored_frame_warning(path, header)}")
        rejected.discard(image_id)
        images[image_id] = _Image(path=path, width=width, height=height, orientation=orientation)
    return images, rejected


def _read_annotations(
    entries: list[Any],
    images: dict[Any, _Image],
    rejected: set[Any],
    label_of: dict[int, int],
    where: str,
    problems: list[str],
) -> None:
    """Attach each annotation's checked, clipped xyxy box and label to its image."""
    for index, entry in enumerate(entries):
        missing = _missing_keys(entry, ("id", "image_id", "category_id", "bbox"))
        if missing:
            problems.append(f"{where}: annotation #{index} is missing required key(s) {missing}")
            continue
        if entry.get("iscrowd", 0) == 1:
            continue
        label = f"{where}: annotation id {entry['id']!r} (image id {entry['image_id']!r})"
        if not _is_id(entry["image_id"]) or not _is_int(entry["category_id"]):
            problems.append(f"{label}: image_id and category_id must be integers")
            continue
        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            problems.append(f"{label}: bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}")
            continue
        category = entry["category_id"]
        if category not in label_of:
            problems.append(f"{label}: unknown category id {category!r}")
            continue
        image = images.get(entry["image_id"])
        if image is None:
            # An image already reported (missing file, bad size...) is not reported again per box.
            if entry["image_id"] not in rejected:
                problems.append(f"{label}: unknown image id {entry['image_id']!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        box, problem = check_box([x, y, x + w, y + h], image.width, image.height)
        if box is None:
            problems.append(f"{label}, category {category}: bbox {bbox} (x, y, width, height): {problem}")
            continue
        image.boxes.append(box)
        image.labels.append(label_of[category])


def write_coco(data: DetectionData, folder: Path, images_subdir: str = "images") -> Path:
    """Write ``data`` as a COCO dataset: images copied to ``folder/images_subdir``, ``folder/annotations.json``.

    Image ids, annotation ids and category ids are 1-based in ``data``'s order. Each
    ``file_name`` is the image's path relative to ``folder`` (e.g. ``images/0001.jpg``), so
    ``read_coco(returned_path)`` finds the images whatever ``images_subdir`` is. Images
    already in place are not copied again.

    Returns:
        The path of ``annotations.json``.
    """
    folder = Path(folder)
    image_folder = folder / images_subdir
    image_folder.mkdir(parents=True, exist_ok=True)
    names = export_names([image.path for image in data.images])
    document: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name} for i, name in enumerate(data.classes, start=1)],
    }
    for image_id, (image, name) in enumerate(zip(data.images, names, strict=True), start=1):
        copy_image(image.path, image_folder / name)
        file_name = (image_folder / name).relative_to(folder).as_posix()
        document["images"].append(
            {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height}
        )
        for box, label in zip(image.boxes.tolist(), image.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            bbox = [_number(x1), _number(y1), _number(x2 - x1), _number(y2 - y1)]
            document["annotations"].append(
                {
                    "id": len(document["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": bbox,
                    "area": _number((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                }
            )
    path = folder / "annotations.json"
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return path


def _number(value: float) -> int | float:
    """Whole numbers as JSON integers, so integer boxes read back exactly and files stay readable."""
    return int(value) if math.isfinite(value) and float(value).is_integer() else float(value)
