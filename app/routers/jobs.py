"""POST /train and /jobs: job records, progress, losses (JSON, SSE, PNG), cancel, delete.

Every change a route makes to a job reaches the job's ``job.json`` too (``core.storage``),
so a job survives Redis losing it from the moment POST /train answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.deps import (
    AsyncRedisDep,
    CeleryDep,
    EventStreamsDep,
    JobId,
    SettingsDep,
    StoreDep,
    dataset_or_404,
    job_or_404,
)
from app.event_streams import CountedEventSourceResponse
from app.paging import Cursor, Limit, link_next, read_page
from app.schemas import PNG_CONTENT, UNREADABLE_BODY, Job, JobStatus, Losses, Responses, TrainRequest, invalid_body
from core.dispatch import SEND_ERRORS, dispatch
from core.layout import LOSS_PLOT
from core.records import ACTIVE, FINISHED, SUCCEEDED, JobRecord
from core.settings import Settings
from core.store import ID_PATTERN, QueueFull, Store, epoch_stream_id, new_id
from model.config import JOB_INIT_PREFIX, TrainConfig, parse_init
from model.plots import plot_losses

router = APIRouter(tags=["jobs"])
# The event stream also takes the API key as ?api_key= (browsers' EventSource sends no headers).
stream_router = APIRouter(tags=["jobs"])

# Larger epochs cannot exist; bounding them keeps stream ids valid. 2^53 - 1: the largest integer a
# double holds exactly, so clients that parse numbers as doubles agree on the bound.
MAX_EPOCH = 2**53 - 1
_NOT_FOUND: Responses = {404: {"description": "No such job."}}
_BUSY_STREAMS: Responses = {
    503: {"description": "Too many event streams are open (SSD_MAX_EVENT_STREAMS), or Redis is away."}
}


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses={
        **UNREADABLE_BODY,
        404: {"description": "No such dataset."},
        422: {"description": "Invalid training settings."},
        429: {"description": "Too many jobs are waiting for a worker (SSD_MAX_QUEUED_JOBS)."},
    },
)
def start_training(body: TrainRequest, store: StoreDep, settings: SettingsDep, celery: CeleryDep) -> Job:
    """Queue a training job on a dataset; a worker picks it up. Watch it at /jobs/{id}."""
    dataset = dataset_or_404(store, body.dataset_id)
    try:
        config = body.train_config()
    except ValueError as error:
        raise invalid_body(None, str(error)) from error
    if config.init.startswith(JOB_INIT_PREFIX):
        config = fitted_to_source_job(store, body, config)
    try:
        job = store.create_job(JobRecord.new(new_id(), dataset, config.to_dict()), settings.max_queued_jobs)
    except QueueFull as error:
        raise HTTPException(429, f"{error}: try again when some have started", {"Retry-After": "60"}) from error
    if job is None:
        raise HTTPException(404, f"dataset {body.dataset_id!r} was deleted")
    try:
        settings.storage.save_job(job, create=True)  # before the answer: the job then survives Redis
        dispatch(celery, store, job.id, settings.queue)
    except (OSError, *SEND_ERRORS) as error:  # a folder lock held too long, a bucket away: OSErrors
        problem = f"could not queue the job: {error}"
        settings.storage.keep_job(store.fail_queued_job(job.id, problem))
        raise HTTPException(503, problem) from error
    return job.public()


@router.get("/jobs", response_model=list[Job])
def list_jobs(
    request: Request,
    response: Response,
    store: StoreDep,
    status: JobStatus | None = None,
    dataset_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this dataset's jobs.")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> list[Job]:
    """Jobs, newest first, ``limit`` at a time; ``status`` and ``dataset_id`` keep only those jobs. The
    next page is named in the ``Link`` header (``rel="next"``), absent on the last page."""
    page = read_page(lambda: store.list_jobs(status, dataset_id, limit, cursor))
    link_next(request, response, page)
    return [job.public() for job in page.items]


@router.get("/jobs/{job_id}", response_model=Job, responses=_NOT_FOUND)
def get_job(job_id: JobId, store: StoreDep) -> Job:
    """The job's record with its progress: epoch, step, steps per epoch and ETA in seconds."""
    return job_or_404(store, job_id).public()


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, responses=_NOT_FOUND)
def cancel_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Job:
    """Cancel: a queued job never starts; a running one stops within a batch and keeps its last checkpoint.
    A job that has ended already is answered as it is (202, nothing changes)."""
    cancelled = store.request_cancel(job_id)
    if cancelled is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    before, job = cancelled
    if before in ACTIVE:  # an ended job is unchanged (and may be deleted meanwhile: no file for it)
        settings.storage.keep_job(job)
    return job.public()


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    responses={
        **_NOT_FOUND,
        409: {"description": "The job is queued or running: cancel it first."},
        503: {"description": "The storage (a bucket) could not delete the files; try again."},
    },
)
def delete_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Response:
    """Delete a job that has ended: its record, its losses and its run folder (checkpoints included)."""
    job = job_or_404(store, job_id)
    if job.status in ACTIVE:
        raise HTTPException(409, f"job {job_id} is {job.status}: cancel it first (POST /jobs/{job_id}/cancel)")
    # An ended job stays ended, so its files can go first: a crash then leaves a record without
    # files (DELETE again removes it), never files that would bring a deleted job back.
    try:
        settings.storage.remove_run(job_id)
    except OSError as error:  # a bucket away: the record stays, and DELETE can be tried again
        raise HTTPException(503, f"could not delete job {job_id}'s files: {error}") from error
    if store.delete_job(job) == "missing":
        raise HTTPException(404, f"no job with id {job_id!r}")
    return Response(status_code=204)


