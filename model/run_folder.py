"""A training run's folder as ``fit`` writes it: the names of its files, and replacing files whole
(a crash leaves the old file or the new one, never half of one).

A new file is written to a temporary file beside its target (``.<name>.<owner>.<random>.tmp``),
flushed and fsynced, then renamed over the target, and the folder is fsynced so the rename
itself survives a power cut. ``<owner>`` names the process that wrote the temporary file
(``process_owner``), so that the service can tell the leftovers of a dead writer from files still
being written (``core.leftovers``). ``RunFolder`` is a training run's folder as ``fit`` sees it:
every file ``fit`` writes goes through ``RunFolder.replace``, so the service can decide, at the
moment of the rename, whether this run may still write there (``core.lease``).

The service's whole data folder and bucket layout, of which a run folder is a part, is ``core.layout``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# A training run's folder: written by ``model.training.fit``.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
LOSS_PLOT = "losses.png"

# Work in progress, and work being thrown away.
TEMP_SUFFIX = ".tmp"
TRASH_PREFIX = ".trash-"

_owner: dict[str, int | str] = {"pid": -1, "token": ""}


def process_owner() -> str:
    """This process's owner token (hex, no dots or dashes): a fresh one in each process, forks included."""
    if _owner["pid"] != os.getpid():
        _owner.update(pid=os.getpid(), token=secrets.token_hex(8))
    return str(_owner["token"])


def temp_prefix(target_name: str) -> str:
    """The prefix of a temporary file that will replace ``target_name``; a random part and ``TEMP_SUFFIX`` follow."""
    return f".{target_name}.{process_owner()}."


def temp_owner(name: str) -> str | None:
    """The owner token in a temporary file's name (``.<target>.<owner>.<random>.tmp``), or None if it has none."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    return parts[1] if len(parts) == 3 and parts[1] else None


def trash_name(record_id: str) -> str:
    """A fresh name to rename a folder to before deleting it, so a half-deleted folder is never read."""
    return f"{TRASH_PREFIX}{record_id}-{secrets.token_hex(3)}"


Writer = Callable[[IO[bytes]], object]  # what it returns (file.write's count) is ignored


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
    """Delete ``folder`` (if it exists): renamed aside first (``trash_name``), so a half-deleted
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
