"""Local copies of bucket objects, bounded in size: the least recently used go first.

Each entry is a file or a folder under ``<data folder>/cache/``, named by a hash of its key.
Keys name immutable things only (an object version the run manifest points to, a dataset,
which never changes once imported), so an entry is never stale: a changed file is a new key.

A process using an entry holds a shared ``flock`` on its lock file; eviction takes the lock
exclusively without waiting, so an entry in use (a dataset a run trains on) is never removed
under its user. Entries are built beside their place under names ``worker.leftovers`` knows
(``.incoming-<owner>-...``), then renamed into place: a reader never sees half of one, and
what a dead process left is removed at the next start.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from model.layout import incoming_name

log = logging.getLogger(__name__)

_LOCK = ".lock"
_SIZE = ".size"


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LocalCache:
    """Entries under ``root``, at most ``max_bytes`` of them in all, apart from those in use."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def _entry(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    @contextmanager
    def use(self, key: str, fetch: Callable[[Path], None]) -> Iterator[Path]:
        """The local copy of ``key`` for the length of the ``with`` block; ``fetch(path)`` makes it
        (a file or a folder at ``path``) when the cache lacks it."""
        entry = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry.with_name(entry.name + _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not entry.exists():
                self._fill(entry, fetch)
            os.utime(entry)  # its last use: eviction goes by it
            self.evict()
            yield entry
        finally:
            os.close(fd)

    def adopt(self, key: str, path: Path) -> None:
        """Move ``path`` (a file or folder this process made) into the cache as ``key``'s entry."""
        entry = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            entry.with_name(entry.name + _SIZE).write_text(str(_folder_bytes(path)))
            os.rename(path, entry)
        except OSError:  # another process has it already (or the disk refuses): the copy is not needed
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.evict()

    def _fill(self, entry: Path, fetch: Callable[[Path], None]) -> None:
        temp = self.root / incoming_name(f"{entry.name}-{secrets.token_hex(4)}")
        try:
            fetch(temp)
            entry.with_name(entry.name + _SIZE).write_text(str(_folder_bytes(temp)))
            os.rename(temp, entry)
        except OSError:
            if not entry.exists():  # not a race another process won: a real failure
                raise
        finally:
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                temp.unlink(missing_ok=True)

    def evict(self) -> int:
        """Remove least recently used entries nobody uses until the rest fit in ``max_bytes``; bytes freed."""
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or "." in path.name:
                continue
            try:
                size = int(path.with_name(path.name + _SIZE).read_text())
                entries.append((path.stat().st_mtime, size, path))
            except (OSError, ValueError):
                continue
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= self.max_bytes:
                break
            if self._remove_unused(path):
                freed += size
        return freed

    def _remove_unused(self, entry: Path) -> bool:
        try:
            fd = os.open(entry.with_name(entry.name + _LOCK), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # in use
        try:
            trash = self.root / incoming_name(f"{entry.name}-{secrets.token_hex(4)}")
            os.rename(entry, trash)  # a reader never sees half of a removed entry
            entry.with_name(entry.name + _SIZE).unlink(missing_ok=True)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
