"""Replacing files whole: a crash leaves the old file or the new one, never half of one.

A new file is written to a temporary file beside its target (named by ``model.layout``),
flushed and fsynced, then renamed over the target, and the folder is fsynced so the rename
itself survives a power cut. ``RunFolder`` is a training run's folder as ``fit`` sees it:
every file ``fit`` writes goes through ``RunFolder.replace``, so the service can decide, at
the moment of the rename, whether this run may still write there (``worker.lease``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .layout import TEMP_SUFFIX, temp_prefix, trash_name

Writer = Callable[[IO[bytes]], None]


def write_temp(path: Path, write: Writer, make_folder: bool = True) -> Path:
    """Call ``write(file)`` on a fresh temporary file beside ``path``, flushed and fsynced; its path.

    ``make_folder``: create ``path``'s folder if it is missing (else FileNotFoundError).
    """
    path = Path(path)
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return Path(temp_name)


def commit_temp(temp: Path, path: Path) -> None:
    """Rename ``temp`` over ``path`` and make the rename durable."""
    os.replace(temp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: Path, write: Writer) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    temp = write_temp(path, write)
    try:
        commit_temp(temp, Path(path))
    finally:
        temp.unlink(missing_ok=True)


def remove_aside(folder: Path) -> None:
    """Delete ``folder`` (if it exists): renamed aside first (``layout.trash_name``), so a half-deleted
    folder is never read and a writer still at work finds it gone; a crash leaves the trash, which the
    next start removes."""
    folder = Path(folder)
    trash = folder.parent / trash_name(folder.name)
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunFolder:
    """A training run's folder: files are read by path and replaced whole.

    ``commit`` is the moment a new file takes its target's place; a subclass may refuse it
    there (by raising) when this run may no longer write the folder. The refused temporary
    file is removed. ``make_folder``: whether a write creates the folder if it is missing.
    """

    make_folder = True

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def replace(self, name: str, write: Writer) -> None:
        """Replace the file ``name`` with what ``write(file)`` writes."""
        target = self.file(name)
        temp = write_temp(target, write, self.make_folder)
        try:
            self.commit(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def commit(self, temp: Path, target: Path) -> None:
        commit_temp(temp, target)
