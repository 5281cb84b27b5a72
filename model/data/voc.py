"""Pascal VOC detection annotations (``Annotations/*.xml`` + ``JPEGImages/``): reader and writer.

VOC pixel coordinates are 1-based and inclusive: a box ``xmin..xmax`` covers the pixels
numbered ``xmin`` to ``xmax``, which in continuous 0-based coordinates is
``[xmin - 1, xmax]``. Classes are the object names, sorted alphabetically.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple
from xml.parsers import expat

import torch
from PIL import Image

from model.data.annotations import AnnotatedImage, DatasetError, DetectionData
from model.data.images import (
    annotated_frame,
    copy_image,
    describe_image_error,
    export_names,
    find_by_stem,
    read_image_header,
    safe_relative_path,
    stored_frame_warning,
    wrong_size_problem,
)
from model.data.validate import check_box

_IMAGE_ERRORS = (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError)
_COORDINATES = ("xmin", "ymin", "xmax", "ymax")


class _DoctypeRefused(Exception):
    pass


def _refuse_doctype(*_args) -> None:
    raise _DoctypeRefused


def parse_xml(data: bytes) -> ET.Element:
    """Parse an annotation file that must not contain a DTD.

    Entity declarations make "billion laughs" expansion possible, and VOC files never need
    one, so any ``<!DOCTYPE`` is refused. expat stops at the declaration, before expanding
    anything, and sees it whatever the file's encoding.

    Raises:
        ValueError: the file declares a DTD or entities.
        xml.etree.ElementTree.ParseError: the file is not well-formed XML.
    """
    scanner = expat.ParserCreate()
    scanner.StartDoctypeDeclHandler = _refuse_doctype
    scanner.EntityDeclHandler = _refuse_doctype
    try:
        scanner.Parse(data, True)
    except _DoctypeRefused:
        raise ValueError("DTD/entity declarations are not allowed") from None
    except expat.ExpatError:
        pass  # ElementTree reports the same error below, as ParseError with its position
    return ET.fromstring(data)


def read_voc(root: Path) -> DetectionData:
    """Read a Pascal VOC detection dataset from ``root/Annotations`` and ``root/JPEGImages``.

    Every ``Annotations/*.xml`` is read (``ImageSets`` splits are ignored), in file-name
    order. Each image is ``JPEGImages/<filename>``, or else ``JPEGImages/<xml stem>.<any
    image suffix>``. Objects marked ``difficult`` are kept as ordinary objects: the
    detector should still find them. Boxes up to 2 px outside the image are clipped; a
    ``<size>`` element, where present, must match the file as displayed (EXIF orientation
    applied), or else its stored pixels: then the image is used as stored (a warning says so).

    Returns:
        ``DetectionData(format="voc")``: boxes float32 Tensor[N, 4] absolute xyxy pixels
        (``[xmin - 1, ymin - 1, xmax, ymax]``), labels int64 Tensor[N] 1-based into the
        alphabetically sorted class names; ``warnings`` as above.

    Raises:
        DatasetError: listing every problem found, each naming the XML file and object
            (1-based object number and class name).
    """
    root = Path(root)
    annotation_dir, image_dir = root / "Annotations", root / "JPEGImages"
    xml_files = sorted(annotation_dir.glob("*.xml")) if annotation_dir.is_dir() else []
    if not xml_files:
        raise DatasetError(f"{annotation_dir}: no VOC annotation files (*.xml) found")
    problems: list[str] = []
    warnings: list[str] = []
    parsed: list[_Annotation] = []
    seen: dict[Path, Path] = {}
    for xml_file in xml_files:
        entry = _read_annotation(xml_file, image_dir, problems, warnings)
        if entry is None:
            continue
        path = entry.path
        if path in seen:
            problems.append(f"{xml_file}: image {path} is listed twice (also by {seen[path]})")
            continue
        seen[path] = xml_file
        parsed.append(entry)
    if problems:
        raise DatasetError(problems)
    classes = sorted({name for entry in parsed for name in entry.names})
    label_of = {name: label for label, name in enumerate(classes, start=1)}
    images = [
        AnnotatedImage(
            path=entry.path,
            width=entry.width,
            height=entry.height,
            boxes=torch.tensor(entry.boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor([label_of[name] for name in entry.names], dtype=torch.int64),
            orientation=entry.orientation,
        )
        for entry in parsed
    ]
    return DetectionData(classes=classes, images=images, format="voc", warnings=warnings)


# One image's VOC annotation is a few KB; a cap keeps a crafted file from exhausting memory.
MAX_XML_BYTES = 16 * 2**20


class _Annotation(NamedTuple):
    """One XML file's image (its size and orientation as used) and objects."""

    path: Path
    width: int
    height: int
    orientation: int
    boxes: list[list[float]]
    names: list[str]


def _read_annotation(xml_file: Path, image_dir: Path, problems: list[str], warnings: list[str]) -> _Annotation | None:
    """One XML file's image and objects, or None after reporting problems."""
    try:
        if xml_file.stat().st_size > MAX_XML_BYTES:
            problems.append(f"{xml_file}: annotation file is over the limit of {MAX_XML_BYTES} bytes")
            return None
        tree = parse_xml(xml_file.read_bytes())
    except OSError as error:
        problems.append(f"{xml_file}: cannot read annotation file: {error}")
        return None
    except (ValueError, ET.ParseError) as error:
        problems.append(f"{xml_file}: malformed XML: {error}")
        return None
    path = _find_image(tree, xml_file, image_dir)
    if path is None:
        problems.append(f"{xml_file}: image file not found in {image_dir} (<filename> {tree.findtext('filename')!r})")
        return None
    try:
        header = read_image_header(path)
    except _IMAGE_ERRORS as error:
        problems.append(f"{xml_file}: {path}: {describe_image_error(error)}")
        return None
    width, height = _number(tree.findtext("size/width")), _number(tree.findtext("size/height"))
    declared = (width, height)
    frame = annotated_frame(header, None if width is None or height is None else (width, height))
    if frame is None:
        problems.append(f"{xml_file}: <size> says {declared[0]:g}x{declared[1]:g} {wrong_size_problem(path, header)}")
        return None
    width, height, orientation = frame
    if orientation != header.orientation:
        warnings.append(f"{xml_file}: <size> {declared[0]:g}x{declared[1]:g} {stored_frame_warning(path, header)}")
    boxes: list[list[float]] = []
    names: list[str] = []
    for number, obj in enumerate(tree.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        values = [_number(obj.findtext(f"bndbox/{key}")) for key in _COORDINATES]
        where = f"{xml_file}: object #{number} ({name!r})"
        numbers = [value for value in values if value is not None]
        if not name or len(numbers) < len(values):
            problems.append(f"{where}: needs a <name> and numeric <bndbox> {'/'.join(_COORDINATES)}")
            continue
        xmin, ymin, xmax, ymax = numbers
        box, problem = check_box([xmin - 1, ymin - 1, xmax, ymax], width, height)
        if box is None:
            raw = " ".join(f"{key}={value:g}" for key, value in zip(_COORDINATES, values, strict=True))
            problems.append(f"{where}: bndbox {raw} (1-based, inclusive): {problem}")
            continue
        boxes.append(box)
        names.append(name)
    return _Annotation(path, width, height, orientation, boxes, names)


def _find_image(tree: ET.Element, xml_file: Path, image_dir: Path) -> Path | None:
    relative = safe_relative_path((tree.findtext("filename") or "").strip())
    if relative is not None and (image_dir / relative).is_file():
        return (image_dir / relative).resolve()
    found = find_by_stem(image_dir, xml_file.stem)
    return found.resolve() if found is not None else None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def write_voc(data: DetectionData, root: Path) -> Path:
    """Write ``data`` as a Pascal VOC dataset under ``root`` (``Annotations/``, ``JPEGImages/``).

    Coordinates are written as VOC's 1-based inclusive integers: ``xmin = round(x1) + 1``,
    ``xmax = round(x2)``, so integer boxes read back exactly; other boxes are rounded to
    whole pixels (keeping at least one pixel). Class names come from ``data.classes``.

    Returns:
        ``root``.
    """
    root = Path(root)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for image, name in zip(data.images, export_names([image.path for image in data.images]), strict=True):
        copy_image(image.path, root / "JPEGImages" / name)
        document = _annotation_element(image, name, data.classes)
        ET.indent(document)
        ET.ElementTree(document).write(root / "Annotations" / f"{Path(name).stem}.xml", encoding="utf-8")
    return root


def _annotation_element(image: AnnotatedImage, file_name: str, classes: list[str]) -> ET.Element:
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "folder").text = "JPEGImages"
    ET.SubElement(annotation, "filename").text = file_name
    size = ET.SubElement(annotation, "size")
    for key, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for box, label in zip(image.boxes.tolist(), image.labels.tolist(), strict=True):
        obj = ET.SubElement(annotation, "object")
        ET.SubElement(obj, "name").text = classes[int(label) - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in zip(_COORDINATES, _voc_coordinates(box, image.width, image.height), strict=True):
            ET.SubElement(bndbox, key).text = str(value)
    return annotation


def _voc_coordinates(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """``(xmin, ymin, xmax, ymax)``, 1-based inclusive, at least one pixel wide and high."""
    x1, x2 = _round_span(box[0], box[2], width)
    y1, y2 = _round_span(box[1], box[3], height)
    return x1 + 1, y1 + 1, x2, y2


def _round_span(start: float, end: float, limit: int) -> tuple[int, int]:
    low = min(max(round(start), 0), limit - 1)
    high = min(max(round(end), low + 1), limit)
    return low, high
