"""POST /jobs/{id}/evaluate: a trained job's COCO mAP, overall and per class, on a dataset with its class names.

The evaluation uses /detect's detector (the same cache, so the same loaded model) and runs its
forward passes on /detect's inference thread, one batch of ``SSD_DETECT_BATCH_SIZE`` images at a
time: /detect's batches queue between them instead of waiting for the whole evaluation. Images
are read on the thread pool (the next batch while the current one runs), and the COCO scoring at
the end runs there too.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from app.deps import DetectorDep, JobId, SettingsDep, StoreDep, dataset_or_404
from app.inference import DetectionService
from app.model_choice import model_load_errors, resolve_model
from app.schemas import UNREADABLE_BODY, EvaluateRequest, EvaluateResponse
from core.records import DatasetRecord
from core.settings import Settings
from core.store import Store
from model.data import DatasetError, read_dataset

log = logging.getLogger(__name__)

router = APIRouter(tags=["evaluation"])

CLIENT_CLOSED_REQUEST = 499  # nobody reads it: the status the metrics and the access log show


class ClientGone(Exception):
    """The client closed the connection: the rest of the evaluation would be for nobody."""


@router.post(
    "/jobs/{job_id}/evaluate",
    response_model=EvaluateResponse,
    responses={
        **UNREADABLE_BODY,
        404: {"description": "No such job or dataset."},
        409: {
            "description": (
                "The job has no trained model, the dataset's class names are not the model's (the message names "
                "the missing and extra ones), or the dataset's files cannot be read."
            )
        },
        413: {"description": "The dataset has more images than SSD_MAX_EVAL_IMAGES."},
        503: {"description": "The model's device is missing here, or Redis or the storage is unreachable."},
    },
)
async def evaluate_job(
    job_id: JobId,
    body: EvaluateRequest,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    detection: DetectorDep,
):
    """Score a trained job's model on a dataset: COCO mAP@0.5 and mAP@0.5:0.95, overall and per class.

    The dataset's classes are matched to the model's by name, in any order. The answer comes when
    every image is scored (about the time of as many /detect images).
    """
    checkpoint, dataset = await run_in_threadpool(_resolve, store, settings, job_id, body.dataset_id)
    detector = await _detector(detection, job_id, checkpoint)
    with ExitStack() as held:  # the dataset's files stay (in the cache, with a bucket) until the scoring ends
        root = await run_in_threadpool(held.enter_context, settings.storage.dataset_files(dataset))
        evaluation, images = await run_in_threadpool(_prepare, detector.classes, dataset, root, settings)
        try:
            batch = detection.batcher.max_batch
            scores = await score_in_batches(detection, detector, evaluation, images, batch, request)
        except ClientGone:
            log.info("evaluation of job %s on dataset %s stopped: the client went away", job_id, dataset.id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except DatasetError as error:
            raise HTTPException(409, f"dataset {dataset.id}'s files cannot be read: {error}") from error
    return {"job_id": job_id, "dataset_id": dataset.id, **scores}


def _resolve(store: Store, settings: Settings, job_id: str, dataset_id: str):
    """The job's checkpoint and the dataset's record: 404 for either unknown, 409 without a model, 413 too large."""
    _, checkpoint = resolve_model(store, settings, job_id)
    dataset = dataset_or_404(store, dataset_id)
    if dataset.num_images > settings.max_eval_images:
        raise _too_many(dataset_id, dataset.num_images, settings)
    return checkpoint, dataset


async def _detector(detection: DetectionService, job_id: str, checkpoint):
    """/detect's cached detector for the job (loaded once for both)."""
    with model_load_errors(f"job {job_id}'s model"):
        return await detection.cache.get(job_id, checkpoint)


def _prepare(model_classes: list[str], dataset: DatasetRecord, root: Path, settings: Settings):
    """The evaluation (409 unless the class names match) and the dataset's annotated images."""
    from model.metrics import ClassMismatchError, DetectorEvaluation, class_id_map  # torchmetrics: on first use

    try:
        class_id_map(dataset.classes, model_classes)  # before reading a folder of thousands of images
        data = read_dataset(root)
        evaluation = DetectorEvaluation(model_classes, data.classes)
    except ClassMismatchError as error:
        raise HTTPException(409, f"dataset {dataset.id} cannot score this model: {error}") from error
    except DatasetError as error:
        raise HTTPException(409, f"dataset {dataset.id}'s files cannot be read: {error}") from error
    if len(data.images) > settings.max_eval_images:
        raise _too_many(dataset.id, len(data.images), settings)
    return evaluation, data.images


def _too_many(dataset_id: str, num_images: int, settings: Settings) -> HTTPException:
    return HTTPException(
        413,
        f"dataset {dataset_id} has {num_images} images; an evaluation takes at most "
        f"{settings.max_eval_images} (SSD_MAX_EVAL_IMAGES)",
    )


async def score_in_batches(
    detection: DetectionService, detector, evaluation, images: list, batch_size: int, request: Request
) -> dict[str, Any]:
    """Each batch's forward pass on the inference thread, its images read on the thread pool beforehand.

    Raises:
        ClientGone: the client left (checked before every forward pass).
        DatasetError: an image that cannot be read.
    """
    loop = asyncio.get_running_loop()
    batches = list(evaluation.batches(images, batch_size))

    def step(batch: list, pictures: list) -> None:
        evaluation.add(batch, evaluation.detect(detector, pictures))

    reading = asyncio.ensure_future(run_in_threadpool(evaluation.load, batches[0])) if batches else None
    try:
        for index, batch in enumerate(batches):
            pictures = await cast(asyncio.Future, reading)  # the batch's reading, started before its turn
            reading = None
            if index + 1 < len(batches):
                reading = asyncio.ensure_future(run_in_threadpool(evaluation.load, batches[index + 1]))
            if await request.is_disconnected():
                raise ClientGone
            detection.forward_starts()
            await loop.run_in_executor(detection.executor, step, batch, pictures)
    finally:
        if reading is not None:  # the batch after a failed or abandoned one: its result is not wanted
            reading.cancel()
            reading.add_done_callback(lambda future: future.cancelled() or future.exception())
    return await run_in_threadpool(evaluation.result)
