"""What killed writers leave in the data folder, and telling it from work in progress.

Each service process (the API, each worker) holds an ``flock`` on ``owners/<owner>.lock``
for its whole life (``hold_owner_lock``), before it writes anything. Its temporary files and
import folders carry its owner token in their names (``core.layout``). The kernel releases
a lock when its process dies, however it dies, so at the next start of any service process
``remove_leftovers`` deletes, whatever their age:

- temporary files (``*.tmp``) in run folders and in the data folder's top folders, and
  ``.incoming-*`` import folders, a bucket's run working copies and cache entries being
  filled, whose owner's lock nobody holds (or that name no owner);
- ``.trash-*`` folders (a delete renames a folder aside before removing it);
- the lock files of dead owners.

An import folder that holds its ``dataset.json`` had reached publishing: its archive may be
in the bucket, its record in Redis (``core.dataset_import._commit``). ``settle_imports`` finishes
such an import if Redis has its record (the folder goes into place), and removes it with
whatever reached the storage otherwise.

A process that is alive but frozen keeps its lock, and its files stay.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from core.layout import (
    DATASET_FILE,
    INCOMING_PREFIX,
    OWNER_LOCK_SUFFIX,
    TEMP_SUFFIX,
    TRASH_PREFIX,
    DataLayout,
    incoming_owner,
    process_owner,
    temp_owner,
)
from core.store import REDIS_ERRORS, Store

if TYPE_CHECKING:
    from core.storage import Storage

log = logging.getLogger(__name__)

_held: dict[str, int] = {}  # owner lock path -> the open descriptor that holds it


def hold_owner_lock(layout: DataLayout) -> Path:
    """Lock this process's ``owners/<owner>.lock`` for the rest of its life (once per process and folder)."""
    path = layout.owner_lock(process_owner())
    if str(path) not in _held:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh token: nobody else can hold it
        _held[str(path)] = fd
    return path


class _Owners:
    """Which owners are alive, asked once each per sweep."""

    def __init__(self, layout: DataLayout):
        self.layout = layout
        self.dead: set[str] = set()
        self._alive: set[str] = set()

    def is_dead(self, owner: str | None) -> bool:
        if owner is None:
            return True  # written before names carried owners, or not ours: nobody can still be writing it
        if owner in self._alive or owner == process_owner():
            return False
        if owner not in self.dead:
            (self.dead if _unlocked(self.layout.owner_lock(owner)) else self._alive).add(owner)
        return owner in self.dead


def _unlocked(path: Path) -> bool:
    """True if nobody holds ``path``'s lock (or there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_leftovers(layout: DataLayout) -> list[str]:
    """Delete what dead writers left (see the module docstring), but the imports ``settle_imports``
    settles; the names removed, relative to the data folder."""
    owners = _Owners(layout)
    removed: list[Path] = []
    for top in (layout.datasets_dir, layout.runs_dir, layout.cache_dir):
        for path in _entries(top):
            dead_import = path.name.startswith(INCOMING_PREFIX) and owners.is_dead(incoming_owner(path.name))
            if dead_import and top == layout.datasets_dir and (path / DATASET_FILE).is_file():
                continue  # it reached publishing: settle_imports
            if path.name.startswith(TRASH_PREFIX) or dead_import:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
            elif top == layout.runs_dir and path.is_dir():
                removed += _remove_dead_temps(path, owners)
        removed += _remove_dead_temps(top, owners)
    for lock in _entries(layout.owners_dir):
        owner = lock.name.removesuffix(OWNER_LOCK_SUFFIX)
        if lock.name.endswith(OWNER_LOCK_SUFFIX) and owners.is_dead(owner):
            lock.unlink(missing_ok=True)
    return [path.relative_to(layout.root).as_posix() for path in removed]


def _remove_dead_temps(folder: Path, owners: _Owners) -> list[Path]:
    removed = []
    for path in _entries(folder):
        if path.name.endswith(TEMP_SUFFIX) and path.is_file() and owners.is_dead(temp_owner(path.name)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def settle_imports(layout: DataLayout, store: Store, storage: Storage) -> list[str]:
    """Finish or remove the imports dead processes left once they had begun publishing (see the module
    docstring); what it did. One that cannot be settled now (Redis or the bucket away) waits for
    the next start."""
    owners = _Owners(layout)
    done = []
    for folder in _entries(layout.datasets_dir):
        owner = incoming_owner(folder.name)
        if owner is None or not (folder / DATASET_FILE).is_file() or not owners.is_dead(owner):
            continue
        dataset_id = folder.name[len(INCOMING_PREFIX) + len(owner) + 1 :]
        try:
            if store.get_dataset(dataset_id) is not None:  # recorded, not yet moved into place
                storage.place_dataset(dataset_id, folder)
                done.append(f"finished the import of dataset {dataset_id}")
                continue
            storage.remove_dataset(dataset_id)  # what reached a bucket
        except REDIS_ERRORS as error:
            log.warning("the interrupted import of dataset %s waits for the next start: %s", dataset_id, error)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        done.append(f"removed the interrupted import of dataset {dataset_id}")
    return done


def start_sweep(layout: DataLayout, store: Store | None = None, storage: Storage | None = None) -> threading.Thread:
    """Take this process's owner lock, then remove what dead writers left on a thread of its own:
    a data folder of many runs takes a while to walk, and nothing waits for it. With ``store`` and
    ``storage``, the imports that had begun publishing are settled too."""
    hold_owner_lock(layout)

    def sweep() -> None:
        try:
            removed = remove_leftovers(layout)
            if store is not None and storage is not None:
                removed += settle_imports(layout, store, storage)
        except OSError as error:  # the next start tries again
            log.warning("could not remove what interrupted writes left: %s", error)
            return
        if removed:
            log.info("removed what interrupted writes, imports and deletes left: %s", ", ".join(removed))

    thread = threading.Thread(target=sweep, name="ssd-leftovers", daemon=True)
    thread.start()
    return thread
