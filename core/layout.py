"""Every name the service gives a file or folder on disk or an object in a bucket, in one place.

The data folder (``SSD_DATA_DIR``) of the service::

    datasets/<id>/dataset.json              the dataset's record (also kept in Redis)
    datasets/<id>/files/...                 what the archive held (read with ``model.data``)
    datasets/.incoming-<owner>-<id>/        an import being built; renamed to ``<id>`` when done
    datasets/.trash-<id>-<random>/          a dataset being deleted
    runs/<job id>/job.json                  the job's record (rebuilds Redis's if Redis loses it)
    runs/<job id>/config.json, metrics.jsonl, last.pt, best.pt, losses.png   what ``fit`` writes
    runs/<job id>/model.v1.onnx             a succeeded job's ONNX export, made on its first download
    runs/<job id>/.lock                     locked (flock) by whoever writes the run folder
    runs/<job id>/.fence                    the lease token of the one attempt that may write it
    runs/.trash-<job id>-<random>/          a run being deleted
    owners/<owner>.lock                     locked (flock) by each live service process
    cache/<hash>                            with a bucket: a local copy of an object or dataset (``core.cache``)
    weights/<torchvision's file name>       pretrained weights (``SSD_WEIGHTS_DIR`` may put them elsewhere)
    weights/.<file name>.lock               locked (flock) by whoever downloads or installs that file

With a bucket (``SSD_STORAGE_URL=s3://bucket/prefix``), the objects under its prefix::

    datasets/<id>/files.zip                 the dataset's folder less its record, zipped (not compressed)
    datasets/<id>/dataset.json              its record, written after files.zip: a dataset with a record is whole
    runs/<job id>/job.json                  the job's record, replaced only by a later revision
    runs/<job id>/manifest.json             which object holds each of the run's files, and which run may write
    runs/<job id>/files/<name>.<owner>.<random>   one version of a run's file; never changed once written
    weights/<torchvision's file name>       pretrained weights, fetched once for every host

The data folder then holds only the cache, the working copies of the runs training on this
machine (``runs/<job id>/``) and the imports being built.

A file is replaced by writing ``.<name>.<owner>.<random>.tmp`` beside it and renaming that
over it (``model.run_folder``). ``<owner>`` names the process that wrote the temporary file
(``process_owner``), so that the next start of a service process can tell the leftovers of
a dead writer (whose ``owners/<owner>.lock`` nobody holds) from files still being written.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

# The names of a run folder's own files, and of temporary and trashed files, are model.run_folder's (fit
# writes them); the service's names are given here beside them.
from model.run_folder import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOSS_PLOT,
    METRICS_FILE,
    TEMP_SUFFIX,
    TRASH_PREFIX,
    process_owner,
    temp_owner,
    temp_prefix,
    trash_name,
)

__all__ = [
    "BEST_CHECKPOINT",
    "CACHE_DIR",
    "CONFIG_FILE",
    "DATASETS_DIR",
    "DATASET_ARCHIVE",
    "DATASET_FILE",
    "DATASET_FILES_DIR",
    "FENCE_FILE",
    "INCOMING_PREFIX",
    "JOB_FILE",
    "LAST_CHECKPOINT",
    "LOSS_PLOT",
    "METRICS_FILE",
    "ONNX_MODEL",
    "OWNERS_DIR",
    "OWNER_LOCK_SUFFIX",
    "RUNS_DIR",
    "RUN_LOCK_FILE",
    "RUN_MANIFEST",
    "RUN_OBJECTS_DIR",
    "TEMP_SUFFIX",
    "TRASH_PREFIX",
    "WEIGHTS_DIR",
    "DataLayout",
    "dataset_key",
    "incoming_name",
    "incoming_owner",
    "process_owner",
    "run_key",
    "run_version_key",
    "temp_owner",
    "temp_prefix",
    "trash_name",
    "weights_key",
    "weights_lock_name",
]

# A run folder's files written by the service around ``fit``.
JOB_FILE = "job.json"
RUN_LOCK_FILE = ".lock"
FENCE_FILE = ".fence"
# GET /jobs/{id}/model.onnx's export (``model.export``); v<GRAPH_VERSION>: a new graph makes a new file.
ONNX_MODEL = "model.v1.onnx"

# A dataset's folder.
DATASET_FILE = "dataset.json"
DATASET_FILES_DIR = "files"

# Only in a bucket: a dataset's folder as one object, and a run's manifest and file versions.
DATASET_ARCHIVE = "files.zip"
RUN_MANIFEST = "manifest.json"
RUN_OBJECTS_DIR = "files"

# Top-level folders of the data folder.
DATASETS_DIR = "datasets"
RUNS_DIR = "runs"
OWNERS_DIR = "owners"
CACHE_DIR = "cache"
WEIGHTS_DIR = "weights"

# Work in progress of an import, and the lock each live process holds.
INCOMING_PREFIX = ".incoming-"
OWNER_LOCK_SUFFIX = ".lock"


def incoming_name(record_id: str) -> str:
    """The folder an import builds before it is renamed to ``record_id``."""
    return f"{INCOMING_PREFIX}{process_owner()}-{record_id}"


def incoming_owner(name: str) -> str | None:
    """The owner token in an import folder's name, or None if it is not one (or has no owner)."""
    if not name.startswith(INCOMING_PREFIX):
        return None
    owner, dash, _ = name[len(INCOMING_PREFIX) :].partition("-")
    return owner if dash and owner else None


@dataclass(frozen=True)
class DataLayout:
    """Where the service keeps datasets, runs and process locks under its data folder."""

    root: Path

    @property
    def datasets_dir(self) -> Path:
        return self.root / DATASETS_DIR

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def owners_dir(self) -> Path:
        return self.root / OWNERS_DIR

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def weights_dir(self) -> Path:
        return self.root / WEIGHTS_DIR

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def owner_lock(self, owner: str) -> Path:
        return self.owners_dir / f"{owner}{OWNER_LOCK_SUFFIX}"


def dataset_key(dataset_id: str, name: str = "") -> str:
    """A dataset's object ``name`` in a bucket (relative to its prefix); without a name, the dataset's prefix."""
    return f"{DATASETS_DIR}/{dataset_id}/{name}"


def run_key(job_id: str, name: str = "") -> str:
    """A run's object ``name`` in a bucket (relative to its prefix); without a name, the run's prefix."""
    return f"{RUNS_DIR}/{job_id}/{name}"


def weights_key(file_name: str) -> str:
    """A weights file's object in a bucket (relative to its prefix)."""
    return f"{WEIGHTS_DIR}/{file_name}"


def weights_lock_name(file_name: str) -> str:
    """The lock file beside a weights file that its download or install holds."""
    return f".{file_name}.lock"


def run_version_key(job_id: str, name: str) -> str:
    """A fresh object key for a new version of the run's file ``name``: never one that was used before."""
    return run_key(job_id, f"{RUN_OBJECTS_DIR}/{name}.{process_owner()}.{secrets.token_hex(8)}")
