"""Turning an uploaded archive (or a synthetic request) into a stored dataset, atomically.

A dataset lives in ``<data_dir>/datasets/<id>/``: ``files/`` holds what the archive held
(read with ``model.data.read_dataset``) and ``dataset.json`` the record also kept in Redis
(names in ``core.layout``). It is built in ``datasets/.incoming-<owner>-<id>/``, read,
published to the storage (uploaded, with a bucket), recorded in Redis, and only then renamed
into place (``_commit``): a failed import leaves nothing behind, and what a killed one leaves
keeps its incoming name, which the next start settles (``core.leftovers``).

The archive is checked and extracted by ``core.archive``, within the ``SSD_MAX_ARCHIVE_*``
limits. The API runs imports in slots of their own (``app.uploads``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import IO

from core.archive import ArchiveError, ArchiveLimits, extract_archive, is_junk
from core.layout import DATASET_FILE, DATASET_FILES_DIR, incoming_name
from core.records import DatasetRecord, now_iso
from core.settings import Settings
from core.store import Store, new_id
from model.data import DatasetError, DetectionData, make_shapes_dataset, read_dataset


class DatasetImportError(ValueError):
    """An archive that cannot become a dataset, its message naming the archive and the problem.
    ``too_large``: over a limit (the API answers 413); otherwise bad content (400)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def archive_limits(settings: Settings) -> ArchiveLimits:
    """What an uploaded archive may hold (``SSD_MAX_ARCHIVE_FILES``, ``SSD_MAX_ARCHIVE_BYTES``,
    ``SSD_MAX_COMPRESSION_RATIO``)."""
    return ArchiveLimits(settings.max_archive_files, settings.max_archive_bytes, settings.max_compression_ratio)


def find_root(folder: Path) -> Path:
    """The folder to read: ``folder``, or the one folder it holds when it holds nothing else (``mydata/``)."""
    for _ in range(3):
        entries = [p for p in folder.iterdir() if not is_junk(PurePosixPath(p.name))]
        if len(entries) != 1 or not entries[0].is_dir() or (entries[0] / "Annotations").is_dir():
            break
        folder = entries[0]
    return folder


# At most this many of a reader's warnings are kept in a dataset's record (it is listed whole
# by GET /datasets); the last one kept says how many more there were.
MAX_RECORD_WARNINGS = 20


def _archive_paths(messages: list[str], files: Path) -> list[str]:
    """Messages with the temporary folder's path replaced by paths inside the archive."""
    prefixes = sorted({str(files), str(files.resolve())}, key=len, reverse=True)
    shown = []
    for message in messages:
        for prefix in prefixes:
            message = message.replace(prefix + os.sep, "").replace(prefix, "(archive top level)")
        shown.append(message)
    return shown


def _problem_text(error: DatasetError, files: Path, filename: str) -> str:
    """The reader's problems, with paths inside the archive."""
    problems = _archive_paths(error.problems[:20], files)
    more = len(error.problems) - len(problems)
    return f"{filename}: " + "; ".join(problems) + (f"; and {more} more problem(s)" if more > 0 else "")


def _warnings(data: DetectionData, files: Path | None = None) -> list[str]:
    """The reader's warnings for a record: paths inside the archive, at most ``MAX_RECORD_WARNINGS``."""
    kept = data.warnings[:MAX_RECORD_WARNINGS]
    shown = _archive_paths(kept, files) if files is not None else list(kept)
    more = len(data.warnings) - len(kept)
    return shown + ([f"and {more} more warning(s) like these"] if more > 0 else [])


def _record(
    dataset_id: str, name: str, data: DetectionData, root: str, source: str, warnings: list[str]
) -> DatasetRecord:
    return DatasetRecord(
        id=dataset_id,
        name=name,
        format=data.format,
        num_images=len(data.images),
        num_boxes=data.num_boxes,
        classes=list(data.classes),
        created_at=now_iso(),
        source=source,
        root=root,
        warnings=warnings,
    )


def _commit(incoming: Path, record: DatasetRecord, settings: Settings, store: Store) -> None:
    """Publish the built folder to the storage, record the dataset in Redis, then move the folder
    into place. Until the record is in Redis the folder keeps its incoming name, so whatever a
    crash leaves is found and settled at the next start (``core.leftovers.settle_imports``).

    Raises:
        StorageUnavailable: the bucket refused it.
        redis.RedisError: Redis could not take the record (what reached the bucket is removed).
    """
    (incoming / DATASET_FILE).write_text(record.model_dump_json(indent=2), encoding="utf-8")
    settings.storage.publish_dataset(record, incoming)
    try:
        store.put_dataset(record)
    except BaseException:
        settings.storage.remove_dataset(record.id)
        raise
    settings.storage.place_dataset(record.id, incoming)


def import_archive(
    upload: IO[bytes], filename: str, name: str | None, settings: Settings, store: Store
) -> DatasetRecord:
    """Check, extract and read a COCO, VOC or YOLO zip, and store the dataset; returns its record.

    Raises:
        DatasetImportError: naming the archive and the problem (``too_large`` for the limits).
    """
    dataset_id = new_id()
    incoming = settings.datasets_dir / incoming_name(dataset_id)
    files = incoming / DATASET_FILES_DIR
    try:
        try:
            extract_archive(upload, filename, files, archive_limits(settings))
        except ArchiveError as error:
            raise DatasetImportError(str(error), error.too_large) from error
        root = find_root(files)
        try:
            data = read_dataset(root)
        except DatasetError as error:
            raise DatasetImportError(_problem_text(error, files, filename)) from error
        if not data.images:
            raise DatasetImportError(f"{filename}: the dataset holds no images")
        record = _record(
            dataset_id,
            name or Path(filename).stem,
            data,
            root.relative_to(incoming).as_posix(),
            "upload",
            _warnings(data, files),
        )
        _commit(incoming, record, settings, store)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return record


def create_synthetic(
    num_images: int, seed: int, image_size: tuple[int, int], name: str | None, settings: Settings, store: Store
) -> DatasetRecord:
    """Generate a shapes dataset (``model.data.make_shapes_dataset``) and store it like an upload."""
    dataset_id = new_id()
    incoming = settings.datasets_dir / incoming_name(dataset_id)
    try:
        data = make_shapes_dataset(incoming / DATASET_FILES_DIR, num_images, seed=seed, image_size=image_size)
        name = name or f"shapes-{num_images}-seed{seed}"
        record = _record(dataset_id, name, data, DATASET_FILES_DIR, "synthetic", _warnings(data))
        _commit(incoming, record, settings, store)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return record
