"""Request and response bodies of the HTTP contract (``shared/design/API.md``), in one place.

Job and dataset answers are the stored records' public parts (``core.records``).
``TrainRequest`` mirrors ``model.config.TrainConfig``: the same fields, the same defaults
(taken from ``TrainConfig()`` itself) and constraints that match its ``__post_init__``
checks, so a bad value answers 422 before a job exists.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator

# The stored records' public parts are answered as they are.
from core.records import Dataset as Dataset
from core.records import Job as Job
from core.records import Progress as Progress
from core.records import Status
from core.store import ID_PATTERN
from model.config import INIT_CHOICES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, TrainConfig, parse_init

_DEFAULTS = TrainConfig()

# FastAPI answers 400 to a JSON body it cannot parse (not JSON, not UTF-8): routes with one say so.
# A route's documented answers besides its own (status -> OpenAPI response object), as FastAPI takes them.
Responses = dict[int | str, dict[str, Any]]

UNREADABLE_BODY: Responses = {400: {"description": "The body is not JSON (or not UTF-8)."}}
# A PNG answer's media type entry in the OpenAPI document: bytes (generated clients read them as such).
PNG_CONTENT = {"schema": {"type": "string", "format": "binary"}}

JobStatus = Status


Side = Annotated[int, Field(ge=16, le=2048, strict=True)]
# An init naming a job: "job:" and a job id (ids are opaque, but only ever made of these).
# init "job:<id>": the id has the form the service gives (ID_PATTERN), so it never reaches Redis otherwise.
JOB_INIT_PATTERN = re.compile("^job:" + ID_PATTERN.removeprefix("^"))
INIT_PATTERN = f"^({'|'.join(INIT_CHOICES)}|job:{ID_PATTERN.strip('^$')})$"
# The largest integer JSON carries exactly (2^53 - 1): a client that parses numbers as doubles (JavaScript,
# schema-driven generators) compares against the same bound the server does.
MAX_SEED = 2**53 - 1


class SyntheticDatasetRequest(BaseModel):
    """A generated dataset of circles, squares and triangles on textured backgrounds."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"num_images": 64, "seed": 0, "image_size": [240, 400]}]}
    )

    # Strict: a JSON true is not one image.
    num_images: int = Field(64, ge=1, strict=True, description="Images to draw (at most SSD_MAX_SYNTHETIC_IMAGES).")
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="The same seed draws the same dataset.")
    image_size: Side | tuple[Side, Side] | None = Field(
        None, description="Image side in pixels, or [min, max] to draw each side from; default [240, 400]."
    )
    name: str | None = Field(None, max_length=200)

    @field_validator("image_size")
    @classmethod
    def _check_size(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        low, high = (value, value) if isinstance(value, int) else (value or (240, 400))
        if not 16 <= low <= high <= 2048:
            raise ValueError("image_size must be a side, or [min, max], with 16 <= min <= max <= 2048")
        return value

    def size_range(self) -> tuple[int, int]:
        if self.image_size is None:
            return (240, 400)
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        low, high = self.image_size
        return (low, high)


class TrainRequest(BaseModel):
    """POST /train: a dataset and the training recipe (``model.config.TrainConfig``'s fields)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "3f9c1a2b7d4e",
                    "epochs": 10,
                    "batch_size": 16,
                    "learning_rate": 0.001,
                    "val_fraction": 0.1,
                    "image_size": 300,
                    "seed": 0,
                }
            ]
        },
    )

    dataset_id: str = Field(pattern=ID_PATTERN, description="The dataset to train on (the id POST /datasets gave).")
    epochs: int = Field(_DEFAULTS.epochs, ge=1, le=100_000)
    batch_size: int = Field(_DEFAULTS.batch_size, ge=1, le=4096)
    learning_rate: float = Field(
        _DEFAULTS.learning_rate,
        gt=0,
        le=10,
        description=(
            "Adam's rate (conv blocks 1-2 learn at early_block_lr_factor of it). Training on from a job: "
            "about a fifth (0.0002) keeps what it learned, where 0.001 can undo it."
        ),
    )
    early_block_lr_factor: float = Field(_DEFAULTS.early_block_lr_factor, ge=0, le=1)
    weight_decay: float = Field(_DEFAULTS.weight_decay, ge=0, le=1)
    lr_schedule: Literal["cosine", "constant"] = _DEFAULTS.lr_schedule
    warmup_steps: int = Field(_DEFAULTS.warmup_steps, ge=0)
    val_fraction: float = Field(_DEFAULTS.val_fraction, ge=0, lt=1)
    image_size: int = Field(_DEFAULTS.image_size, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    seed: int = Field(_DEFAULTS.seed, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = Field(
        _DEFAULTS.device, description="'auto' leaves the choice to the worker (SSD_DEVICE)."
    )
    amp: bool = _DEFAULTS.amp
    init: str = Field(
        _DEFAULTS.init,
        description=(
            "Where the weights start: 'auto' (COCO-trained SSD300 where its weights are present or can be "
            "fetched, else the ImageNet backbone, else random), 'scratch', 'imagenet', 'coco', or "
            "'job:<id>' (a succeeded job's model: same backbone and width; classes matched by name)."
        ),
        # The form in the document (clients and generators see it); the validator below enforces it
        # with a message that names the choices.
        json_schema_extra={"examples": [*INIT_CHOICES, "job:9b1f0c3a5e7d"], "pattern": INIT_PATTERN},
    )
    backbone: Literal["vgg16", "vgg16_bn"] | None = Field(
        _DEFAULTS.backbone, description="null: what the weights need (vgg16 for COCO's, a job's own), else vgg16_bn."
    )
    width_multiplier: float = Field(
        _DEFAULTS.width_multiplier, gt=0, le=4, description="Pretrained weights need 1; a job: init takes the job's."
    )
    pretrained_backbone: Literal["imagenet"] | None = Field(
        _DEFAULTS.pretrained_backbone,
        deprecated=True,
        description="'imagenet' is a synonym of init 'imagenet', accepted for one more release.",
    )
    frozen_layers: int | None = Field(
        _DEFAULTS.frozen_layers, ge=0, le=31, description="null: 10 from ImageNet or COCO weights, else 0."
    )
    augment: bool = _DEFAULTS.augment
    num_workers: int = Field(_DEFAULTS.num_workers, ge=0, le=64)
    max_train_images: int | None = Field(_DEFAULTS.max_train_images, ge=1)
    patience: int | None = Field(
        _DEFAULTS.patience,
        ge=1,
        le=100_000,
        description="Stop (succeeded, with a note) after this many epochs without a better validation mAP@0.5.",
    )

    @field_validator("init")
    @classmethod
    def _check_init(cls, value: str) -> str:
        kind, _ = parse_init(value)  # its ValueError names the choices
        if kind == "job" and not JOB_INIT_PATTERN.match(value):
            raise ValueError(f"init {value!r}: 'job:' must be followed by a job id (12 lowercase hex digits)")
        return value

    def train_config(self) -> TrainConfig:
        """The ``TrainConfig``; raises ValueError where its own checks go beyond the ones above."""
        return TrainConfig.from_dict(self.model_dump(exclude={"dataset_id"}))


class LossRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    epoch: int
    train_loss: float
    train_loc_loss: float | None = None
    train_conf_loss: float | None = None
    val_loss: float | None = None
    val_map50: float | None = None
    val_map: float | None = None
    lr: float | None = None
    seconds: float | None = None
    val_ap50_per_class: dict[str, float | None] | None = Field(
        None,
        description=(
            "AP@0.5 on the validation split per class name (null for a class without boxes there); "
            "null without a validation split."
        ),
    )


class Losses(BaseModel):
    job_id: str
    status: JobStatus
    losses: list[LossRecord]


class ImageSize(BaseModel):
    width: int
    height: int


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in the uploaded image's pixels.")
    label: str
    class_id: int
    score: float


class DetectResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "9b1f0c3a5e7d",
                    "model": "job:9b1f0c3a5e7d",
                    "image": {"width": 640, "height": 480},
                    "detections": [
                        {"box": [12.0, 40.5, 200.0, 310.0], "label": "circle", "class_id": 1, "score": 0.97}
                    ],
                }
            ]
        }
    )

    job_id: str | None = Field(description="The job whose model answered; null for model=coco.")
    model: str = Field(description='"job:<id>", or "coco" for torchvision\'s COCO-trained SSD300.')
    image: ImageSize
    detections: list[Detection]


class ImageDetections(BaseModel):
    file: str = Field(description="The upload's file name, as sent.")
    image: ImageSize
    detections: list[Detection]


class DetectBatchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "9b1f0c3a5e7d",
                    "model": "job:9b1f0c3a5e7d",
                    "results": [
                        {
                            "file": "a.jpg",
                            "image": {"width": 640, "height": 480},
                            "detections": [
                                {"box": [12.0, 40.5, 200.0, 310.0], "label": "circle", "class_id": 1, "score": 0.97}
                            ],
                        },
                        {"file": "b.jpg", "image": {"width": 640, "height": 480}, "detections": []},
                    ],
                }
            ]
        }
    )

    job_id: str | None = Field(description="The job whose model answered; null for model=coco.")
    model: str = Field(description='"job:<id>", or "coco" for torchvision\'s COCO-trained SSD300.')
    results: list[ImageDetections] = Field(description="One per uploaded image, in the order they were sent.")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dataset_id": "3f9c1a2b7d4e"}]})

    dataset_id: str = Field(pattern=ID_PATTERN, description="A dataset with the model's class names, in any order.")


class ClassAP(BaseModel):
    label: str
    ap50: float | None = Field(description="Average precision at IoU 0.5; null when the dataset has no such box.")
    ap: float | None = Field(description="Average precision over IoU 0.5:0.95 (COCO's); null likewise.")
    num_boxes: int = Field(description="The dataset's boxes of this class.")


class EvaluateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "9b1f0c3a5e7d",
                    "dataset_id": "3f9c1a2b7d4e",
                    "num_images": 64,
                    "map50": 0.91,
                    "map": 0.62,
                    "per_class": [
                        {"label": "circle", "ap50": 0.95, "ap": 0.7, "num_boxes": 52},
                        {"label": "square", "ap50": 0.9, "ap": 0.61, "num_boxes": 57},
                        {"label": "triangle", "ap50": 0.88, "ap": 0.55, "num_boxes": 52},
                    ],
                }
            ]
        }
    )

    job_id: str
    dataset_id: str
    num_images: int
    map50: float | None = Field(description="COCO mAP at IoU 0.5 (the mean over classes with boxes).")
    map: float | None = Field(description="COCO mAP over IoU 0.5:0.95.")
    per_class: list[ClassAP] = Field(description="One entry per class of the model, in the model's order.")


class WeightsFile(BaseModel):
    file: str = Field(description="torchvision's published file name; its part after the last dash starts its SHA-256.")
    kind: Literal["coco", "imagenet"]
    backbone: Literal["vgg16", "vgg16_bn"]
    present: bool = Field(description="Whether this server's weights folder holds it.")
    bytes: int | None
    url: str = Field(description="Where it is downloaded from.")


class WeightsInfo(BaseModel):
    folder: str = Field(description="SSD_WEIGHTS_DIR.")
    download: Literal["auto", "never"] = Field(description="SSD_WEIGHTS_DOWNLOAD: whether missing files are fetched.")
    files: list[WeightsFile]
    inits: dict[str, str] = Field(description="What each init of POST /train would start from here now.")
    coco_model: bool = Field(description="Whether POST /detect?model=coco can answer (its weights are here).")


class WorkerSeen(BaseModel):
    name: str
    last_seen_seconds_ago: float
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="Where it trains (SSD_DEVICE as it resolved there)."
    )


class Ready(BaseModel):
    status: Literal["ready", "unavailable"]
    redis: str
    storage: str = Field(description='"ok", or why the datasets and runs cannot be reached (a bucket away).')
    workers: list[WorkerSeen]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


def invalid_body(field: str | None, message: str, value: Any = None) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors (what the OpenAPI document declares), for
    checks that only the running server can make (its limits, ``TrainConfig``'s own checks)."""
    where = ("body", field) if field else ("body",)
    return RequestValidationError([{"type": "value_error", "loc": where, "msg": message, "input": value}])
