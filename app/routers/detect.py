"""POST /detect: boxes for an uploaded image from a trained job's model, as JSON or drawn on a PNG."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Header, HTTPException, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.deps import DetectorDep, SettingsDep, StoreDep, job_or_404
from app.inference import (
    ACCEPTED_FORMATS,
    CheckpointMissing,
    CheckpointSource,
    DetectionsBusy,
    DeviceUnavailable,
    ImageRejected,
)
from app.schemas import DetectResponse
from app.timing import ServerTiming
from worker.settings import Settings
from worker.storage import Storage
from worker.store import Store

router = APIRouter(tags=["detection"])


def _quality(media_range: str) -> tuple[str, float]:
    """``"image/png;q=0.5"`` -> ``("image/png", 0.5)``."""
    media, *params = (part.strip() for part in media_range.split(";"))
    quality = 1.0
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = min(max(float(value), 0.0), 1.0)
            except ValueError:
                quality = 0.0
    return media.lower(), quality


def wants_png(accept: str | None) -> bool:
    """Whether an Accept header prefers ``image/png`` to ``application/json`` (a tie: JSON).

    Each type gets the quality of the most specific range that matches it (RFC 9110 12.5.1).
    """
    if not accept:
        return False
    ranges = [_quality(part) for part in accept.split(",") if part.strip()]

    def quality(media: str) -> float:
        kind = media.split("/")[0] + "/*"
        for candidate in (media, kind, "*/*"):
            found = [q for m, q in ranges if m == candidate]
            if found:
                return max(found)
        return 0.0

    return quality("image/png") > quality("application/json")


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
    return job_id, partial(open_checkpoint, settings.storage, job_id, Path(job.checkpoint).name)


@contextmanager
def open_checkpoint(storage: Storage, job_id: str, name: str) -> Iterator[Path]:
    """The job's checkpoint ``name`` for a ``with`` block (CheckpointMissing if its run has none)."""
    with storage.run_file(job_id, name) as path:
        if path is None:
            raise CheckpointMissing(f"job {job_id}'s checkpoint {name} is missing from its run folder")
        yield path


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON detections, or the annotated PNG."},
        400: {"description": "A truncated or corrupt image."},
        404: {"description": "No such job."},
        409: {"description": "No trained model yet (or the job has none)."},
        413: {"description": "The upload or its pixel count is over the limit."},
        415: {"description": f"Not an image, or not one of {', '.join(ACCEPTED_FORMATS.values())}."},
        503: {
            "description": (
                "Too many detections already waiting (with Retry-After), detection took too long (server busy), "
                "or the model's device is missing."
            )
        },
    },
)
async def detect(
    file: Annotated[UploadFile, File(description="A JPEG, PNG, WebP or BMP image.")],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    detection: DetectorDep,
    job_id: Annotated[str | None, Query(description="Default: the newest succeeded job.")] = None,
    score_threshold: Annotated[float, Query(ge=0, le=1)] = 0.5,
    max_detections: Annotated[int, Query(ge=1, le=1000)] = 100,
    format: Annotated[Literal["json", "png"] | None, Query(description="png: the image with boxes drawn.")] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    """Detect objects in an image. Boxes are ``[x1, y1, x2, y2]`` in the uploaded image's pixels
    (after its EXIF orientation), sorted by score. The ``Server-Timing`` header says how long
    decoding, detection (waiting for a batch included) and the whole handler took, in ms."""
    timing = ServerTiming()
    try:
        admission = detection.admit()  # before the image is decoded: a refusal costs next to nothing
    except DetectionsBusy as error:
        raise HTTPException(503, str(error), {"Retry-After": "2"}) from error
    with admission:
        job_id, checkpoint = await run_in_threadpool(resolve_model, store, settings, job_id)
        if file.size is not None and file.size > settings.max_image_bytes:
            detail = f"the image is {file.size} bytes; the limit is {settings.max_image_bytes} bytes"
            raise HTTPException(413, detail)
        data = await file.read()
        try:
            with timing.phase("decode"):
                image = await detection.decode(data, settings.max_image_pixels)
        except ImageRejected as error:
            raise HTTPException(error.status_code, f"{file.filename or 'upload'}: {error}") from error
        try:
            with timing.phase("detect"):
                detections = await asyncio.wait_for(
                    detection.detect(job_id, checkpoint, image, score_threshold, max_detections),
                    settings.detect_timeout_seconds,
                )
        except asyncio.TimeoutError as error:
            raise HTTPException(
                503,
                f"detection took longer than {settings.detect_timeout_seconds:g}s (the server is busy): try again",
                {"Retry-After": "5"},
            ) from error
        except DeviceUnavailable as error:
            raise HTTPException(503, f"job {job_id}'s model cannot be loaded here: {error}") from error
        except CheckpointMissing as error:
            raise HTTPException(409, str(error)) from error
        except ValueError as error:  # CheckpointError: a truncated or foreign checkpoint file
            raise HTTPException(500, f"job {job_id}'s checkpoint cannot be loaded: {error}") from error
        if format == "png" or (format is None and wants_png(accept)):
            with timing.phase("draw"):
                png = await detection.draw(image, detections)
            return Response(png, media_type="image/png", headers={"X-Job-Id": job_id, **_timed(timing)})
        response.headers.update(_timed(timing))
        return {"job_id": job_id, "image": {"width": image.width, "height": image.height}, "detections": detections}


def _timed(timing: ServerTiming) -> dict[str, str]:
    return {"Server-Timing": timing.header()}
