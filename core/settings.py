"""The service's one settings class, read from ``SSD_*`` environment variables.

Read once per process (the API's ``create_app``, the Celery app module) and passed down.
``open_storage`` turns ``SSD_STORAGE_URL`` into the storage every process uses.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.bucket_storage import BucketStorage
from core.layout import DataLayout
from core.s3 import URL_PATTERN
from core.storage import FolderStorage, Storage

MiB = 1024 * 1024
GiB = 1024 * MiB
CPU_DETECT_BATCH, GPU_DETECT_BATCH = 8, 64  # /detect's default batch sizes (SSD_DETECT_BATCH_SIZE unset)
CPU_IMAGE_THREADS, GPU_IMAGE_THREADS = 2, 8  # /detect's default decoding threads (SSD_IMAGE_THREADS unset)
# Each pending /detect holds its decoded image: 128 photos of 640x480 are 118 MB, of 12 MP 4.6 GB.
# Two GPU batches: one runs while the next gathers.
MAX_DEFAULT_PENDING_DETECTIONS = 128

# Variables renamed so that a forward pass's batch and a request's images cannot be taken for each other.
# The old names are read for one more release, with a FutureWarning (``RenamedVariables``).
RENAMED_VARIABLES = {
    "SSD_BATCH_MAX_SIZE": "SSD_DETECT_BATCH_SIZE",
    "SSD_BATCH_MAX_WAIT_MS": "SSD_DETECT_BATCH_WAIT_MS",
    "SSD_MAX_BATCH_IMAGES": "SSD_MAX_IMAGES_PER_REQUEST",
    "SSD_MAX_BATCH_BYTES": "SSD_MAX_BATCH_REQUEST_BYTES",
}


class Settings(BaseSettings):
    """Every knob of the API, the worker and the launcher. Each is ``SSD_<NAME>`` in the environment.

    Sizes are bytes, durations seconds unless the name says otherwise.
    """

    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore", frozen=True)

    # Where things live.
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description=(
            "Redis for the job store and Celery's broker. "
            "`up` uses it only when set and answering; otherwise it starts its own."
        ),
    )
    data_dir: Path = Field(
        Path("data"),
        description=(
            "Datasets, training runs and (for `up`) Redis's files. Without SSD_STORAGE_URL, the API and every "
            "worker must see the same folder: workers on other machines need it on shared storage (NFS...)."
        ),
    )
    storage_url: str | None = Field(
        None,
        pattern=URL_PATTERN,
        description=(
            "Unset: datasets and runs live in SSD_DATA_DIR. `s3://bucket/prefix`: in that S3-compatible bucket "
            "(AWS S3, MinIO, Ceph), reached with the standard AWS variables (AWS_ENDPOINT_URL, "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) or AWS_PROFILE; SSD_DATA_DIR then "
            "holds only a local cache, and workers need no shared folder."
        ),
    )
    cache_bytes: int = Field(
        20 * GiB,
        ge=0,
        description=(
            "With SSD_STORAGE_URL: most bytes of bucket objects (datasets, checkpoints) kept in SSD_DATA_DIR; "
            "the least recently used go first. What a running job or request uses stays until it is done."
        ),
    )
    key_prefix: str = Field("ssd", pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every Redis key.")

    # Pretrained weights (``core.weights``).
    weights_dir: Path | None = Field(
        None,
        description=(
            "torchvision's weight files under their published names (ssd300_vgg16_coco-b556d3b4.pth...), shared by "
            "the API and every worker. Unset: SSD_DATA_DIR/weights. With SSD_STORAGE_URL each host keeps its copy "
            "here and the bucket holds them once."
        ),
    )
    weights_download: Literal["auto", "never"] = Field(
        "auto",
        description=(
            "auto: a weights file that is missing is downloaded on first use (checked against the SHA-256 in its "
            "name); never: only files already there (`ssd-service weights fetch` or `import` put them there)."
        ),
    )
    weights_base_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        description="Where weights files are downloaded from (base URL + file name). Unset: torchvision's URLs.",
    )
    weights_connect_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Longest wait to connect for a weights download (then init auto falls back)."
    )
    weights_read_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="Longest wait for the next bytes of a weights download before it gives up."
    )

    # HTTP server (`ssd-service api`, `up`).
    host: str = Field("127.0.0.1", description="Address the API listens on (0.0.0.0 in Docker).")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")

    api_key: SecretStr | None = Field(
        None,
        description=(
            "API keys, comma-separated (at least 16 characters each). When set, every route but /healthz, the "
            "web page and the docs needs one in the X-API-Key header; unset: no authentication (local use)."
        ),
    )
    allowed_hosts: str = Field(
        "localhost,127.0.0.1,[::1]",
        # Names and bracketed IPv6 addresses, comma-separated: the forms a Host header can carry.
        pattern=r"^ *([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]) *(, *([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]) *)*$",
        description=(
            "Without SSD_API_KEY, the API answers only requests whose Host header names one of these hosts "
            "(comma-separated, any port, IPv6 in brackets), so that other web sites cannot reach it through "
            "DNS rebinding; it also refuses their form posts. Not checked when keys are set."
        ),
    )

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto (CUDA when available), cpu or cuda: for detection, and for jobs whose device is auto.",
    )
    cpu_precision: Literal["auto", "fp32"] = Field(
        "auto",
        description=(
            "auto: on a CPU that computes bf16 natively (AVX512-BF16 or AMX), training, detection and evaluation "
            "run in bf16 (several times faster; weights and checkpoints stay float32), elsewhere in float32. "
            "fp32: float32 on the CPU always. GPUs are not affected (a job's `amp` decides there)."
        ),
    )
    api_cpu_cores: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "CPU cores that the API's detection and evaluation use, and that a worker training on the CPU of "
            "the same host leaves them while the API detects: the API runs that many PyTorch threads; a worker "
            "every core while the API is idle, its host's cores minus that many (at least one) from within a "
            "second of a detection until a few seconds after the last. `half`: half the host's cores (what "
            "`ssd-service up` and docker-compose.yml, which run both on one host, set unless told otherwise). "
            "Unset: each process uses every core (a host that runs only workers, or only the API)."
        ),
    )

    # Request limits (413 above them; archive limits are checked before extracting).
    max_body_bytes: int = Field(1 * MiB, ge=1024, description="Largest request body of a route without its own limit.")
    max_upload_bytes: int = Field(1024 * MiB, ge=1024, description="Largest dataset archive upload.")
    max_archive_files: int = Field(100_000, ge=1, description="Most entries in a dataset archive.")
    max_archive_bytes: int = Field(4 * 1024 * MiB, ge=1024, description="Largest total uncompressed archive size.")
    max_compression_ratio: float = Field(
        100.0, ge=1, description="Largest uncompressed/compressed size ratio of an archive entry over 1 MiB."
    )
    import_slots: int = Field(
        2, ge=1, le=64, description="Dataset imports that may run at once; more answer 503 with Retry-After."
    )
    max_image_bytes: int = Field(32 * MiB, ge=1024, description="Largest image upload to /detect.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Most pixels (width x height) of a /detect image.")
    max_synthetic_images: int = Field(5000, ge=1, description="Most images of one POST /datasets/synthetic.")
    max_eval_images: int = Field(
        5000,
        ge=1,
        description=(
            "Most images of a dataset that POST /jobs/{id}/evaluate scores (413 above). An evaluation keeps every "
            "image's detections until it ends and takes turns with /detect on the inference thread."
        ),
    )
    max_queued_jobs: int = Field(1000, ge=1, description="Most jobs waiting for a worker; POST /train answers 429.")
    max_event_streams: int = Field(
        100,
        ge=1,
        le=10_000,
        description=(
            "Most open /jobs/{id}/losses/stream connections (each holds a Redis connection); more answer 503. "
            "The API's Redis connections are capped to match."
        ),
    )
    detect_timeout_seconds: float = Field(
        60.0, gt=0, description="Longest a /detect request waits for its model and forward pass (then 503)."
    )
    max_pending_detections: int | None = Field(
        None,
        ge=1,
        description=(
            "Most /detect requests admitted and not yet answered (decoding, waiting for the model or a batch, "
            "running); more answer 503 with Retry-After before their image is decoded. It bounds the memory their "
            "images hold (each up to SSD_MAX_IMAGE_PIXELS x 3 bytes decoded). Unset: four batches "
            "(SSD_DETECT_BATCH_SIZE), which lets one batch run while the next ones gather (a request past that would "
            "wait several forward passes anyway), and at most 128."
        ),
    )
    image_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Threads that decode /detect images and draw ?format=png answers: a pool apart from the one every "
            "other route uses. Unset: 2 where detection runs on the CPU (they keep decoding ahead of the forward "
            "passes without taking their cores), 8 on a GPU (where decoding on the CPU is the longer part)."
        ),
    )
    max_images_per_request: int = Field(
        64,
        ge=1,
        le=500,  # under the multipart parser's 1,000 parts
        description=(
            "Most images in one POST /detect/batch request (422 above), and at most half of "
            "SSD_MAX_PENDING_DETECTIONS: each image takes one of those places while it is served."
        ),
    )
    max_batch_request_bytes: int = Field(
        256 * MiB, ge=1024, description="Largest POST /detect/batch body, all its images together (413 above)."
    )

    # Inference: the micro-batcher and the detector cache.
    detect_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Most images in one batched forward pass of /detect. Unset: 8 where detection runs on the CPU (one "
            "image already keeps every core busy), 64 on a GPU (a batch costs little more than one image there)."
        ),
    )
    detect_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "Longest a request waits for others to join before an idle model runs. 0: an idle model runs at once; "
            "requests that arrive while a forward pass runs are gathered for the next one, so batches fill under "
            "load and a lone request is not held back."
        ),
    )
    inference_threads: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Forward passes that may run at once, for different models: one model's requests share one "
            "batched forward at a time."
        ),
    )
    detector_cache_size: int = Field(2, ge=1, le=64, description="Trained models kept loaded in the API.")

    # Worker: job lease, progress reporting, Celery's broker.
    lease_seconds: float = Field(60.0, ge=1, description="A job's lease expires this long after its last renewal.")
    progress_interval_seconds: float = Field(1.0, gt=0, description="Per-step progress is written this often.")
    cancel_check_seconds: float = Field(
        0.1,
        gt=0,
        le=10,
        description="How often a running job's monitor thread reads the cancel flag; it stops at the next batch.",
    )
    worker_heartbeat_seconds: float = Field(5.0, gt=0, description="How often a worker says it is alive.")
    max_job_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description=(
            "How often a job whose worker died under it (killed, out of memory, lost its machine) is resumed; "
            "the next such crash fails it."
        ),
    )
    max_storage_pauses: int = Field(
        5,
        ge=0,
        le=1000,
        description=(
            "How often in a row a job whose storage (the bucket) cannot be reached is put back to wait for it, "
            "each time longer (from half a lease, doubling, at most 10 minutes); the next time it fails, naming "
            "the storage and the reason. A storage that refuses (credentials, no such bucket) fails it at once."
        ),
    )
    visibility_timeout_seconds: int = Field(
        6 * 3600,
        ge=1,
        description=(
            "Celery's Redis transport redelivers a task not acked within this time. Tasks are acked late "
            "(after training), so a job longer than this is delivered again; the job's lease makes the "
            "second delivery a no-op while the first still runs."
        ),
    )
    queue: str = Field("training", pattern=r"^[A-Za-z0-9_.-]+$", description="Celery queue of training tasks.")
    gpus: str = Field(
        "all",
        pattern=r"^(all|none|[0-9]+(,[0-9]+)*)$",
        description=(
            "GPUs that `ssd-service workers` starts a training worker for: all (those this host shows), a list "
            "of indices such as 0,1,3, or none. No GPU found: one CPU worker."
        ),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The old names of renamed variables come before the environment's own reading of the new ones.
        renamed = RenamedVariables(settings_cls)
        return init_settings, renamed, env_settings, dotenv_settings, file_secret_settings

    @field_validator("storage_url", "weights_dir", "weights_base_url", "api_cpu_cores", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # SSD_STORAGE_URL= (as Compose passes an unset one)

    @field_validator("api_cpu_cores", mode="before")
    @classmethod
    def _half_the_cores(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "half":
            from core.cpu_threads import shared_host_api_cores  # here: core.cpu_threads imports this module

            return shared_host_api_cores()
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
        if self.worker_heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("lease_seconds must be at least twice worker_heartbeat_seconds")
        if self.cancel_check_seconds * 3 > self.lease_seconds:
            # The monitor renews the lease on its ticks, every third of the lease: a longer tick lets it lapse.
            raise ValueError("cancel_check_seconds must be at most a third of lease_seconds (the lease would lapse)")
        if any(len(key) < 16 for key in self.api_keys):
            raise ValueError("SSD_API_KEY: each key (comma-separated) must have at least 16 characters")
        return self

    def detect_batch_size_for(self, on_gpu: bool) -> int:
        """SSD_DETECT_BATCH_SIZE, or its default for where detection runs."""
        return self.detect_batch_size or (GPU_DETECT_BATCH if on_gpu else CPU_DETECT_BATCH)

    def detect_image_threads(self, on_gpu: bool) -> int:
        """SSD_IMAGE_THREADS, or its default for where detection runs."""
        return self.image_threads or (GPU_IMAGE_THREADS if on_gpu else CPU_IMAGE_THREADS)

    def pending_detections(self, on_gpu: bool) -> int:
        """SSD_MAX_PENDING_DETECTIONS, or four batches, at most ``MAX_DEFAULT_PENDING_DETECTIONS``."""
        return self.max_pending_detections or min(
            4 * self.detect_batch_size_for(on_gpu), MAX_DEFAULT_PENDING_DETECTIONS
        )

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        """The accepted API keys as bytes; none (unset or empty): authentication is off."""
        if self.api_key is None:
            return ()
        keys = (key.strip() for key in self.api_key.get_secret_value().split(","))
        return tuple(key.encode() for key in keys if key)

    @property
    def layout(self) -> DataLayout:
        """Where datasets, runs and process locks live under ``data_dir``."""
        return DataLayout(self.data_dir)

    @property
    def storage(self) -> Storage:
        """Where datasets and runs are kept (``core.storage``): the data folder, or SSD_STORAGE_URL's bucket."""
        return open_storage(self.storage_url, self.layout, self.cache_bytes)

    @property
    def weights_folder(self) -> Path:
        """SSD_WEIGHTS_DIR, or the data folder's ``weights``."""
        return self.weights_dir if self.weights_dir is not None else self.layout.weights_dir

    @property
    def datasets_dir(self) -> Path:
        return self.layout.datasets_dir

    @property
    def runs_dir(self) -> Path:
        return self.layout.runs_dir


