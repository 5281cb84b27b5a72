"""YOLO detection datasets (the layout Ultralytics, Roboflow and CVAT export): reader and writer.

A ``data.yaml`` (or ``dataset.yaml``) names the classes; each image under ``images/`` has a
text file of the same stem at the same place under ``labels/``, one object per line::

    class cx cy w h

``class`` is a 0-based index into ``names``; the box's centre, width and height are
fractions of the image's width and height, as displayed (EXIF orientation applied, as
Ultralytics reads images). An image without a label file has no objects.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from PIL import Image

from model.data.annotations import AnnotatedImage, DatasetError, DetectionData
from model.data.images import (
    IMAGE_SUFFIXES,
    copy_image,
    describe_image_error,
    export_names,
    read_image_header,
    safe_relative_path,
)
from model.data.validate import check_box

_IMAGE_ERRORS = (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError)
YAML_NAMES = ("data.yaml", "dataset.yaml")
SPLIT_KEYS = ("train", "val", "test")

# Exporters write fractions rounded to 6 digits (or computed in float32): a value this far
# past 0 or 1 is rounding; further is a wrong label. Corners are then checked in pixels like
# every other format (``check_box``: 2 px outside are clipped).
VALUE_TOLERANCE = 1e-3
# A data.yaml holds a few class names and paths; real ones are a few KB (LVIS's 1,203 names: 40 KB).
MAX_YAML_BYTES = 2**20
# One image's labels are a few KB; a cap keeps a crafted file from exhausting memory.
MAX_LABEL_BYTES = 16 * 2**20


@dataclass
class _Source:
    """Where images were listed: a folder (every image under it) or a list file naming them."""

    where: str  # for messages: "data.yaml: train: 'images/train'"
    images: list[Path] = field(default_factory=list)
    label_folder: Path | None = None  # a folder's labels/ twin, searched (at any depth) for label files


def read_yolo(data_yaml: Path) -> DetectionData:
    """Read a YOLO detection dataset described by ``data_yaml``.

    ``names`` (a list, or a map ``{index: name}`` with indices 0..K-1) gives the classes in
    order: YOLO class i becomes label i + 1. Images are, in this order of preference:
      - those that ``train``, ``val`` and ``test`` name (each a folder, a ``.txt`` file
        listing image paths, or a list of these), relative to ``path`` (itself relative to
        the YAML file's folder; absent means that folder). Absolute paths and paths leaving
        the dataset are refused; Roboflow's ``../train/images`` is read as
        ``train/images``, as Ultralytics does when the former does not exist;
      - else every image under ``images/`` (any depth, e.g. ``images/train/``).
    An image's labels are at its path with the last ``images`` folder replaced by
    ``labels`` and the suffix by ``.txt`` (Ultralytics' rule). An image found twice is read once.

    Returns:
        ``DetectionData(format="yolo")``: boxes float32 Tensor[N, 4] absolute xyxy pixels of
        the image as displayed, labels int64 Tensor[N] 1-based in ``names`` order.

    Raises:
        DatasetError: listing every problem found, each naming the file (and the line for
            label files): a malformed line, a class index out of range, a value outside 0-1,
            a label file without an image, a path leaving the dataset...
    """
    data_yaml = Path(data_yaml)
    document = _load_yaml(data_yaml)
    where = str(data_yaml)
    problems: list[str] = []
    warnings: list[str] = []
    classes = _read_names(document, where, problems)
    num_classes = len(classes) if classes else None
    root = data_yaml.parent.resolve()
    base = _dataset_path(document.get("path"), root, where, problems)
    sources = _find_sources(document, root, base, where, problems) if base is not None else []
    records: list[AnnotatedImage] = []
    seen: set[Path] = set()
    label_files: set[Path] = set()
    for source in sources:
        for image_path in source.images:
            if image_path in seen:
                continue
            seen.add(image_path)
            label_file = _label_path(image_path, root)
            if label_file is None:
                problems.append(
                    f"{source.where}: {image_path} is not inside an 'images' folder, so its labels cannot be found "
                    "(YOLO reads them from the same path with 'images' replaced by 'labels')"
                )
                continue
            label_files.add(label_file)
            record = _read_image(image_path, label_file, num_classes, problems)
            if record is not None:
                records.append(record)
    _check_label_files(sources, root, seen, label_files, problems)
    if sources and not seen:
        named = "; ".join(source.where.removeprefix(f"{where}: ") for source in sources)
        problems.append(f"{where}: no images found in what it names ({named})")
    if problems:
        raise DatasetError(problems)
    if records and not any(path.is_file() for path in label_files):
        warnings.append(f"{where}: no label files found (labels/ beside images/): every image has no objects")
    return DetectionData(classes=classes or [], images=records, format="yolo", warnings=warnings)


def _load_yaml(path: Path) -> dict[str, Any]:
    """The parsed YAML mapping (``yaml.safe_load``: plain data only, never code)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise DatasetError(f"{path}: YAML file of {size} bytes is over the limit of {MAX_YAML_BYTES}")
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: file not found") from error
    except RecursionError as error:
        raise DatasetError(f"{path}: malformed YAML: nested too deeply") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the file: {error}") from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise DatasetError(f"{path}: malformed YAML: {error.problem or error.context}{at}") from error
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: malformed YAML: {error}") from error
    if not isinstance(document, dict):
        raise DatasetError(f"{path}: expected a YAML mapping with 'names' (and optionally path, train, val, test)")
    return document


def _kind(value: Any) -> str:
    """What a YAML value is, for a message (never its repr: an alias-built value can be huge)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()} (quote it to make it a name)"
    if value is None:
        return "empty"
    return f"{value!r}"


def _repeated_or_past(indices: list[int]) -> list[int]:
    """Up to 5 indices that are listed twice or are >= the number of entries (``indices`` sorted)."""
    return [i for n, i in enumerate(indices) if i >= len(indices) or (n and indices[n - 1] == i)][:5]


def _read_names(document: dict[str, Any], where: str, problems: list[str]) -> list[str] | None:
    """Class names in index order; problems for a missing, malformed or inconsistent ``names``.

    None when not even the number of classes is known (the label files' class indices are
    then not checked against it).
    """
    names = document.get("names")
    if names is None:
        problems.append(f"{where}: 'names' is missing: list the class names (a list, or a map {{index: name}})")
        return None
    if isinstance(names, list):
        entries = list(enumerate(names))
    elif isinstance(names, dict):
        entries = []
        for key, value in names.items():
            index = key if isinstance(key, int) and not isinstance(key, bool) else None
            if isinstance(key, str) and key.isdigit():
                index = int(key)
            if index is None:
                problems.append(f"{where}: names: key {_kind(key)} is not a class index (0, 1, 2...)")
                continue
            entries.append((index, value))
        entries.sort(key=lambda entry: entry[0])
        indices = [index for index, _ in entries]
        if indices != list(range(len(entries))):
            missing = sorted(set(range(len(entries))) - set(indices))[:5]
            problems.append(
                f"{where}: names: the class indices must be 0 to {len(entries) - 1}, once each "
                f"(missing: {', '.join(map(str, missing)) or 'none'}; "
                f"listed twice or past the end: {', '.join(map(str, _repeated_or_past(indices)))})"
            )
            return None
    else:
        problems.append(f"{where}: 'names' must be a list of class names or a map {{index: name}}, got {_kind(names)}")
        return None
    classes: list[str] = []
    for index, value in entries:
        if isinstance(value, str) and value.strip():
            classes.append(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            classes.append(str(value))  # names: [0, 1] for digit classes
        else:
            problems.append(f"{where}: names: class {index} is {_kind(value)}; expected a name")
            classes.append(f"#{index}")  # holds its place: the count still checks class indices
    if not entries:
        problems.append(f"{where}: names is empty: list the class names")
    for name in sorted(name for name, count in Counter(classes).items() if count > 1):
        problems.append(f"{where}: names: {name!r} is used by more than one class index")
    count = document.get("nc")
    if count is not None and count != len(entries):
        problems.append(f"{where}: nc is {_kind(count)} but names lists {len(entries)} classes")
    return classes


def _inside(relative: str, folder: Path, root: Path) -> Path | None:
    """``folder / relative`` resolved, if it stays inside ``root``, else None."""
    candidate = (folder / relative).resolve()
    return candidate if candidate == root or root in candidate.parents else None


def _is_relative(value: str) -> bool:
    path = PurePosixPath(value.replace("\\", "/"))
    return not path.is_absolute() and not (path.parts and ":" in path.parts[0])


def _dataset_path(value: Any, root: Path, where: str, problems: list[str]) -> Path | None:
    """The folder ``train``/``val``/``test`` are relative to: ``path`` under the YAML's folder, or that folder."""
    if value is None or value == "":
        return root
    if not isinstance(value, str):
        problems.append(f"{where}: path must be a folder name, got {_kind(value)}")
        return None
    if not _is_relative(value):
        problems.append(
            f"{where}: path {value!r} is absolute; a dataset must hold its own files: "
            "make it relative to the YAML file's folder (e.g. '.') or remove it"
        )
        return None
    folder = _inside(value, root, root)
    if folder is None:
        problems.append(f"{where}: path {value!r} leads out of the dataset folder; paths must stay inside it")
        return None
    if not folder.is_dir():
        problems.append(
            f"{where}: path {value!r} is not a folder in the dataset (it is read relative to the YAML file)"
        )
        return None
    return folder


def _find_sources(document: dict[str, Any], root: Path, base: Path, where: str, problems: list[str]) -> list[_Source]:
    """The image folders and list files ``train``/``val``/``test`` name, or else ``images/``."""
    listed = [(key, document[key]) for key in SPLIT_KEYS if document.get(key) not in (None, "", [])]
    if not listed:
        images = base / "images"
        if not images.is_dir():
            problems.append(f"{where}: no images/ folder beside it, and no train/val/test keys naming image folders")
            return []
        return [_Source(f"{where}: images/", _images_under(images), base / "labels")]
    sources = []
    for key, value in listed:
        values = value if isinstance(value, list) else [value]
        for item in values:
            label = f"{where}: {key}: {item!r}" if isinstance(item, str) else f"{where}: {key}"
            if not isinstance(item, str):
                problems.append(f"{label}: expected a folder or a .txt file, got {_kind(item)}")
                continue
            source = _resolve_source(item, root, base, label, problems)
            if source is not None:
                sources.append(source)
    return sources


def _resolve_source(value: str, root: Path, base: Path, where: str, problems: list[str]) -> _Source | None:
    if not _is_relative(value):
        problems.append(f"{where}: absolute paths are refused; give it relative to the dataset (path: or the YAML)")
        return None
    target = _inside(value, base, root)
    clean = value.replace("\\", "/")
    if (target is None or not target.exists()) and clean.startswith("../"):
        # Roboflow writes ../train/images beside a data.yaml that sits next to train/;
        # Ultralytics reads it as train/images when the first does not exist.
        target = _inside(clean[3:], base, root)
    if target is None:
        problems.append(f"{where}: leads out of the dataset folder; paths must stay inside it")
        return None
    if target.is_dir():
        twin = _label_path(target / "-", root)  # the folder's own labels/ twin, if its path has an images/
        return _Source(where, _images_under(target), twin.parent if twin is not None else None)
    if target.is_file() and target.suffix.lower() == ".txt":
        return _read_list_file(target, root, base, where, problems)
    problems.append(f"{where}: not a folder or a .txt list of images in the dataset ({target} does not exist)")
    return None


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_list_file(path: Path, root: Path, base: Path, where: str, problems: list[str]) -> _Source | None:
    """A ``train.txt`` (as CVAT exports): an image path a line, relative to ``path`` (``./x``: to the list's folder)."""
    try:
        if path.stat().st_size > MAX_LABEL_BYTES:
            problems.append(f"{path}: image list is over the limit of {MAX_LABEL_BYTES} bytes")
            return None
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read the image list: {error}")
        return None
    source = _Source(where)
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        folder = path.parent if name.startswith("./") else base
        relative = safe_relative_path(name)
        image = _inside(str(relative), folder, root) if relative is not None else None
        if image is None:
            problems.append(f"{path}: line {number}: {name!r} is not a relative path inside the dataset")
        elif not image.is_file():
            problems.append(f"{path}: line {number}: image file {name!r} not found")
        else:
            source.images.append(image)
    return source


def _label_path(image: Path, root: Path) -> Path | None:
    """The label file of ``image``: the last ``images`` folder of its path under ``root`` becomes ``labels``."""
    parts = list(image.relative_to(root).parts)
    folders = [i for i, part in enumerate(parts[:-1]) if part == "images"]
    if not folders:
        return None
    parts[folders[-1]] = "labels"
    return root.joinpath(*parts).with_suffix(".txt")


def _image_stems(folder: Path, cache: dict[Path, set[str]]) -> set[str]:
    if folder not in cache:
        cache[folder] = (
            {p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
            if folder.is_dir()
            else set()
        )
    return cache[folder]


def _check_label_files(
    sources: list[_Source], root: Path, images: set[Path], label_files: set[Path], problems: list[str]
) -> None:
    """Report images sharing a label file, and each label file beside the images read that has no image.

    Searched: the labels/ twin of each image folder read (at any depth), and the folder of
    each image's label file.
    """
    owners: dict[Path, Path] = {}
    for image in sorted(images):
        label_file = _label_path(image, root)
        if label_file is None:
            continue
        if label_file in owners:
            problems.append(f"{label_file}: label file of two images, {owners[label_file].name} and {image.name}")
        owners[label_file] = image
    candidates = {path for source in sources if source.label_folder for path in source.label_folder.rglob("*.txt")}
    for folder in {path.parent for path in label_files}:
        candidates.update(folder.glob("*.txt"))
    stems: dict[Path, set[str]] = {}
    for label_file in sorted(candidates - label_files):
        if not label_file.is_file():
            continue
        image_dir = _images_folder_of(label_file, root)
        if image_dir not in stems:
            stems[image_dir] = {p.stem for p in _images_in(image_dir)}
        if label_file.stem not in stems[image_dir]:
            problems.append(f"{label_file}: label file without an image (no {label_file.stem}.* in {image_dir})")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def _images_folder_of(label_file: Path, root: Path) -> Path:
    """The folder where ``label_file``'s image would be: its last ``labels`` folder becomes ``images``."""
    parts = list(label_file.relative_to(root).parts[:-1])
    last = max(i for i, part in enumerate(parts) if part == "labels")
    parts[last] = "images"
    return root.joinpath(*parts)


def _read_image(
    image_path: Path, label_file: Path, num_classes: int | None, problems: list[str]
) -> AnnotatedImage | None:
    """One image's record from its header and label file, or None after reporting problems."""
    try:
        header = read_image_header(image_path)
    except _IMAGE_ERRORS as error:
        problems.append(f"{image_path}: {describe_image_error(error)}")
        return None
    width, height = header.displayed_size
    boxes, labels = _read_labels(label_file, width, height, num_classes, problems)
    return AnnotatedImage(
        path=image_path,
        width=width,
        height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        orientation=header.orientation,
    )


def _read_labels(
    label_file: Path, width: int, height: int, num_classes: int | None, problems: list[str]
) -> tuple[list[list[float]], list[int]]:
    """Checked, clipped xyxy pixel boxes and 1-based labels of one label file (none if it does not exist)."""
    if not label_file.is_file():
        return [], []
    try:
        if label_file.stat().st_size > MAX_LABEL_BYTES:
            problems.append(f"{label_file}: label file is over the limit of {MAX_LABEL_BYTES} bytes")
            return [], []
        lines = label_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{label_file}: cannot read label file: {error}")
        return [], []
    boxes: list[list[float]] = []
    labels: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{label_file}: line {number}"
        parsed, problem = _parse_line(line, num_classes)
        if parsed is None:
            problems.append(f"{where}: {problem}")
            continue
        index, (cx, cy, w, h) = parsed
        box, problem = check_box(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], width, height
        )
        if box is None:
            problems.append(f"{where}: class {index} cx={cx:g} cy={cy:g} w={w:g} h={h:g}: {problem}")
            continue
        boxes.append(box)
        labels.append(index + 1)
    return boxes, labels


def _parse_line(line: str, num_classes: int | None) -> tuple[tuple[int, list[float]] | None, str | None]:
    """``((class index, [cx, cy, w, h]), None)`` or ``(None, what is wrong)``."""
    fields = line.split()
    if len(fields) != 5:
        hint = " (a segmentation polygon? export detection boxes)" if len(fields) > 5 and len(fields) % 2 else ""
        return None, f"expected 5 values 'class cx cy w h', got {len(fields)}{hint}: {line.strip()[:80]!r}"
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return None, f"not numbers: {line.strip()[:80]!r}"
    index = values[0]
    if not index.is_integer():
        return None, f"class index {fields[0]!r} is not a whole number"
    if index < 0 or (num_classes is not None and index >= num_classes):
        if num_classes is None:  # no names list to count against
            return None, f"class index {int(index)} is out of range: it is negative"
        return (
            None,
            f"class index {int(index)} is out of range: names lists {num_classes} classes (0-{num_classes - 1})",
        )
    for name, text, value in zip(("cx", "cy", "w", "h"), fields[1:], values[1:], strict=True):
        if not math.isfinite(value) or not -VALUE_TOLERANCE <= value <= 1 + VALUE_TOLERANCE:
            return None, f"{name} {text} is outside 0-1 (YOLO values are fractions of the image's width and height)"
    return (int(index), values[1:]), None


def write_yolo(data: DetectionData, root: Path) -> Path:
    """Write ``data`` as a YOLO dataset: ``root/data.yaml``, ``root/images/``, ``root/labels/``.

    Each image gets a label file (empty without objects) of lines ``class cx cy w h``,
    fractions of the record's width and height with 8 decimals; ``names`` lists
    ``data.classes`` in order, so class i is label i + 1.

    Returns:
        The path of ``data.yaml``.

    Raises:
        ValueError: an image read as stored against its EXIF orientation (a YOLO reader would
            turn it, and its boxes would no longer fit).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for image, name in zip(data.images, export_names([image.path for image in data.images]), strict=True):
        if image.orientation is not None and image.orientation != read_image_header(image.path).orientation:
            raise ValueError(f"{image.path}: used as stored against its EXIF orientation; YOLO cannot say so")
        copy_image(image.path, root / "images" / name)
        scale = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float64)
        boxes = image.boxes.to(torch.float64) / scale
        centre_size = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=1)
        lines = [
            f"{label - 1} " + " ".join(f"{value:.8f}" for value in row)
            for label, row in zip(image.labels.tolist(), centre_size.tolist(), strict=True)
        ]
        (root / "labels" / f"{Path(name).stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    path = root / "data.yaml"
    document = {"names": dict(enumerate(data.classes)), "nc": len(data.classes)}
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
