"""The job and dataset records: one typed model each, shared by the store, the worker and the API.

A job's HTTP answer (``Job``) is its stored record (``JobRecord``) less the fields only the
service reads; a dataset's (``Dataset``) is its ``DatasetRecord`` less the folder it reads.

In Redis a job is a hash with one field per record field (``JobRecord.to_hash``): the
fields Lua scripts read (``PLAIN_FIELDS``: the status, the dataset, the lease token, the dispatch id)
are plain strings, every other value is JSON, and a field that is None is absent. The
scripts therefore never parse JSON, and an empty ARGV value tells them to delete a field.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
STATUSES: tuple[Status, ...] = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)  # final: nothing changes a job's status once it is one of these

PLAIN_FIELDS = frozenset({"status", "dataset_id", "lease_token", "dispatch_id"})


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds precision, e.g. ``2026-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_to_unix(value: str | None, default: float | None = None) -> float | None:
    """``2026-01-31T12:00:00Z`` as unix seconds; ``default`` when missing or unreadable."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else default
    except ValueError:
        return default


class Progress(BaseModel):
    epoch: int
    step: int
    steps_per_epoch: int
    eta_seconds: float
    loss: float | None = None
    images_per_second: float | None = None


class Job(BaseModel):
    """A training job as the API shows it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "9b1f0c3a5e7d",
                    "status": "running",
                    "dataset_id": "3f9c1a2b7d4e",
                    "config": {"epochs": 10, "batch_size": 16, "learning_rate": 0.001},
                    "epoch": 3,
                    "epochs": 10,
                    "progress": {"epoch": 3, "step": 40, "steps_per_epoch": 63, "eta_seconds": 812.0},
                    "created_at": "2026-01-31T12:00:00Z",
                    "started_at": "2026-01-31T12:00:02Z",
                    "finished_at": None,
                    "error": None,
                    "best_val_loss": 2.31,
                    "classes": ["circle", "square"],
                }
            ]
        }
    )

    id: str
    status: Status
    dataset_id: str
    dataset_name: str | None = None
    config: dict[str, Any]
    epoch: int = Field(0, description="The epoch running now (or the last one finished, once the job ended).")
    epochs: int
    epochs_completed: int = 0
    progress: Progress | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    best_val_loss: float | None = None
    classes: list[str]
    cancel_requested: bool = False
    restarts: int = Field(0, description="How often the job went back to the queue to resume on another run.")
    restart_reason: str | None = Field(None, description="Why it last did (worker shut down, lease expired...).")
    crashes: int = Field(
        0, description="How often its worker stopped without pausing it (killed, out of memory, lost its machine)."
    )
    storage_pauses: int = Field(
        0,
        description=(
            "How often in a row its run was put back because the storage (a bucket) could not be reached; "
            "past SSD_MAX_STORAGE_PAUSES it fails."
        ),
    )
    worker: str | None = Field(None, description="The worker running it now (or that ran it last).")
    host: str | None = Field(None, description="The machine of that worker.")
    device: str | None = Field(None, description="What it trained on there: cpu or cuda.")
    precision: Literal["bf16", "fp16", "fp32"] | None = Field(
        None,
        description=(
            "What its convolutions computed in: bf16 or fp16 (mixed precision, where the device computes it "
            "natively) or fp32. Weights, optimiser state and checkpoints are float32 in every case."
        ),
    )
    gpu: str | None = Field(None, description="The host's GPU that worker was given (SSD_GPUS), if any.")
    init: str | None = Field(None, description="Where the weights were asked to start (the config's init).")
    init_used: str | None = Field(None, description="Where they did start, once the job has started.")
    init_note: str | None = Field(None, description="Why init_used differs from init (weights missing, offline...).")
    backbone: str | None = Field(None, description="The backbone it trains, once started (it follows the weights).")
    note: str | None = Field(None, description="How a job ended early on its own (patience), if it did.")
    has_model: bool = Field(False, description="Whether POST /detect can use this job's checkpoint.")


class JobRecord(Job):
    """A job as the service stores it: the HTTP answer's fields and the ones only the service reads."""

    model_config = ConfigDict(extra="ignore")

    lease_token: str | None = Field(None, description="The token of the lease the current run holds (or held).")
    dispatch_id: str | None = Field(
        None, description="The id of the newest task message sent for the job, until a worker takes it."
    )
    enqueued_at: float | None = Field(None, description="Unix seconds of the last (re)queueing.")
    retry_at: float | None = Field(
        None, description="Unix seconds before which a job put back for its storage is not sent again."
    )
    checkpoint: str | None = Field(None, description="The file in the run folder that serves /detect.")
    revision: int = Field(0, description="Counts the record's changes: a job.json never goes back to an older one.")

    @classmethod
    def new(cls, job_id: str, dataset: DatasetRecord, config: Mapping[str, Any]) -> JobRecord:
        """A queued job's record; ``config`` is the ``TrainConfig`` as a dict."""
        return cls(
            id=job_id,
            status=QUEUED,
            dataset_id=dataset.id,
            dataset_name=dataset.name,
            config=dict(config),
            epochs=config["epochs"],
            init=config.get("init"),
            created_at=now_iso(),
            classes=list(dataset.classes),
            enqueued_at=time.time(),
        )

    @property
    def model_ready(self) -> bool:
        """Whether its checkpoint can serve /detect: it succeeded, or was cancelled after an epoch."""
        return bool(self.checkpoint) and self.status in (SUCCEEDED, CANCELLED)

    def public(self) -> Job:
        """The record as the API shows it."""
        shown = self.model_dump(include=set(Job.model_fields) - {"has_model"})
        return Job(**shown, has_model=self.model_ready)

    def to_hash(self) -> dict[str, str]:
        """The Redis hash of this record (None fields left out)."""
        return {name: encode_value(name, value) for name, value in self.model_dump().items() if value is not None}

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> JobRecord:
        return cls.model_validate(
            {name: value if name in PLAIN_FIELDS else json.loads(value) for name, value in fields.items() if value}
        )

    @classmethod
    def from_flat(cls, flat: Iterable[str]) -> JobRecord:
        """A record from the ``HGETALL`` reply a Lua script returns (name, value, name, value...)."""
        items = list(flat)
        return cls.from_hash(dict(zip(items[::2], items[1::2], strict=True)))


