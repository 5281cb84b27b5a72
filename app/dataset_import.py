"""Turning an uploaded archive (or a synthetic request) into a stored dataset, atomically.

A dataset lives in ``<data_dir>/datasets/<id>/``: ``files/`` holds what the archive held
(read with ``model.data.read_dataset``) and ``dataset.json`` the record also kept in Redis
(names in ``core.layout``). It is built in ``datasets/.incoming-<owner>-<id>/``, read,
published to the storage (uploaded, with a bucket), recorded in Redis, and only then renamed
into place (``_commit``): a failed import leaves nothing behind, and what a killed one leaves
keeps its incoming name, which the next start settles (``core.leftovers``).

Archives come from users. Before ``zipfile`` builds its list of entries (memory grows with
their number), the central directory is walked record by record to count them against
``max_archive_files``. Then every entry's path is checked (no absolute paths, no ``..``, no
symbolic links), and its compression ratio and the total uncompressed size are checked
against the limits before anything is extracted; the bytes written are counted again while
extracting, so a header that lies about sizes cannot get past the limit either.

Imports run on a thread pool of their own (``ImportSlots``), not the one that serves the
other routes. A request that finds every slot busy is turned away before its body is read
(``ImportAdmission``): an upload never fills the disk only to be refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import struct
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from core.layout import DATASET_FILE, DATASET_FILES_DIR, incoming_name
from core.records import DatasetRecord, now_iso
from core.settings import Settings
from core.store import Store, new_id
from model.data import DatasetError, DetectionData, make_shapes_dataset, read_dataset
from model.data.images import safe_relative_path

_JUNK_DIRS = {"__MACOSX"}
_JUNK_FILES = {".DS_Store", "Thumbs.db"}
_CHUNK = 1024 * 1024
RATIO_CHECKED_ABOVE = 1024 * 1024  # entries smaller than this may compress as well as they like
MAX_CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 1024
IMPORT_ROUTES = {("POST", "/datasets"), ("POST", "/datasets/synthetic")}

# Zip records (APPNOTE.TXT 4.3.12-4.3.16): end of central directory, its ZIP64 locator and
# record, and the fixed part of a central directory header (name, extra, comment lengths at 28).
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CD_HEADER_SIZE = 46

T = TypeVar("T")


class DatasetImportError(ValueError):
    """An archive that cannot become a dataset. ``status_code`` is 400 (bad content) or 413 (too large)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


class ImportsBusy(RuntimeError):
    """Every import slot is taken: the client should try again later (503 with Retry-After)."""


class ImportPermit:
    """A reserved import slot, freed once (``release``) by whoever holds it last."""

    def __init__(self, free: threading.BoundedSemaphore):
        self._free = free
        self._released = False
        self._lock = threading.Lock()
        self.handed_over = False  # to an import's thread, which frees it when done

    def release(self) -> None:
        with self._lock:
            if not self._released:
                self._released = True
                self._free.release()


