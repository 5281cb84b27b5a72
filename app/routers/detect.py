"""POST /detect: boxes for an uploaded image from a trained job's model (or torchvision's COCO-trained
SSD300), as JSON or drawn on a PNG; POST /detect/batch: for several images in one request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, File, Header, HTTPException, Query, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.deps import DetectorDep, SettingsDep, StoreDep
from app.inference import (
    ACCEPTED_FORMATS,
    Detections,
    DetectionsBusy,
    DetectionService,
    ImageRejected,
)
from app.model_choice import ModelChoice, choose_model, model_load_errors
from app.schemas import PNG_CONTENT, DetectBatchResponse, DetectResponse, Responses
from app.timing import ServerTiming
from core.settings import Settings

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


_ERRORS: Responses = {
    400: {"description": "A truncated or corrupt image."},
    404: {"description": "No such job, or (model=coco) the COCO weights are not in the weights folder."},
    409: {"description": "No trained model yet (or the job has none)."},
    413: {"description": "The upload or its pixel count is over the limit."},
    415: {"description": f"Not an image, or not one of {', '.join(ACCEPTED_FORMATS.values())}."},
    503: {
        "description": (
            "Too many detections already waiting (with Retry-After), detection took too long (server busy), "
            "or the model's device is missing."
        )
    },
}
JobQuery = Annotated[str | None, Query(description="Default: the newest succeeded job.")]
ModelQuery = Annotated[
    Literal["coco"] | None,
    Query(
        description=(
            "coco: torchvision's COCO-trained SSD300 (80 categories) instead of a job's model, when its weights "
            "are in the weights folder (`ssd-service weights fetch coco`)."
        )
    ),
]
ScoreQuery = Annotated[float, Query(ge=0, le=1)]
MostQuery = Annotated[int, Query(ge=1, le=1000)]


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={
        200: {"content": {"image/png": PNG_CONTENT}, "description": "JSON detections, or the annotated PNG."},
        **_ERRORS,
    },
)
async def detect(
    file: Annotated[UploadFile, File(description="A JPEG, PNG, WebP or BMP image.")],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    detection: DetectorDep,
    job_id: JobQuery = None,
    model: ModelQuery = None,
    score_threshold: ScoreQuery = 0.5,
    max_detections: MostQuery = 100,
    format: Annotated[Literal["json", "png"] | None, Query(description="png: the image with boxes drawn.")] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    """Detect objects in an image. Boxes are ``[x1, y1, x2, y2]`` in the uploaded image's pixels
    (after its EXIF orientation), sorted by score. The ``Server-Timing`` header says how long
    decoding, detection (waiting for a batch included) and the whole handler took, in ms."""
    timing = ServerTiming()
    with _admitted(detection, 1):
        chosen = await run_in_threadpool(choose_model, store, settings, job_id, model)
        data = await _read(file, settings)
        with timing.phase("decode"):
            image = await _decode(detection, data, file, settings)
        with timing.phase("detect"):
            [detections] = await _detect(detection, settings, chosen, [image], score_threshold, max_detections)
        if format == "png" or (format is None and wants_png(accept)):
            with timing.phase("draw"):
                png = await detection.draw(image, detections)
            named = {"X-Model": chosen.name, **({"X-Job-Id": chosen.job_id} if chosen.job_id else {})}
            return Response(png, media_type="image/png", headers={**named, **_timed(timing)})
        response.headers.update(_timed(timing))
        size = {"width": image.width, "height": image.height}
        return {"job_id": chosen.job_id, "model": chosen.name, "image": size, "detections": detections}


@router.post("/detect/batch", response_model=DetectBatchResponse, responses=_ERRORS)
async def detect_batch(
    files: Annotated[
        list[UploadFile],
        File(min_length=1, description="JPEG, PNG, WebP or BMP images (SSD_MAX_IMAGES_PER_REQUEST at most)."),
    ],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    detection: DetectorDep,
    job_id: JobQuery = None,
    model: ModelQuery = None,
    score_threshold: ScoreQuery = 0.5,
    max_detections: MostQuery = 100,
):
    """Detect objects in several images at once: one answer per image, in the order sent, each as
    ``/detect`` gives it. The images share batched forward passes; if any image is refused (not an
    image, corrupt, too large), the request fails naming it and nothing is detected. Each image
    takes one of the detections allowed at once while the request is served; more images than
    the limit (the document's ``maxItems``) answer 422."""
    timing = ServerTiming()
    most = batch_image_limit(settings, detection)
    if len(files) > most:  # the OpenAPI document's maxItems: answered as FastAPI answers its own checks
        message = f"{len(files)} images in one request; the limit is {most}"
        raise RequestValidationError([{"type": "too_long", "loc": ("body", "files"), "msg": message, "input": None}])
    with _admitted(detection, len(files)):
        chosen = await run_in_threadpool(choose_model, store, settings, job_id, model)
        uploads = [await _read(file, settings) for file in files]
        with timing.phase("decode"):
            decoded = await asyncio.gather(
                *(_decode(detection, data, file, settings) for data, file in zip(uploads, files, strict=True)),
                return_exceptions=True,
            )
        # The first refused image in the order sent is the one named, however the decodes interleaved.
        images: list[Image.Image] = []
        for outcome in decoded:
            if isinstance(outcome, BaseException):
                raise outcome
            images.append(outcome)
        with timing.phase("detect"):
            found = await _detect(detection, settings, chosen, images, score_threshold, max_detections)
        response.headers.update(_timed(timing))
        results = [
            {"file": file.filename or "", "image": {"width": image.width, "height": image.height}, "detections": d}
            for file, image, d in zip(files, images, found, strict=True)
        ]
        return {"job_id": chosen.job_id, "model": chosen.name, "results": results}


def batch_image_limit(settings: Settings, detection: DetectionService) -> int:
    """The most images one /detect/batch request may send: SSD_MAX_IMAGES_PER_REQUEST, and at most half the
    detections admitted at once, so that a full batch request is admitted beside other traffic."""
    return max(1, min(settings.max_images_per_request, detection.max_pending // 2))


@contextmanager
def _admitted(detection: DetectionService, images: int) -> Iterator[None]:
    """Admission for ``images`` detections, before any image is decoded: a refusal costs next to nothing."""
    try:
        admission = detection.admit(images)
    except DetectionsBusy as error:
        raise HTTPException(503, str(error), {"Retry-After": "2"}) from error
    with admission:
        yield


async def _read(file: UploadFile, settings: Settings) -> bytes:
    if file.size is not None and file.size > settings.max_image_bytes:
        limit = settings.max_image_bytes
        raise HTTPException(
            413, f"{file.filename or 'upload'}: the image is {file.size} bytes; the limit is {limit} bytes"
        )
    return await file.read()


async def _decode(detection: DetectionService, data: bytes, file: UploadFile, settings: Settings) -> Image.Image:
    try:
        return await detection.decode(data, settings.max_image_pixels)
    except ImageRejected as error:
        raise HTTPException(error.status_code, f"{file.filename or 'upload'}: {error}") from error


async def _detect(
    detection: DetectionService,
    settings: Settings,
    chosen: ModelChoice,
    images: list[Image.Image],
    score_threshold: float,
    max_detections: int,
) -> list[Detections]:
    """Each image's detections from the micro-batcher, within SSD_DETECT_TIMEOUT_SECONDS; errors as HTTP answers."""
    tasks = [
        asyncio.ensure_future(detection.detect(chosen.key, chosen.checkpoint, image, score_threshold, max_detections))
        for image in images
    ]
    try:
        with model_load_errors(chosen.described):
            return await asyncio.wait_for(asyncio.gather(*tasks), settings.detect_timeout_seconds)
    except asyncio.TimeoutError as error:
        raise HTTPException(
            503,
            f"detection took longer than {settings.detect_timeout_seconds:g}s (the server is busy): try again",
            {"Retry-After": "5"},
        ) from error
    finally:
        # One image failed or the time ran out: the others leave their batches too, before the request
        # gives back its places (the micro-batcher skips what is cancelled).
        for task in tasks:
            task.cancel()


def _timed(timing: ServerTiming) -> dict[str, str]:
    return {"Server-Timing": timing.header()}
