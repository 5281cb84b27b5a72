"""Reading a dataset whose format is recognised from its layout on disk."""

from __future__ import annotations

from pathlib import Path

from model.data.annotations import DatasetError, DetectionData
from model.data.coco import read_coco
from model.data.voc import read_voc
from model.data.yolo import YAML_NAMES, read_yolo

EXPECTED_LAYOUTS = (
    "a COCO .json file; a folder with annotations.json or exactly one *.json (directly or in annotations/); "
    "a VOC folder with Annotations/ and JPEGImages/ (directly or one level down, e.g. VOC2007/); "
    "or a YOLO folder with data.yaml (or dataset.yaml), images/ and labels/"
)


def read_dataset(path: Path) -> DetectionData:
    """Read a COCO, VOC or YOLO dataset, recognising the format from ``path``.

    Recognised, in this order:
      - a ``.json`` file: COCO, images found as ``read_coco`` does;
      - a ``.yaml`` or ``.yml`` file: YOLO, read as ``read_yolo`` does;
      - a folder with ``Annotations/``: VOC; or one subfolder holding ``Annotations/`` (``VOC2007/``);
      - a folder with ``data.yaml`` or ``dataset.yaml``: YOLO;
      - a folder with ``annotations.json``, or exactly one ``*.json``: COCO;
      - the same inside ``annotations/``: COCO, images looked up in ``images/`` beside that
        folder if it exists, else in the dataset folder itself.

    Raises:
        DatasetError: the path is missing or matches none (or several) of these layouts,
            or the dataset it found has problems.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return read_coco(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            return read_yolo(path)
        raise DatasetError(f"{path}: not a dataset; expected {EXPECTED_LAYOUTS}")
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    voc_root = _find_voc_root(path)
    if voc_root is not None:
        return read_voc(voc_root)
    yolo_yaml = _find_yolo_yaml(path)
    if yolo_yaml is not None:
        return read_yolo(yolo_yaml)
    coco_json = _find_coco_json(path)
    if coco_json is not None:
        return read_coco(coco_json)
    coco_json = _find_coco_json(path / "annotations")
    if coco_json is not None:
        images_dir = path / "images" if (path / "images").is_dir() else path
        return read_coco(coco_json, images_dir=images_dir)
    raise DatasetError(f"{path}: no dataset found; expected {EXPECTED_LAYOUTS}")


def _find_voc_root(path: Path) -> Path | None:
    if (path / "Annotations").is_dir():
        return path
    roots = sorted(child for child in path.iterdir() if (child / "Annotations").is_dir())
    if len(roots) > 1:
        names = ", ".join(root.name for root in roots)
        raise DatasetError(f"{path}: several VOC datasets found ({names}); pass the one to use")
    return roots[0] if roots else None


def _find_coco_json(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    if (folder / "annotations.json").is_file():
        return folder / "annotations.json"
    candidates = sorted(p for p in folder.glob("*.json") if p.is_file())
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DatasetError(f"{folder}: several JSON files found ({names}); pass the annotation file to use")
    return candidates[0] if candidates else None


def _find_yolo_yaml(folder: Path) -> Path | None:
    found = [folder / name for name in YAML_NAMES if (folder / name).is_file()]
    if len(found) > 1:
        raise DatasetError(f"{folder}: both {' and '.join(p.name for p in found)} found; keep the one to use")
    return found[0] if found else None
