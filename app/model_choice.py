"""Which trained model answers a request, and its checkpoint: for /detect, evaluation and the ONNX export.

A request names a job (``job_id``), or COCO's model (``model=coco``), or neither: then the newest
succeeded job's model answers. The checkpoint is opened only when the model is loaded
(``CheckpointSource``): a model already in the detector cache reads nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from app.deps import job_or_404
from app.inference import CheckpointMissing, CheckpointSource, DeviceUnavailable
from core.records import JobRecord
from core.settings import Settings
from core.storage import Storage
from core.store import Store
from core.weights import WeightsFolder
from model.initialisation import WeightsUnavailable
from model.pretrained import COCO_WEIGHTS


@dataclass(frozen=True)
class ModelChoice:
    """The model that answers a request: its cache key, its job (None for COCO's), and its weights."""

    key: str
    job_id: str | None
    checkpoint: CheckpointSource

    @property
    def name(self) -> str:
        """``job:<id>`` or ``coco``, as answers name it."""
        return f"job:{self.job_id}" if self.job_id else self.key

    @property
    def described(self) -> str:
        return f"job {self.job_id}'s model" if self.job_id else "the COCO model"


def choose_model(store: Store, settings: Settings, job_id: str | None, model: str | None) -> ModelChoice:
    """The model a request asks for: ``model`` (coco), else ``job_id``'s, else the newest succeeded job's.

    Raises:
        HTTPException: 404 unknown job or COCO weights missing, 409 no trained model, 422 both asked for.
    """
    if model is None:
        job_id, checkpoint = resolve_model(store, settings, job_id)
        return ModelChoice(job_id, job_id, checkpoint)
    if job_id is not None:
        message = "ask for a job_id or a model, not both"
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "model"), "msg": message, "input": model}]
        )
    folder = WeightsFolder.from_settings(settings)
    try:
        path = folder.present(COCO_WEIGHTS)
    except WeightsUnavailable as error:  # the bucket's copy is not the file its name says
        raise HTTPException(503, f"the COCO model's weights cannot be had: {error}") from error
    if path is None:
        raise HTTPException(
            404,
            f"the COCO model's weights ({COCO_WEIGHTS.file_name}) are not in {folder.folder}: "
            "run `ssd-service weights fetch coco` (or `ssd-service weights import FILE`) first",
        )
    return ModelChoice(model, None, lambda: nullcontext(path))


def resolve_model(store: Store, settings: Settings, job_id: str | None) -> tuple[str, CheckpointSource]:
    """The job whose model answers, and its checkpoint: ``job_id``'s, or the newest succeeded job's.

    Raises:
        HTTPException: 404 for an unknown job, 409 when there is no trained model to use.
    """
    if job_id is None:
        job_id = store.newest_succeeded_job()
        if job_id is None:
            raise HTTPException(409, "no trained model yet: start a job with POST /train and wait until it succeeds")
    job = job_or_404(store, job_id)
    if not job.model_ready:
        raise HTTPException(409, f"job {job_id} is {job.status} and has no trained model to detect with")
    return job_id, partial(open_checkpoint, settings.storage, job_id, checkpoint_name(job))


def checkpoint_name(job: JobRecord) -> str:
    """The file in the job's run folder that its model is served from (a job whose ``model_ready``)."""
    return Path(job.checkpoint or "").name


@contextmanager
def open_checkpoint(storage: Storage, job_id: str, name: str) -> Iterator[Path]:
    """The job's checkpoint ``name`` for a ``with`` block (CheckpointMissing if its run has none)."""
    with storage.run_file(job_id, name) as path:
        if path is None:
            raise CheckpointMissing(f"job {job_id}'s checkpoint {name} is missing from its run folder")
        yield path


@contextmanager
def model_load_errors(model: str) -> Iterator[None]:
    """A model (``"job <id>'s model"``...) that cannot be loaded, as an HTTP answer: 503 (its device is
    not here), 409 (its checkpoint is gone) or 500 (the checkpoint is truncated or foreign)."""
    try:
        yield
    except DeviceUnavailable as error:
        raise HTTPException(503, f"{model} cannot be loaded here: {error}") from error
    except CheckpointMissing as error:
        raise HTTPException(409, str(error)) from error
    except ValueError as error:  # CheckpointError
        raise HTTPException(500, f"{model} cannot be loaded: {error}") from error