class ImportSlots:
    """Dataset imports on a bounded thread pool of their own: ``slots`` at once, more are refused.

    A slot is reserved before the request's body is read (``reserve``) and freed when its
    import's thread is done, not when the request that started it goes away, so the count
    never runs ahead of the threads.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="ssd-import")

    def reserve(self) -> ImportPermit:
        """A free slot, or ImportsBusy."""
        if not self._free.acquire(blocking=False):
            raise ImportsBusy(f"{self.slots} dataset imports are running (the limit): try again in a minute")
        return ImportPermit(self._free)

    async def run(self, permit: ImportPermit, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the import pool, in the slot ``permit`` reserved (freed when it is done)."""
        permit.handed_over = True
        future = self.executor.submit(function, *args)
        future.add_done_callback(lambda _: permit.release())
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ImportAdmission:
    """Reserves an import slot for ``IMPORT_ROUTES`` before anything of the request is read: 503 with
    Retry-After when every slot is busy. The route finds the permit in ``request.state.import_permit``;
    a permit the route did not hand to an import is freed when the request ends."""

    def __init__(self, app: ASGIApp, slots: ImportSlots):
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) not in IMPORT_ROUTES:
            await self.app(scope, receive, send)
            return
        try:
            permit = self.slots.reserve()
        except ImportsBusy as error:
            body = json.dumps({"detail": str(error)}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"30"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["import_permit"] = permit
        try:
            await self.app(scope, receive, send)
        finally:
            if not permit.handed_over:
                permit.release()


def _end_of_central_directory(upload: IO[bytes]) -> tuple[int, int, int] | None:
    """``(entries, central directory size, its start)`` from the end records, or None if there are none.

    The start is computed as ``zipfile`` does: the directory ends where the end record
    begins (which also holds for archives with data prepended, like self-extractors).
    """
    size = upload.seek(0, os.SEEK_END)
    tail_size = min(size, _EOCD.size + 65535)
    upload.seek(size - tail_size)
    tail = upload.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        record_at = end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        if record_at >= 0:
            upload.seek(record_at)
            record = upload.read(_ZIP64_EOCD.size)
            if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
                fields = _ZIP64_EOCD.unpack(record)
                entries, cd_size, end = fields[7], fields[8], record_at
    return entries, cd_size, end - cd_size


def count_entries(upload: IO[bytes], filename: str, limit: int) -> int:
    """The archive's entry count, read from its central directory record by record.

    ``zipfile.ZipFile`` builds an object per entry before anything can be checked: a
    1 GiB upload of empty entries costs gigabytes of memory. This walk holds one chunk.
    A directory that does not parse is left for ``zipfile`` to report.

    Raises:
        DatasetImportError: 413 past ``limit`` entries or with an oversized central directory.
    """
    found = _end_of_central_directory(upload)
    if found is None:
        return 0
    claimed, cd_size, start = found
    too_many = f"{filename}: the archive holds more than {limit} entries; the limit is {limit}"
    if claimed > limit:
        raise DatasetImportError(f"{filename}: the archive holds {claimed} entries; the limit is {limit}", 413)
    if cd_size > max(limit * MAX_CENTRAL_DIRECTORY_BYTES_PER_ENTRY, _CHUNK):
        raise DatasetImportError(f"{filename}: the archive's central directory is {cd_size} bytes: too large", 413)
    upload.seek(max(start, 0))
    count, left, pending = 0, cd_size, b""
    while True:
        chunk = upload.read(min(_CHUNK, left)) if left > 0 else b""
        left -= len(chunk)
        data, at = pending + chunk, 0
        while len(data) - at >= _CD_HEADER_SIZE and data[at : at + 4] == b"PK\x01\x02":
            name, extra, comment = struct.unpack_from("<3H", data, at + 28)
            record = _CD_HEADER_SIZE + name + extra + comment
            if len(data) - at < record:
                break
            at += record
            count += 1
            if count > limit:
                raise DatasetImportError(too_many, 413)
        pending = data[at:]
        if not chunk or (len(pending) >= 4 and pending[:4] != b"PK\x01\x02"):
            return count


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
        path = safe_relative_path(info.filename)
        if path is None:
            raise DatasetImportError(
                f"{filename}: entry {info.filename!r} has a path escaping the archive (absolute or with '..')"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetImportError(f"{filename}: entry {info.filename!r} is a symbolic link; links are not accepted")
        if info.flag_bits & 0x1:
            raise DatasetImportError(f"{filename}: entry {info.filename!r} is encrypted; send an unencrypted zip")
        if info.is_dir() or _is_junk(path):
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_CHECKED_ABOVE and ratio > settings.max_compression_ratio:
            raise DatasetImportError(
                f"{filename}: entry {info.filename!r} would unpack to {ratio:.0f} times its compressed size "
                f"(the limit is {settings.max_compression_ratio:g}): refused as a zip bomb",
                413,
            )
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
        try:
            destination = (target / relative).resolve()
            if root not in destination.parents:  # belt and braces after checked_members
                raise DatasetImportError(f"{filename}: entry {info.filename!r} escapes the archive")
            # An entry "a" then "a/b", or a name too long for the file system, fails here.
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(destination, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise DatasetImportError(f"{filename}: the archive unpacks to more than {limit} bytes", 413)
                    sink.write(chunk)
        except OSError as error:  # the message only, never our folder's path
            problem = error.strerror or type(error).__name__
            raise DatasetImportError(f"{filename}: entry {info.filename!r} cannot be extracted: {problem}") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
            raise DatasetImportError(f"{filename}: entry {info.filename!r} cannot be extracted: {error}") from error


def find_root(folder: Path) -> Path:
    """The folder to read: ``folder``, or the one folder it holds when it holds nothing else (``mydata/``)."""
    for _ in range(3):
        entries = [p for p in folder.iterdir() if not _is_junk(PurePosixPath(p.name))]
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
        DatasetImportError: naming the archive and the problem (status 400 or 413).
    """
    if not zipfile.is_zipfile(upload):
        raise DatasetImportError(f"{filename}: not a zip archive; send a .zip holding a COCO, VOC or YOLO dataset")
    count_entries(upload, filename, settings.max_archive_files)
    upload.seek(0)
    dataset_id = new_id()
    incoming = settings.datasets_dir / incoming_name(dataset_id)
    files = incoming / DATASET_FILES_DIR
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
        record = _record(
            dataset_id,
            name or Path(filename).stem,
            data,
            root.relative_to(incoming).as_posix(),
            "upload",
            _warnings(data, files),
        )
        _commit(incoming, record, settings, store)
    except zipfile.BadZipFile as error:
        raise DatasetImportError(f"{filename}: corrupt zip archive: {error}") from error
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