class RenamedVariables(PydanticBaseSettingsSource):
    """The value of each renamed variable set under its old name (``RENAMED_VARIABLES``), with a
    FutureWarning. Where the new name is set too, the new one wins and the old one is only warned about."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # every value comes from __call__

    def __call__(self) -> dict[str, Any]:
        environment = {name.upper(): value for name, value in os.environ.items()}
        values: dict[str, Any] = {}
        for old, new in RENAMED_VARIABLES.items():
            if old not in environment:
                continue
            if new in environment:
                warnings.warn(f"{old} is ignored: {new}, its new name, is set", FutureWarning, stacklevel=2)
                continue
            warnings.warn(
                f"{old} is renamed {new}; the old name is read until the next release", FutureWarning, stacklevel=2
            )
            values[new.removeprefix("SSD_").lower()] = environment[old]
        return values


@lru_cache(maxsize=8)
def open_storage(url: str | None, layout: DataLayout, cache_bytes: int) -> Storage:
    """The storage ``SSD_STORAGE_URL`` names: None is the data folder; ``s3://bucket/prefix`` a bucket.
    One per process for the same arguments (a bucket's client is made once)."""
    if not url:
        return FolderStorage(layout)
    return BucketStorage(url, layout, cache_bytes)


def settings_table() -> str:
    """Every setting as a Markdown table: variable, default, meaning (``ssd-service settings``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = str(default) if not isinstance(default, Path) else default.as_posix()
        rows.append(f"| `SSD_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)
