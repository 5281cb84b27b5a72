"""Where datasets and runs are kept: the data folder (``FolderStorage``), or an S3-compatible
bucket with the data folder as a bounded cache (``core.bucket_storage.BucketStorage``).

``SSD_STORAGE_URL`` picks one (``core.settings.open_storage``). Every process reads and writes
datasets, run folders and job records through this interface only, so the rest of the
service never asks which it is. In the data folder, the API and every worker must share
one file system; with a bucket, each needs only the bucket and Redis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from core.layout import DATASET_FILE, JOB_FILE, DataLayout
from core.lease import FencedRunFolder, Lease, LeasedRunFolder
from core.records import DatasetRecord, JobRecord
from core.run_files import keep_job_file, read_history, read_job_file, read_record, remove_run, save_job_file
from model.run_folder import RunFolder, remove_aside


class StorageUnavailable(OSError):
    """The storage cannot be reached or written (a bucket that is away or refuses the credentials)."""


class Storage(Protocol):
    """What the service does with datasets, runs and job records, wherever they are kept. ``FolderStorage``
    documents each method; ``str()`` names the storage for messages."""

    layout: DataLayout

    def check(self, thorough: bool = False) -> None: ...
    def publish_dataset(self, record: DatasetRecord, folder: Path) -> None: ...
    def place_dataset(self, dataset_id: str, folder: Path) -> None: ...
    def dataset_files(self, record: DatasetRecord) -> AbstractContextManager[Path]: ...
    def remove_dataset(self, dataset_id: str) -> None: ...
    def saved_datasets(self) -> Iterator[DatasetRecord]: ...
    def run_folder(self, job_id: str, lease: Lease) -> LeasedRunFolder: ...
    def end_run(self, folder: RunFolder) -> None: ...
    def run_file(self, job_id: str, name: str) -> AbstractContextManager[Path | None]: ...
    def derived_file(
        self, job_id: str, name: str, source: Path, make: Callable[[Path, Path], None]
    ) -> AbstractContextManager[Path]: ...
    def history(self, job_id: str) -> list[dict[str, Any]]: ...
    def remove_run(self, job_id: str) -> None: ...
    def save_job(self, record: JobRecord, create: bool = False) -> bool: ...
    def keep_job(self, record: JobRecord | None) -> None: ...
    def read_job(self, job_id: str) -> JobRecord | None: ...
    def has_run(self, job_id: str) -> bool: ...
    def saved_job_ids(self) -> list[str]: ...


class FolderStorage:
    """Datasets and runs in the data folder, which every process of the service shares."""

    def __init__(self, layout: DataLayout):
        self.layout = layout

    def __str__(self) -> str:
        return f"the data folder {self.layout.root}"

    def check(self, thorough: bool = False) -> None:
        """Raises StorageUnavailable unless datasets and runs can be stored. ``thorough``: also what is
        too slow to check on every readiness probe (at start-up)."""
        try:
            self.layout.datasets_dir.mkdir(parents=True, exist_ok=True)
            self.layout.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageUnavailable(f"cannot use {self}: {error}") from error

    # --- datasets ---------------------------------------------------------------------------

    def publish_dataset(self, record: DatasetRecord, folder: Path) -> None:
        """Store the dataset an import built in ``folder`` (with its ``dataset.json``) where every process
        can read it, before its record reaches Redis. In the data folder, ``place_dataset`` does it.

        Raises:
            StorageUnavailable: it could not be stored (nothing of it is kept).
        """

    def place_dataset(self, dataset_id: str, folder: Path) -> None:
        """Move the published ``folder`` into place, once the dataset's record is in Redis: until then
        it keeps the import's name, so what an import that died leaves is settled at the next start
        (``core.leftovers.settle_imports``)."""
        os.rename(folder, self.layout.dataset_dir(dataset_id))

    def dataset_files(self, record: DatasetRecord) -> AbstractContextManager[Path]:
        """The folder to read the dataset from (``model.data.read_dataset``), for a ``with`` block."""
        return nullcontext(self.layout.dataset_dir(record.id) / record.root)

    def remove_dataset(self, dataset_id: str) -> None:
        """Delete a dataset's files (``model.run_folder.remove_aside``: a half-deleted folder is never read)."""
        remove_aside(self.layout.dataset_dir(dataset_id))

    def saved_datasets(self) -> Iterator[DatasetRecord]:
        """Every dataset's saved record (``worker.rebuild`` puts back those Redis lost)."""
        for dataset_id in _ids_with(self.layout.datasets_dir, DATASET_FILE):
            record = read_record(DatasetRecord, self.layout.dataset_dir(dataset_id) / DATASET_FILE)
            if record is not None and record.id == dataset_id:
                yield record

    # --- runs -------------------------------------------------------------------------------

    def run_folder(self, job_id: str, lease: Lease) -> FencedRunFolder:
        """The folder ``fit`` writes for the run holding ``lease``; ``claim()`` it before use."""
        return FencedRunFolder(self.layout.run_dir(job_id), lease)

    def end_run(self, folder: RunFolder) -> None:
        """The run that wrote ``folder`` (from ``run_folder``) has ended, whatever became of its job."""

    def run_file(self, job_id: str, name: str) -> AbstractContextManager[Path | None]:
        """A readable copy of the run's file ``name`` for a ``with`` block, or None if it has none."""
        path = self.layout.run_dir(job_id) / name
        return nullcontext(path if path.is_file() else None)

    def derived_file(
        self, job_id: str, name: str, source: Path, make: Callable[[Path, Path], None]
    ) -> AbstractContextManager[Path]:
        """A file made from the run's file ``source`` (an export), made once with ``make(source, path)``.

        ``make`` writes ``path`` whole (atomically) and never creates the run folder: a job deleted
        meanwhile stays deleted (FileNotFoundError).
        """
        path = self.layout.run_dir(job_id) / name
        if not path.is_file():
            make(source, path)
        return nullcontext(path)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The run's epoch records (``metrics.jsonl``), oldest first."""
        return read_history(self.layout.run_dir(job_id))

    def remove_run(self, job_id: str) -> None:
        remove_run(self.layout, job_id)

    # --- job records ------------------------------------------------------------------------

    def save_job(self, record: JobRecord, create: bool = False) -> bool:
        """Save ``record`` unless the saved one is the same or a later revision; whether it was written.

        ``create``: a new job's; otherwise a job whose files were deleted is not brought back
        (FileNotFoundError).
        """
        return save_job_file(self.layout.run_dir(record.id), record, create=create)

    def keep_job(self, record: JobRecord | None) -> None:
        """``save_job`` where Redis already holds the change: a failure is logged, not raised."""
        if record is not None:
            keep_job_file(self.layout.run_dir(record.id), record)

    def read_job(self, job_id: str) -> JobRecord | None:
        return read_job_file(self.layout.run_dir(job_id))

    def has_run(self, job_id: str) -> bool:
        """Whether anything of the job is stored (its record or its files): not, once it was deleted."""
        return self.layout.run_dir(job_id).exists()

    def saved_job_ids(self) -> list[str]:
        """The jobs whose record is saved (``worker.rebuild``)."""
        return _ids_with(self.layout.runs_dir, JOB_FILE)


def _ids_with(root: Path, name: str) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / name).is_file())
