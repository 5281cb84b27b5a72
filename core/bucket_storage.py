"""Datasets and runs in an S3-compatible bucket; the data folder keeps a bounded cache.

The objects (names in ``core.layout``): a dataset is its zipped folder and then its record;
a run is its ``job.json``, its ``manifest.json`` and the file versions the manifest names.
A worker needs only Redis and the bucket: it copies a dataset into its cache on first use,
and a run it takes over into a working copy, so a job resumes on any machine.

**The run fence, in a bucket.** S3 has no lock, but it has conditional puts: a put with
``If-Match: <ETag>`` succeeds only if the object is still the version that ETag names.
Every version of a run's file is a new object (never overwritten), and a file takes its
place only when the manifest that names it is written, conditionally on the manifest
version this run wrote last. A run that takes a job over first rewrites the manifest with
its own lease token (the claim), so the manifest's ETag changes under every older run: the
next commit of a run that was frozen or cut off from Redis past its lease is refused
(``LeaseLost``), and the version it uploaded is deleted. A manifest version never repeats
an earlier one (each carries a fresh ``serial``), so an ETag never comes back.

``job.json`` moves forward the same way: it is replaced only by a later revision, with a put
conditional on the version read, retried when another writer came first.

Deleting a job removes its manifest first: a late commit of the job's last run then finds
nothing to match and writes nothing more.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from core.cache import LocalCache
from core.layout import (
    DATASET_ARCHIVE,
    DATASET_FILE,
    DATASETS_DIR,
    JOB_FILE,
    METRICS_FILE,
    RUN_MANIFEST,
    RUN_OBJECTS_DIR,
    RUNS_DIR,
    DataLayout,
    dataset_key,
    incoming_name,
    run_key,
    run_version_key,
)
from core.lease import Lease, LeasedRunFolder, LeaseLost, LostReason
from core.records import DatasetRecord, JobRecord
from core.run_files import RunFolderBusy, parse_history
from core.s3 import Bucket, BucketError, Conflict, Location
from core.storage import StorageUnavailable
from model.run_folder import RunFolder, commit_temp, write_temp

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 10  # a conditional put that keeps losing to other writers gives up after this many tries


class Manifest(BaseModel):
    """``runs/<job id>/manifest.json``: the run that may write (``fence``: its lease token) and the
    object holding each of its files (file name -> key relative to the bucket's prefix)."""

    fence: str = ""
    files: dict[str, str] = {}
    serial: str = ""  # fresh in every version: no two versions have the same bytes, hence ETag

    def changed(self, **changes: Any) -> Manifest:
        """A new version with ``changes`` (and a fresh serial)."""
        return self.model_copy(update={**changes, "serial": secrets.token_hex(8)})


class BucketRunFolder(LeasedRunFolder):
    """The working copy of a run's files on this machine, committed to the bucket file by file.

    ``claim`` fences older runs out and fills the working copy with the bucket's files;
    ``commit`` uploads a new file version and names it in the manifest (a conditional put).
    ``path`` is the working copy, which ``fit`` reads (its resume checkpoint): a folder of this
    run's own, named like an import in progress, so that what a dead worker left is removed at
    the next start (``core.leftovers``), and two runs of the job on one machine never share one.
    """

    def __init__(self, storage: BucketStorage, job_id: str, lease: Lease):
        super().__init__(storage.layout.runs_dir / incoming_name(f"{job_id}-{secrets.token_hex(4)}"))
        self.bucket = storage.bucket
        self.job_id = job_id
        self.lease = lease
        self.manifest = Manifest()
        self.etag: str | None = None

    @property
    def manifest_key(self) -> str:
        return run_key(self.job_id, RUN_MANIFEST)

    def claim(self) -> None:
        """Name this run in the manifest (older runs' commits are refused from now on), then make
        the working copy exactly what the bucket holds.

        Raises:
            LeaseLost: the lease is no longer trusted.
            RunFolderBusy: the manifest kept changing under this claim.
            BucketError: the bucket could not be read or written.
        """
        for _ in range(CONFLICT_RETRIES):
            self.lease.check()
            current, etag = _read_model(self.bucket, self.manifest_key, Manifest)
            if current is None and etag is not None:  # starting afresh would drop the run's checkpoints
                raise BucketError(f"{self.bucket.location}{self.manifest_key} cannot be read: the run cannot resume")
            claimed = (current or Manifest()).changed(fence=self.lease.token)
            try:
                self.etag = self.bucket.put(self.manifest_key, _json(claimed), if_match=etag, if_absent=etag is None)
            except Conflict:
                continue
            self.manifest = claimed
            break
        else:
            raise RunFolderBusy(f"{self.bucket.location}{self.manifest_key} kept changing while this run claimed it")
        self._sweep_unnamed_versions()
        self.path.mkdir(parents=True, exist_ok=True)
        for name, key in self.manifest.files.items():
            self.bucket.download(key, self.path / name)

    def _sweep_unnamed_versions(self) -> None:
        """Delete the file versions the manifest does not name: uploads whose manifest put failed, or
        whose run died before it. Once this run's claim is written, no older run's put can name one;
        and while this run trusts its lease no newer run has claimed the job (so none is uploading)."""
        named = set(self.manifest.files.values())
        for key in self.bucket.keys(run_key(self.job_id, f"{RUN_OBJECTS_DIR}/")):
            if key not in named:
                self.lease.check()
                _delete_quietly(self.bucket, key)

    def commit(self, temp: Path, target: Path) -> None:
        name = target.name
        key = run_version_key(self.job_id, name)
        self.lease.check()
        self.bucket.upload(key, temp)
        newer = self.manifest.changed(files={**self.manifest.files, name: key})
        try:
            self.lease.check()
            self.etag = self.bucket.put(self.manifest_key, _json(newer), if_match=self.etag)
        except LeaseLost:
            _delete_quietly(self.bucket, key)
            raise
        except Conflict:
            if not self._landed(newer, key):  # a newer run claimed the job, or the job was deleted
                self.lease.lost = LostReason.FENCED
                raise LeaseLost(LostReason.FENCED) from None
        older = self.manifest.files.get(name)
        self.manifest = newer
        commit_temp(temp, target)
        if older:
            _delete_quietly(self.bucket, older)

    def _landed(self, newer: Manifest, key: str) -> bool:
        """Whether the manifest is ``newer`` after all: a put whose answer was lost lands, and the
        client's retry of it is then refused (its ETag is the one the first attempt replaced).

        If not, the version ``key`` is deleted, unless the manifest names it: a newer run may have
        claimed the job after the lost put landed, and its manifest then carries that version on.
        """
        current, etag = _read_model(self.bucket, self.manifest_key, Manifest)
        if current == newer:
            self.etag = etag
            return True
        if current is None or key not in current.files.values():
            _delete_quietly(self.bucket, key)
        return False


class BucketStorage:
    """Datasets and runs in ``s3://bucket/prefix``; ``layout``'s data folder holds the cache and the
    working copies of the runs training here. Every failure to reach the bucket is a ``BucketError``
    (an ``OSError``) naming it."""

    def __init__(self, url: str, layout: DataLayout, cache_bytes: int, client: Any = None):
        self.bucket = Bucket(Location.parse(url), client)
        self.layout = layout
        self.cache = LocalCache(layout.cache_dir, cache_bytes)

    def __str__(self) -> str:
        return f"the bucket {self.bucket.location}"

    def check(self, thorough: bool = False) -> None:
        """Raises StorageUnavailable unless the bucket answers and lets these credentials in; ``thorough``:
        and it refuses a conditional put it must refuse (the run fence depends on it)."""
        try:
            self.bucket.check()
            if thorough:
                self.bucket.check_conditional_writes()
            self.layout.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a BucketError names the bucket and the reason
            raise StorageUnavailable(f"cannot use the storage: {error}") from error

    # --- datasets ---------------------------------------------------------------------------

    def publish_dataset(self, record: DatasetRecord, folder: Path) -> None:
        """Upload the imported folder: its archive, then its record.

        Raises:
            StorageUnavailable: the upload failed (the bucket keeps no record of the dataset).
        """
        try:
            archive = write_temp(folder.with_name(f"{record.id}.zip"), lambda file: _zip_folder(folder, file))
            try:
                self.bucket.upload(dataset_key(record.id, DATASET_ARCHIVE), archive)
            finally:
                archive.unlink(missing_ok=True)
            self.bucket.put(dataset_key(record.id, DATASET_FILE), record.model_dump_json(indent=2).encode())
        except OSError as error:
            try:  # what reached the bucket: without its record it is no dataset, only space taken
                self.bucket.delete_prefix(dataset_key(record.id))
            except BucketError:
                pass
            raise StorageUnavailable(f"could not store dataset {record.id} in {self}: {error}") from error

    def place_dataset(self, dataset_id: str, folder: Path) -> None:
        """The published folder moves into the cache: the bucket holds the dataset."""
        self.cache.adopt(dataset_key(dataset_id, DATASET_ARCHIVE), folder)

    @contextmanager
    def dataset_files(self, record: DatasetRecord) -> Iterator[Path]:
        def fetch(folder: Path) -> None:
            archive = folder.with_name(folder.name + ".zip")  # a leftover of the import's kind if this process dies
            try:
                self.bucket.download(dataset_key(record.id, DATASET_ARCHIVE), archive)
                with zipfile.ZipFile(archive) as files:
                    files.extractall(folder)  # our own archive; extractall also keeps every name inside ``folder``
            finally:
                archive.unlink(missing_ok=True)

        with self.cache.use(dataset_key(record.id, DATASET_ARCHIVE), fetch) as folder:
            yield folder / record.root

    def remove_dataset(self, dataset_id: str) -> None:
        self.bucket.delete(dataset_key(dataset_id, DATASET_FILE))  # first: a dataset without it is gone
        self.bucket.delete_prefix(dataset_key(dataset_id))
        shutil.rmtree(self.layout.dataset_dir(dataset_id), ignore_errors=True)
        self.cache.discard(dataset_key(dataset_id, DATASET_ARCHIVE))  # in use here: eviction removes it later

    def saved_datasets(self) -> Iterator[DatasetRecord]:
        for dataset_id in self.bucket.children(f"{DATASETS_DIR}/"):
            record, _ = _read_model(self.bucket, dataset_key(dataset_id, DATASET_FILE), DatasetRecord)
            if record is not None and record.id == dataset_id:
                yield record

    # --- runs -------------------------------------------------------------------------------

    def run_folder(self, job_id: str, lease: Lease) -> BucketRunFolder:
        return BucketRunFolder(self, job_id, lease)

    def end_run(self, folder: RunFolder) -> None:
        """The working copy goes: everything in it is in the bucket, and it is not the cache's to bound."""
        shutil.rmtree(folder.path, ignore_errors=True)

    @contextmanager
    def run_file(self, job_id: str, name: str) -> Iterator[Path | None]:
        with ExitStack() as held:
            yield self._cached_run_file(job_id, name, held)

    def _cached_run_file(self, job_id: str, name: str, held: ExitStack) -> Path | None:
        """The cache's copy of the version of ``name`` the manifest names, held until ``held`` closes."""
        for attempt in range(2):  # the version read may be replaced (and deleted) before it is copied
            manifest, _ = _read_model(self.bucket, run_key(job_id, RUN_MANIFEST), Manifest)
            key = manifest.files.get(name) if manifest is not None else None
            if key is None:
                return None
            try:
                return held.enter_context(self.cache.use(key, partial(self.bucket.download, key)))
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    @contextmanager
    def derived_file(self, job_id: str, name: str, source: Path, make: Callable[[Path, Path], None]) -> Iterator[Path]:
        # ``source`` is a cache entry, named after the version it copies: the key is never stale.
        with self.cache.use(f"{run_key(job_id, name)}@{source.name}", lambda path: make(source, path)) as path:
            yield path

    def history(self, job_id: str) -> list[dict[str, Any]]:
        with self.run_file(job_id, METRICS_FILE) as path:
            return parse_history(path.read_text(encoding="utf-8")) if path is not None else []

    def remove_run(self, job_id: str) -> None:
        self.bucket.delete(run_key(job_id, RUN_MANIFEST))  # first: a late commit then finds nothing to match
        self.bucket.delete(run_key(job_id, JOB_FILE))
        self.bucket.delete_prefix(run_key(job_id))

    # --- job records ------------------------------------------------------------------------

    def save_job(self, record: JobRecord, create: bool = False) -> bool:
        key = run_key(record.id, JOB_FILE)
        data = record.model_dump_json(indent=2).encode()
        for _ in range(CONFLICT_RETRIES):
            current, etag = _read_model(self.bucket, key, JobRecord)
            if etag is None and not create:
                return False  # deleted: a late write does not bring the job back
            if current is not None and current.id == record.id and current.revision >= record.revision:
                return False
            try:
                self.bucket.put(key, data, if_match=etag, if_absent=etag is None)
            except Conflict:
                continue
            return True
        raise RunFolderBusy(f"{self.bucket.location}{key} kept changing while job {record.id}'s record was saved")

    def keep_job(self, record: JobRecord | None) -> None:
        if record is None:
            return
        try:
            self.save_job(record)
        except OSError as error:
            log.warning("job %s: could not update its record in %s: %s", record.id, self, error)

    def read_job(self, job_id: str) -> JobRecord | None:
        return _read_model(self.bucket, run_key(job_id, JOB_FILE), JobRecord)[0]

    def has_run(self, job_id: str) -> bool:
        return next(self.bucket.keys(run_key(job_id)), None) is not None

    def saved_job_ids(self) -> list[str]:
        return sorted(self.bucket.children(f"{RUNS_DIR}/"))


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def _read_model(bucket: Bucket, key: str, model: type[BaseModel]) -> tuple[Any, str | None]:
    """The object parsed as ``model`` and its ETag; (None, None) if absent, (None, etag) if unreadable."""
    got = bucket.read(key)
    if got is None:
        return None, None
    data, etag = got
    try:
        return model.model_validate_json(data), etag
    except (ValidationError, json.JSONDecodeError) as error:
        log.warning("cannot read %s%s: %s", bucket.location, key, error)
        return None, etag


def _delete_quietly(bucket: Bucket, key: str) -> None:
    try:
        bucket.delete(key)
    except BucketError as error:  # an orphan version costs space only: nothing names it
        log.warning("could not delete %s%s: %s", bucket.location, key, error)


def _zip_folder(folder: Path, file) -> None:
    """Write ``folder``'s files, less its record, to ``file`` as a zip (stored: images are compressed already)."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path != folder / DATASET_FILE:
                archive.write(path, path.relative_to(folder).as_posix())
