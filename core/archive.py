"""Zip archives from users, checked before and while they are extracted: no framework, no storage.

Before ``zipfile`` builds its list of entries (memory grows with their number), the central
directory is walked record by record to count them against ``ArchiveLimits.max_files``
(``count_entries``). Then every entry's path is checked (no absolute paths, no ``..``, no
symbolic links, nothing encrypted), and its compression ratio and the total uncompressed size
against the limits, before anything is extracted (``checked_members``); the bytes written are
counted again while extracting (``extract_members``), so a header that lies about sizes cannot
get past the limit either.
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from model.data.images import safe_relative_path

_JUNK_DIRS = {"__MACOSX"}
_JUNK_FILES = {".DS_Store", "Thumbs.db"}
_CHUNK = 1024 * 1024
MAX_CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 1024

# Zip records (APPNOTE.TXT 4.3.12-4.3.16): end of central directory, its ZIP64 locator and
# record, and the fixed part of a central directory header (name, extra, comment lengths at 28).
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CD_HEADER_SIZE = 46

Member = tuple[zipfile.ZipInfo, Path]


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold: entries, uncompressed bytes in all, and the compression ratio of an entry
    (uncompressed / compressed) over ``ratio_checked_above`` bytes (smaller ones may compress as well as
    they like)."""

    max_files: int
    max_bytes: int
    max_compression_ratio: float
    ratio_checked_above: int = 1024 * 1024


class ArchiveError(ValueError):
    """An archive refused, its message naming the archive and the problem. ``too_large``: it is over
    a limit (entries, bytes, compression ratio); otherwise its content is bad."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def is_junk(path: PurePosixPath) -> bool:
    """What archivers add beside the files (macOS resource forks, Finder and Explorer caches)."""
    return bool(_JUNK_DIRS & set(path.parts)) or path.name in _JUNK_FILES or path.name.startswith("._")


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
        ArchiveError: too large, past ``limit`` entries or with an oversized central directory.
    """
    found = _end_of_central_directory(upload)
    if found is None:
        return 0
    claimed, cd_size, start = found
    too_many = f"{filename}: the archive holds more than {limit} entries; the limit is {limit}"
    if claimed > limit:
        raise ArchiveError(f"{filename}: the archive holds {claimed} entries; the limit is {limit}", too_large=True)
    if cd_size > max(limit * MAX_CENTRAL_DIRECTORY_BYTES_PER_ENTRY, _CHUNK):
        raise ArchiveError(f"{filename}: the archive's central directory is {cd_size} bytes: too large", too_large=True)
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
                raise ArchiveError(too_many, too_large=True)
        pending = data[at:]
        if not chunk or (len(pending) >= 4 and pending[:4] != b"PK\x01\x02"):
            return count


def checked_members(archive: zipfile.ZipFile, filename: str, limits: ArchiveLimits) -> list[Member]:
    """The archive's file entries to extract, each with its relative path, after every check.

    Raises:
        ArchiveError: for an escaping path, a symbolic link, an encrypted entry or an empty
            archive; too large for too many entries, too many uncompressed bytes or an entry
            compressed past the ratio (a zip bomb).
    """
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise ArchiveError(
            f"{filename}: the archive holds {len(infos)} entries; the limit is {limits.max_files}", too_large=True
        )
    members: list[Member] = []
    total = 0
    for info in infos:
        path = safe_relative_path(info.filename)
        if path is None:
            raise ArchiveError(
                f"{filename}: entry {info.filename!r} has a path escaping the archive (absolute or with '..')"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{filename}: entry {info.filename!r} is a symbolic link; links are not accepted")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{filename}: entry {info.filename!r} is encrypted; send an unencrypted zip")
        if info.is_dir() or is_junk(path):
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_checked_above and ratio > limits.max_compression_ratio:
            raise ArchiveError(
                f"{filename}: entry {info.filename!r} would unpack to {ratio:.0f} times its compressed size "
                f"(the limit is {limits.max_compression_ratio:g}): refused as a zip bomb",
                too_large=True,
            )
        total += info.file_size
        if total > limits.max_bytes:
            raise ArchiveError(
                f"{filename}: the archive unpacks to more than {limits.max_bytes} bytes (the limit)", too_large=True
            )
        members.append((info, Path(*path.parts)))
    if not members:
        raise ArchiveError(f"{filename}: the archive holds no files")
    return members


def extract_members(archive: zipfile.ZipFile, members: list[Member], target: Path, filename: str, limit: int) -> None:
    """Write the checked entries under ``target``, counting the bytes actually written against ``limit``."""
    target.mkdir(parents=True)
    root = target.resolve()
    written = 0
    for info, relative in members:
        try:
            destination = (target / relative).resolve()
            if root not in destination.parents:  # belt and braces after checked_members
                raise ArchiveError(f"{filename}: entry {info.filename!r} escapes the archive")
            # An entry "a" then "a/b", or a name too long for the file system, fails here.
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(destination, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise ArchiveError(
                            f"{filename}: the archive unpacks to more than {limit} bytes", too_large=True
                        )
                    sink.write(chunk)
        except OSError as error:  # the message only, never our folder's path
            problem = error.strerror or type(error).__name__
            raise ArchiveError(f"{filename}: entry {info.filename!r} cannot be extracted: {problem}") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
            raise ArchiveError(f"{filename}: entry {info.filename!r} cannot be extracted: {error}") from error


def extract_archive(upload: IO[bytes], filename: str, target: Path, limits: ArchiveLimits) -> None:
    """Check the zip ``upload`` against ``limits`` and extract its files (not its junk) into ``target``, a
    folder it creates.

    Raises:
        ArchiveError: not a zip, a corrupt one, or one refused by a check (``too_large`` for the limits).
    """
    if not zipfile.is_zipfile(upload):
        raise ArchiveError(f"{filename}: not a zip archive; send a .zip holding a COCO, VOC or YOLO dataset")
    count_entries(upload, filename, limits.max_files)
    upload.seek(0)
    try:
        with zipfile.ZipFile(upload) as archive:
            members = checked_members(archive, filename, limits)
            extract_members(archive, members, target, filename, limits.max_bytes)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{filename}: corrupt zip archive: {error}") from error
