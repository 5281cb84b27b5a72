"""Local copies of bucket objects, bounded in size: the least recently used go first.

Each entry is a file or a folder under ``<data folder>/cache/``, named by a hash of its key,
with a ``.size`` file beside it (its bytes, so that eviction reads no folder) and a ``.lock``.
Keys name immutable things only (an object version the run manifest points to, a dataset,
which never changes once imported), so an entry is never stale: a changed file is a new key.

A process using an entry holds a shared ``flock`` on its lock file; eviction takes the lock
exclusively without waiting, so an entry in use (a dataset a run trains on) is never removed
under its user, and removes the lock file with the entry. The first user of a missing entry
fills it under a ``.fill`` lock of its own, so that two processes never download the same
object twice, and nobody waits for an entry in use. Entries are built beside their place under
names ``core.leftovers`` knows (``.incoming-<owner>-...``), then renamed into place: a reader
never sees half of one, and what a dead process left is removed at the next start.
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

from core.layout import incoming_name

log = logging.getLogger(__name__)

_LOCK = ".lock"
_FILL = ".fill"
_SIZE = ".size"


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@contextmanager
def _locked(path: Path, how: int) -> Iterator[int]:
    """Hold ``flock(how)`` on the file ``path``, created if missing; a file another process unlinked
    between our open and our lock (eviction) is opened again, so the lock is on the live file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, how)
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


class LocalCache:
    """Entries under ``root``, at most ``max_bytes`` of them in all, apart from those in use."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def _entry(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _temp(self, entry: Path) -> Path:
        return self.root / incoming_name(f"{entry.name}-{secrets.token_hex(4)}")

    @contextmanager
    def use(self, key: str, fetch: Callable[[Path], None]) -> Iterator[Path]:
        """The local copy of ``key`` for the length of the ``with`` block; ``fetch(path)`` makes it
        (a file or a folder at ``path``) when the cache lacks it."""
        entry = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(_beside(entry, _LOCK), fcntl.LOCK_SH):
            if not entry.exists():
                with _locked(_beside(entry, _FILL), fcntl.LOCK_EX):
                    if not entry.exists():  # not filled by whoever held the fill lock before us
                        self._fill(entry, fetch)
            os.utime(entry)  # its last use: eviction goes by it
            self.evict()
            yield entry

    def adopt(self, key: str, path: Path) -> None:
        """Move ``path`` (a file or folder this process made) into the cache as ``key``'s entry."""
        entry = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            _beside(entry, _SIZE).write_text(str(_bytes(path)))
            _beside(entry, _LOCK).touch()  # eviction takes an entry's lock before it removes it
            os.rename(path, entry)
            os.utime(entry)  # just made: the last to go
        except OSError:  # another process has it already (or the disk refuses): the copy is not needed
            _remove(path)
        self.evict()

    def _fill(self, entry: Path, fetch: Callable[[Path], None]) -> None:
        temp = self._temp(entry)
        try:
            fetch(temp)
            _beside(entry, _SIZE).write_text(str(_bytes(temp)))
            os.rename(temp, entry)
        finally:
            _remove(temp)

    def evict(self) -> int:
        """Remove least recently used entries nobody uses until the rest fit in ``max_bytes``; bytes freed."""
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or "." in path.name:  # temporaries, and the .size/.lock/.fill files
                continue
            try:
                entries.append((path.stat().st_mtime, int(_beside(path, _SIZE).read_text()), path))
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

    def discard(self, key: str) -> bool:
        """Remove ``key``'s entry (its object is gone) unless it is in use; whether it was removed.
        An entry in use stays until eviction finds it unused."""
        return self._remove_unused(self._entry(key))

    def _remove_unused(self, entry: Path) -> bool:
        if not entry.exists():
            return False
        # The lock file is created if missing: entries adopted by earlier versions came without one.
        fd = os.open(_beside(entry, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            trash = self._temp(entry)
            os.rename(entry, trash)  # a reader never sees half of a removed entry
            for suffix in (_SIZE, _FILL, _LOCK):  # the lock last, still held: a waiter then opens a new one
                _beside(entry, suffix).unlink(missing_ok=True)
            _remove(trash)
            return True
        except (BlockingIOError, FileNotFoundError):  # in use, or removed by another process meanwhile
            return False
        finally:
            os.close(fd)