def fitted_to_source_job(store: Store, body: TrainRequest, config: TrainConfig) -> TrainConfig:
    """``config`` for an ``init: "job:<id>"``: the job's width unless one was given, once the job is known
    to have a model of the same architecture to start from.

    Raises:
        RequestValidationError: (422) no such job, no model yet, or another backbone or width asked for.
    """
    _, reference = parse_init(config.init)
    job_id = reference or ""  # a job: init always names one
    source = store.get_job(job_id)
    if source is None:
        raise invalid_body("init", f"init {config.init!r}: there is no job {job_id}", config.init)
    if source.status != SUCCEEDED or not source.checkpoint:
        problem = f"init {config.init!r}: job {job_id} is {source.status}; only a succeeded job's model can start one"
        raise invalid_body("init", problem, config.init)
    backbone = source.backbone or source.config.get("backbone") or "vgg16_bn"
    width = source.config.get("width_multiplier", 1.0)
    if config.backbone is not None and config.backbone != backbone:
        problem = f"init {config.init!r}: job {job_id} trained a {backbone} backbone, not {config.backbone}"
        raise invalid_body("backbone", problem, config.backbone)
    if "width_multiplier" in body.model_fields_set and config.width_multiplier != width:
        problem = f"init {config.init!r}: job {job_id} trained width_multiplier {width}, not {config.width_multiplier}"
        raise invalid_body("width_multiplier", problem, config.width_multiplier)
    return replace(config, width_multiplier=width)


def losses_with_history(store: Store, settings: Settings, job_id: str, after: int) -> list[dict[str, Any]]:
    """The job's epoch records after ``after`` from its loss stream, with any epoch the stream lost
    (a hole before its newest one) taken from the run folder's history."""
    records = store.losses(job_id, after)
    if [r["epoch"] for r in records] == list(range(after + 1, after + 1 + len(records))):
        return records
    merged = {r["epoch"]: r for r in settings.storage.history(job_id) if r["epoch"] > after}
    merged.update((r["epoch"], r) for r in records)
    return [merged[epoch] for epoch in sorted(merged) if epoch <= records[-1]["epoch"]]


@router.get("/jobs/{job_id}/losses", response_model=Losses, responses=_NOT_FOUND)
def get_losses(
    job_id: JobId, store: StoreDep, settings: SettingsDep, after: Annotated[int, Query(ge=0, le=MAX_EPOCH)] = 0
) -> dict:
    """One record per finished epoch, oldest first; ``after=N`` returns only epochs after N."""
    job = job_or_404(store, job_id)
    return {"job_id": job_id, "status": job.status, "losses": losses_with_history(store, settings, job_id, after)}


async def _loss_events(redis, store: Store, job_id: str, after: int, request: Request) -> AsyncIterator:
    """History, then live epochs (XREAD BLOCK), then one ``status`` event once the job has ended."""
    key, job_key, last = store.losses_key(job_id), store.job_key(job_id), after
    while not await request.is_disconnected():
        status = await redis.hget(job_key, "status")
        ended = status is None or status in FINISHED
        # Epochs are appended before the final status is written: once the job has ended,
        # one non-blocking read drains what is left.
        reply = await redis.xread({key: epoch_stream_id(last)}, count=100, block=None if ended else 1000)
        entries = reply[0][1] if reply else []
        for _, fields in entries:
            last = int(fields["epoch"])
            yield ServerSentEvent(data=fields["record"], event="epoch", id=str(last))
        if ended and not entries:
            fields = await redis.hgetall(job_key)
            shown = JobRecord.from_hash(fields).public().model_dump_json() if fields else json.dumps({"id": job_id})
            yield ServerSentEvent(data=shown, event="status")
            return


@stream_router.get(
    "/jobs/{job_id}/losses/stream",
    responses={
        **_NOT_FOUND,
        **_BUSY_STREAMS,
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events."},
    },
)
async def stream_losses(
    job_id: JobId,
    request: Request,
    store: StoreDep,
    redis: AsyncRedisDep,
    streams: EventStreamsDep,
    after: Annotated[int, Query(ge=0, le=MAX_EPOCH)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=100)] = None,
) -> EventSourceResponse:
    """Server-Sent Events: an ``epoch`` event per finished epoch (history first, then live), then a
    ``status`` event with the job record when the job ends. Reconnects resume after ``Last-Event-ID``.
    With API keys on, a browser's EventSource may send the key as ``?api_key=``. At most
    ``SSD_MAX_EVENT_STREAMS`` are open at once (each holds a Redis connection): past it, 503."""
    if not await redis.exists(store.job_key(job_id)):
        raise HTTPException(404, f"no job with id {job_id!r}")
    if last_event_id is not None and last_event_id.isascii() and last_event_id.isdigit():
        after = max(after, min(int(last_event_id), MAX_EPOCH))
    opened = streams.open()
    return CountedEventSourceResponse(_loss_events(redis, store, job_id, after, request), opened, ping=15)


@router.get(
    "/jobs/{job_id}/losses.png",
    response_class=Response,
    responses={**_NOT_FOUND, 200: {"content": {"image/png": PNG_CONTENT}, "description": "The learning curve."}},
)
def get_loss_plot(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Response:
    """The learning curve: train and validation loss per epoch."""
    job = job_or_404(store, job_id)
    records = losses_with_history(store, settings, job_id, 0)
    if records:
        return Response(plot_losses(records), media_type="image/png")
    with settings.storage.run_file(job_id, LOSS_PLOT) as saved:
        if saved is not None:
            return Response(saved.read_bytes(), media_type="image/png")
    raise HTTPException(404, f"job {job_id} ({job.status}) has no finished epoch yet: no learning curve to draw")
