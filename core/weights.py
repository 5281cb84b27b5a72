"""The weights folder (``SSD_WEIGHTS_DIR``): torchvision's published weight files for the API and every worker.

A missing file is fetched on first use (``SSD_WEIGHTS_DOWNLOAD=auto``): from the bucket when
``SSD_STORAGE_URL`` holds it, else from its URL, streamed to a temporary file beside its place
with bounded timeouts, its SHA-256 checked against the start its name gives (as ``torch.hub``
checks it), then renamed into place. One process at a time fetches or installs a given file (a
lock file beside it); the others wait, then find it there. A failed fetch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock

from core.layout import TEMP_SUFFIX, weights_key, weights_lock_name
from core.records import SUCCEEDED
from core.s3 import Bucket, BucketError
from core.settings import Settings
from core.storage import Storage
from core.store import Store
from model.initialisation import WeightsUnavailable
from model.pretrained import (
    COCO_WEIGHTS,
    IMAGENET_WEIGHTS,
    PUBLISHED,
    PublishedWeights,
    WeightsError,
    read_state_dict,
    ssd_state_from_torchvision,
)
from model.run_folder import commit_temp, write_temp

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class WeightsFolder:
    """torchvision's weight files in ``folder`` under their published names (``model.pretrained``).

    Args:
        download: whether a missing file may be fetched (from ``bucket``, else from its URL).
        base_url: fetch ``base_url/<file name>`` instead of torchvision's URLs (a mirror).
        bucket: with ``SSD_STORAGE_URL``: the files live there once (``weights/<name>``), and
            ``folder`` holds this host's copies.
        catalogue: the files this folder knows (listing, ``import_file``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        download: bool = True,
        base_url: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        bucket: Bucket | None = None,
        catalogue: tuple[PublishedWeights, ...] = PUBLISHED,
    ):
        self.folder = Path(folder)
        self.download = download
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.bucket = bucket
        self.catalogue = catalogue

    @classmethod
    def from_settings(cls, settings: Settings) -> WeightsFolder:
        return cls(
            settings.weights_folder,
            download=settings.weights_download == "auto",
            base_url=settings.weights_base_url,
            connect_timeout=settings.weights_connect_timeout_seconds,
            read_timeout=settings.weights_read_timeout_seconds,
            bucket=getattr(settings.storage, "bucket", None),
        )

    def __str__(self) -> str:
        return f"the weights folder {self.folder}"

    def url(self, weights: PublishedWeights) -> str:
        return f"{self.base_url}/{weights.file_name}" if self.base_url else weights.url

    def path(self, weights: PublishedWeights) -> Path:
        return self.folder / weights.file_name

    def present(self, weights: PublishedWeights) -> Path | None:
        """The file if this host has it, or (with a bucket) once copied from there; nothing is downloaded
        from the internet. Raises BucketError when the bucket cannot be read, WeightsUnavailable when
        its copy is corrupt."""
        path = self.path(weights)
        if path.is_file():
            return path
        if self.bucket is None:
            return None
        with self._locked(weights):
            return path if path.is_file() or self._from_bucket(weights) else None

    @contextmanager
    def published(self, weights: PublishedWeights, may_download: bool) -> Iterator[Path]:
        """``model.initialisation.WeightsSource.published``: the file, fetched first if need be and allowed."""
        path = self.present(weights)
        if path is None:
            if not self.download:
                raise WeightsUnavailable(
                    f"{weights.file_name} is not in {self.folder} and downloads are off (SSD_WEIGHTS_DOWNLOAD=never)"
                )
            if not may_download:
                raise WeightsUnavailable(
                    f"{weights.file_name} is not in {self.folder}, and an earlier download could not reach its server"
                )
            path = self.fetch(weights)
        yield path

    def fetch(self, weights: PublishedWeights, progress: Callable[[int, int | None], None] | None = None) -> Path:
        """Make sure the file is here: already, from the bucket, or downloaded (then copied to the bucket).

        ``progress(bytes so far, total or None)`` follows a download.

        Raises:
            WeightsUnavailable: the download failed or gave a file with another hash (naming the URL).
        """
        path = self.path(weights)
        with self._locked(weights):
            if path.is_file() or self._from_bucket(weights):
                return path
            url = self.url(weights)
            log.info("downloading %s from %s", weights.file_name, url)
            self._install(weights, lambda temp: self._download(url, temp, progress), f"the download from {url}")
            log.info("downloaded %s into %s", weights.file_name, self.folder)
        self._to_bucket(weights)
        return path

    def import_file(self, source: Path) -> PublishedWeights:
        """Check a file copied by hand and install it under its published name (the one whose hash it has).

        Raises:
            WeightsError: no published file has its hash, or it does not load as such.
        """
        digest = _sha256(source)
        weights = next((w for w in self.catalogue if digest.startswith(w.sha256_prefix)), None)
        if weights is None:
            names = ", ".join(w.file_name for w in self.catalogue)
            raise WeightsError(f"{source}: its SHA-256 {digest[:16]}... is not that of any of {names}")
        check_loads(source, weights)
        with self._locked(weights):
            self._install(weights, lambda temp: shutil.copyfile(source, temp), str(source))
        self._to_bucket(weights)
        return weights

    def listing(self) -> list[dict[str, Any]]:
        """Each known file: name, what it holds, whether this host has it and its size."""
        rows = []
        for weights in self.catalogue:
            path = self.path(weights)
            rows.append(
                {
                    "file": weights.file_name,
                    "kind": weights.kind,
                    "backbone": weights.backbone,
                    "present": path.is_file(),
                    "bytes": path.stat().st_size if path.is_file() else None,
                    "url": self.url(weights),
                }
            )
        return rows

    # --- the parts --------------------------------------------------------------------------

    def _locked(self, weights: PublishedWeights) -> AbstractContextManager[Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(self.folder / weights_lock_name(weights.file_name))

    def _install(self, weights: PublishedWeights, fill: Callable[[Path], object], origin: str) -> None:
        """Fill a temporary file beside the file's place (``fill(temp path)``), check its hash, rename it
        into place (the lock held: any other temporary file of it is a dead fetch's leftover)."""
        path = self.path(weights)
        for leftover in self.folder.glob(f".{weights.file_name}.*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        temp = write_temp(path, lambda file: None)  # named as core.layout names temporary files
        try:
            fill(temp)
            _fsync(temp)
            digest = _sha256(temp)
            if not digest.startswith(weights.sha256_prefix):
                raise WeightsUnavailable(
                    f"{origin} gave a file whose SHA-256 ({digest[:16]}...) does not start with the "
                    f"{weights.sha256_prefix} its name promises: not used"
                )
            commit_temp(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def _download(self, url: str, temp: Path, progress: Callable[[int, int | None], None] | None) -> None:
        try:
            with (
                httpx.stream("GET", url, timeout=self.timeout, follow_redirects=True) as response,
                open(temp, "wb") as file,
            ):
                if response.status_code != 200:
                    raise WeightsUnavailable(f"downloading {url} was refused: HTTP {response.status_code}")
                total = int(response.headers["content-length"]) if "content-length" in response.headers else None
                done = 0
                for chunk in response.iter_bytes(_CHUNK):
                    file.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except httpx.HTTPError as error:
            # Nothing reached or the transfer broke off: other downloads would fare no better now.
            unreachable = isinstance(error, httpx.TransportError)
            raise WeightsUnavailable(
                f"downloading {url} failed: {type(error).__name__}: {error}", unreachable
            ) from None

    def _from_bucket(self, weights: PublishedWeights) -> bool:
        """Copy the file from the bucket if it is there (the lock held); whether it was."""
        bucket = self.bucket
        if bucket is None:
            return False

        key = weights_key(weights.file_name)
        try:
            self._install(weights, partial(bucket.download, key), f"{bucket.location}{key}")
        except FileNotFoundError:
            return False
        return True

    def _to_bucket(self, weights: PublishedWeights) -> None:
        """Keep the file in the bucket too (once for every host); a failure only costs other hosts a download."""
        if self.bucket is None:
            return
        key = weights_key(weights.file_name)
        try:
            if not any(True for _ in self.bucket.keys(key)):
                self.bucket.upload(key, self.path(weights))
        except BucketError as error:
            log.warning("could not copy %s to the bucket: %s", weights.file_name, error)


def check_loads(path: Path, weights: PublishedWeights) -> None:
    """Raise WeightsError unless ``path`` reads as the state dict ``weights`` names (keys of the right model)."""
    state = read_state_dict(path)
    try:
        if weights.kind == "coco":
            ssd_state_from_torchvision(state)
        elif not any(key.startswith("features.") for key in state):
            raise WeightsError("no VGG features in it")
    except WeightsError as error:
        raise WeightsError(f"{path} is not {weights.file_name}'s kind of file: {error}") from None


class JobWeights:
    """The ``WeightsSource`` of a training job: the weights folder, and earlier jobs' best checkpoints."""

    def __init__(self, folder: WeightsFolder, store: Store, storage: Storage):
        self.folder, self.store, self.storage = folder, store, storage

    def published(self, weights: PublishedWeights, may_download: bool) -> AbstractContextManager[Path]:
        return self.folder.published(weights, may_download)

    @contextmanager
    def checkpoint(self, reference: str) -> Iterator[Path]:
        job = self.store.get_job(reference)
        if job is None:
            raise WeightsUnavailable(f"job {reference} does not exist (deleted?)")
        if job.status != SUCCEEDED or not job.checkpoint:
            raise WeightsUnavailable(f"job {reference} is {job.status} and has no model to start from")
        with self.storage.run_file(reference, Path(job.checkpoint).name) as path:
            if path is None:
                raise WeightsUnavailable(f"job {reference}'s checkpoint {job.checkpoint} is missing from its run")
            yield path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def what_inits_use(folder: WeightsFolder) -> dict[str, str]:
    """What each ``init`` would start from on this host now, in words (``ssd-service weights``, GET /weights)."""

    def state(weights: PublishedWeights) -> str | None:
        if folder.path(weights).is_file():
            return "present"
        return "downloaded on first use" if folder.download else None

    def uses(weights: PublishedWeights) -> str:
        found = state(weights)
        return (
            f"{weights.file_name} ({found})" if found else f"fails: {weights.file_name} is missing, downloads are off"
        )

    imagenet = IMAGENET_WEIGHTS["vgg16_bn"]
    if state(COCO_WEIGHTS) == "present":
        auto = f"coco: {COCO_WEIGHTS.file_name}"
    elif state(COCO_WEIGHTS):
        auto = f"coco, downloaded on first use (if that fails: imagenet {imagenet.file_name}, else scratch)"
    elif state(imagenet):
        auto = f"imagenet: {imagenet.file_name} ({state(imagenet)})"
    else:
        auto = "scratch: no weights present and downloads are off"
    return {
        "auto": f"{auto}; at a width other than 1: scratch",
        "coco": uses(COCO_WEIGHTS),
        "imagenet": "; ".join(f"{b}: {uses(IMAGENET_WEIGHTS[b])}" for b in ("vgg16_bn", "vgg16")),
        "scratch": "random weights",
        "job:<id>": "that succeeded job's best checkpoint",
    }