def encode_value(name: str, value: Any) -> str:
    """A job field's value as stored in its hash: "" for None (the field is deleted), plain or JSON."""
    if value is None:
        return ""
    return str(value) if name in PLAIN_FIELDS else json.dumps(value)


def encode_fields(fields: Mapping[str, Any]) -> list[str]:
    """Field/value pairs flattened for a Lua script's ARGV (see ``encode_value``)."""
    unknown = set(fields) - set(JobRecord.model_fields)
    if unknown:
        raise ValueError(f"not job record fields: {sorted(unknown)}")
    if "status" in fields:  # a status moves only with its indexes, in the scripts that change it
        raise ValueError("a job's status is set by the store's transitions, not as a field")
    return [item for name, value in fields.items() for item in (name, encode_value(name, value))]


class Dataset(BaseModel):
    """A dataset as the API shows it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f9c1a2b7d4e",
                    "name": "shapes",
                    "format": "coco",
                    "num_images": 64,
                    "num_boxes": 161,
                    "classes": ["circle", "square", "triangle"],
                    "created_at": "2026-01-31T12:00:00Z",
                    "source": "synthetic",
                }
            ]
        }
    )

    id: str
    name: str
    format: Literal["coco", "voc", "yolo"]
    num_images: int
    num_boxes: int
    classes: list[str]
    created_at: str | None = None
    source: Literal["upload", "synthetic"] | None = None
    warnings: list[str] = Field(
        default_factory=list, description="What the import accepted but a person should know, each naming its file."
    )


class DatasetRecord(Dataset):
    """A dataset as the service stores it (as JSON, in Redis and in its folder's dataset.json)."""

    model_config = ConfigDict(extra="ignore")

    root: str = Field(description="The folder to read, relative to the dataset's folder.")

    def public(self) -> Dataset:
        return Dataset(**self.model_dump(include=set(Dataset.model_fields)))
