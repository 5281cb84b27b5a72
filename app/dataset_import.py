"""Turning an uploaded archive (or a synthetic request) into a stored dataset, atomically.

A dataset lives in ``<data_dir>/datasets/<id>/``: ``files/`` holds what the archive held
(read with ``model.data.read_dataset``) and ``dataset.json`` the record also kept in Redis.
It is built in ``datasets/.incoming-<id>/`` and renamed into place only once it has been
read without problems, so a failed import leaves nothing behind.

Archives come from users: every entry's path is checked (no absolute paths, no ``..``, no
symbolic links) and the entry count and total uncompressed size are checked against the
limits before anything is extracted; the bytes written are counted again while extracting,
so a header that lies about sizes cannot get past the limit either.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from model.data import DatasetError, DetectionData, make_shapes_dataset, read_dataset
from worker.settings import Settings
from worker.store import new_id, now_iso

_JUNK_DIRS = {"__MACOSX"}
_JUNK_FILES = {".DS_Store", "Thumbs.db"}
_CHUNK = 1024 * 1024


class DatasetImportError(ValueError):
    """An archive that cannot become a dataset. ``status_code`` is 400 (bad content) or 413 (too large)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


def _entry_path(name: str) -> PurePosixPath | None:
    """An archive entry's path, or None if it is absolute, has a drive, or climbs out with ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        return None
    return path


def _is_junk(path: PurePosixPath) -> bool:
    return bool(_JUNK_DIRS & set(path.parts)) or path.name in _JUNK_FILES or path.name.startswith("._")


def checked_members(archive: zipfile.ZipFile, filename: str, settings: Settings) -> list[tuple[zipfile.ZipInfo, Path]]:
    """The archive's file entries to extract, each with its relative path, after every check.

    Raises:
        DatasetImportError: 400 for an escaping path, a symbolic link, an encrypted entry or
            an empty archive; 413 for too many entries or too many uncompressed bytes.
    """
    infos = archive.infolist()
    if len(infos) > settings.max_archive_files:
        raise DatasetImportError(
            f"{filename}: the archive holds {len(infos)} entries; the limit is {settings.max_archive_files}", 413
        )
    members: list[tuple[zipfile.ZipInfo, Path]] = []
    total = 0
    for info in infos:
        path = _entry_path(info.filename)
        if path is None:
            raise DatasetImportError(
                f"{filename}: entry {info.filename!r} has a path escaping the archive (absolute or with '..')"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetImportError(f"{filename}: entry {info.filename!r} is a symbolic link; links are not accepted")
        if info.flag_bits & 0x1:
            raise DatasetImportError(f"{filename}: entry {info.filename!r} is encrypted; send an unencrypted zip")
        if info.is_dir() or _is_junk(path) or not path.parts:
            continue
        total += info.file_size
        if total > settings.max_archive_bytes:
            raise DatasetImportError(
                f"{filename}: the archive unpacks to more than {settings.max_archive_bytes} bytes (the limit)", 413
            )
        members.append((info, Path(*path.parts)))
    if not members:
        raise DatasetImportError(f"{filename}: the archive holds no files")
    return members


def extract_members(
    archive: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, Path]], target: Path, filename: str, limit: int
) -> None:
    """Write the checked entries under ``target``, counting the bytes actually written against ``limit``."""
    target.mkdir(parents=True)
    root = target.resolve()
    written = 0
    for info, relative in members:
        destination = (target / relative).resolve()
        if root not in destination.parents:  # belt and braces after checked_members
            raise DatasetImportError(f"{filename}: entry {info.filename!r} escapes the archive")
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as source, open(destination, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise DatasetImportError(f"{filename}: the archive unpacks to more than {limit} bytes", 413)
                    sink.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as error:
            raise DatasetImportError(f"{filename}: entry {info.filename!r} cannot be extracted: {error}") from error


def find_root(folder: Path) -> Path:
    """The folder to read: ``folder``, or the one folder it holds when it holds nothing else (``mydata/``)."""
    for _ in range(3):
        entries = [p for p in folder.iterdir() if not _is_junk(PurePosixPath(p.name))]
        if len(entries) != 1 or not entries[0].is_dir() or (entries[0] / "Annotations").is_dir():
            break
        folder = entries[0]
    return folder


def _problem_text(error: DatasetError, files: Path, filename: str) -> str:
    """The reader's problems with the temporary folder's path replaced by paths inside the archive."""
    prefixes = sorted({str(files), str(files.resolve())}, key=len, reverse=True)
    problems = []
    for problem in error.problems[:20]:
        for prefix in prefixes:
            problem = problem.replace(prefix + os.sep, "").replace(prefix, "(archive top level)")
        problems.append(problem)
    more = len(error.problems) - len(problems)
    return f"{filename}: " + "; ".join(problems) + (f"; and {more} more problem(s)" if more > 0 else "")


def _record(dataset_id: str, name: str, data: DetectionData, root: str, source: str) -> dict[str, Any]:
    return {
        "id": dataset_id,
        "name": name,
        "format": data.format,
        "num_images": len(data.images),
        "num_boxes": data.num_boxes,
        "classes": list(data.classes),
        "created_at": now_iso(),
        "source": source,
        "root": root,
    }


def _commit(incoming: Path, final: Path, record: dict[str, Any]) -> None:
    (incoming / "dataset.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.rename(incoming, final)


def import_archive(upload: IO[bytes], filename: str, name: str | None, settings: Settings) -> dict[str, Any]:
    """Check, extract and read a COCO or VOC zip; returns the new dataset's record (not yet in Redis).

    Raises:
        DatasetImportError: naming the archive and the problem (status 400 or 413).
    """
    if not zipfile.is_zipfile(upload):
        raise DatasetImportError(f"{filename}: not a zip archive; send a .zip holding a COCO or VOC dataset")
    upload.seek(0)
    dataset_id = new_id()
    incoming = settings.datasets_dir / f".incoming-{dataset_id}"
    files = incoming / "files"
    try:
        with zipfile.ZipFile(upload) as archive:
            members = checked_members(archive, filename, settings)
            extract_members(archive, members, files, filename, settings.max_archive_bytes)
        root = find_root(files)
        try:
            data = read_dataset(root)
        except DatasetError as error:
            raise DatasetImportError(_problem_text(error, files, filename)) from error
        if not data.images:
            raise DatasetImportError(f"{filename}: the dataset holds no images")
        record = _record(dataset_id, name or Path(filename).stem, data, root.relative_to(incoming).as_posix(), "upload")
        _commit(incoming, settings.datasets_dir / dataset_id, record)
    except zipfile.BadZipFile as error:
        raise DatasetImportError(f"{filename}: corrupt zip archive: {error}") from error
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return record


def create_synthetic(
    num_images: int, seed: int, image_size: tuple[int, int], name: str | None, settings: Settings
) -> dict[str, Any]:
    """Generate a shapes dataset (``model.data.make_shapes_dataset``) and store it like an upload."""
    dataset_id = new_id()
    incoming = settings.datasets_dir / f".incoming-{dataset_id}"
    try:
        data = make_shapes_dataset(incoming / "files", num_images, seed=seed, image_size=image_size)
        record = _record(dataset_id, name or f"shapes-{num_images}-seed{seed}", data, "files", "synthetic")
        _commit(incoming, settings.datasets_dir / dataset_id, record)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return record


def remove_dataset_files(dataset_id: str, settings: Settings) -> None:
    """Delete a dataset's folder: renamed aside first, so a half-deleted folder is never read."""
    folder = settings.datasets_dir / dataset_id
    if not folder.exists():
        return
    trash = settings.datasets_dir / f".trash-{dataset_id}-{secrets.token_hex(3)}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
