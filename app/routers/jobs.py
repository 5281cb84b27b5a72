"""POST /train and /jobs: job records, progress, losses (JSON, SSE, PNG), cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.deps import AsyncRedisDep, CeleryDep, SettingsDep, StoreDep, dataset_or_404, job_or_404
from app.schemas import Job, JobStatus, Losses, TrainRequest, public_job
from model.plots import plot_losses
from worker.queue import dispatch
from worker.store import FAILED, FINISHED, QueueFull, Store, decode_fields, epoch_stream_id, new_id, new_job

router = APIRouter(tags=["jobs"])
# The event stream also takes the API key as ?api_key= (browsers' EventSource sends no headers).
stream_router = APIRouter(tags=["jobs"])

MAX_EPOCH = 2**53  # larger epochs cannot exist; bounding them keeps stream ids valid
_NOT_FOUND = {404: {"description": "No such job."}}


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses={
        404: {"description": "No such dataset."},
        422: {"description": "Invalid training settings."},
        429: {"description": "Too many jobs are waiting for a worker (SSD_MAX_QUEUED_JOBS)."},
    },
)
def start_training(body: TrainRequest, store: StoreDep, settings: SettingsDep, celery: CeleryDep) -> dict:
    """Queue a training job on a dataset; a worker picks it up. Watch it at /jobs/{id}."""
    dataset = dataset_or_404(store, body.dataset_id)
    try:
        config = body.train_config()
    except ValueError as error:
        raise HTTPException(422, str(error)) from error
    job = new_job(new_id(), dataset, config.to_dict())
    try:
        created = store.create_job(job, max_queued=settings.max_queued_jobs)
    except QueueFull as error:
        raise HTTPException(429, f"{error}: try again when some have started", {"Retry-After": "60"}) from error
    if not created:
        raise HTTPException(404, f"dataset {body.dataset_id!r} was deleted")
    try:
        dispatch(celery, store, job["id"], settings.queue)
    except Exception as error:
        store.finish_job(job["id"], FAILED, error=f"could not queue the job: {error}")
        raise HTTPException(503, f"could not queue the job: {error}") from error
    return public_job(job)


@router.get("/jobs", response_model=list[Job])
def list_jobs(
    store: StoreDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> list[dict]:
    """Jobs, newest first; ``status`` keeps only jobs in that status."""
    if status is None:
        ids = store.list_job_ids(offset, limit)
    else:
        ids = store.list_job_ids_with_status(status, offset, limit)
    return [public_job(job) for job in store.get_jobs(ids)]


@router.get("/jobs/{job_id}", response_model=Job, responses=_NOT_FOUND)
def get_job(job_id: str, store: StoreDep) -> dict:
    """The job's record with its progress: epoch, step, steps per epoch and ETA in seconds."""
    return public_job(job_or_404(store, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, responses=_NOT_FOUND)
def cancel_job(job_id: str, store: StoreDep) -> dict:
    """Cancel: a queued job never starts; a running one stops within a batch and keeps its last checkpoint.
    A job that has ended already is answered as it is (202, nothing changes)."""
    if store.request_cancel(job_id) is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return public_job(job_or_404(store, job_id))


@router.get("/jobs/{job_id}/losses", response_model=Losses, responses=_NOT_FOUND)
def get_losses(job_id: str, store: StoreDep, after: Annotated[int, Query(ge=0, le=MAX_EPOCH)] = 0) -> dict:
    """One record per finished epoch, oldest first; ``after=N`` returns only epochs after N."""
    job = job_or_404(store, job_id)
    return {"job_id": job_id, "status": job["status"], "losses": store.losses(job_id, after)}


async def _loss_events(redis, store: Store, job_id: str, after: int, request: Request) -> AsyncIterator:
    """History, then live epochs (XREAD BLOCK), then one ``status`` event once the job has ended."""
    key, job_key, last = store.losses_key(job_id), store.job_key(job_id), after
    while not await request.is_disconnected():
        raw_status = await redis.hget(job_key, "status")
        ended = raw_status is None or json.loads(raw_status) in FINISHED
        # Epochs are appended before the final status is written: once the job has ended,
        # one non-blocking read drains what is left.
        reply = await redis.xread({key: epoch_stream_id(last)}, count=100, block=None if ended else 1000)
        entries = reply[0][1] if reply else []
        for _, fields in entries:
            last = int(fields["epoch"])
            yield ServerSentEvent(data=fields["record"], event="epoch", id=str(last))
        if ended and not entries:
            job = decode_fields(await redis.hgetall(job_key))
            # The same fields GET /jobs/{id} shows: the model drops the store's internal ones.
            shown = Job.model_validate(public_job(job)).model_dump(mode="json") if job else {"id": job_id}
            yield ServerSentEvent(data=json.dumps(shown), event="status")
            return


@stream_router.get(
    "/jobs/{job_id}/losses/stream",
    responses={**_NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events."}},
)
async def stream_losses(
    job_id: str,
    request: Request,
    store: StoreDep,
    redis: AsyncRedisDep,
    after: Annotated[int, Query(ge=0, le=MAX_EPOCH)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=100)] = None,
) -> EventSourceResponse:
    """Server-Sent Events: an ``epoch`` event per finished epoch (history first, then live), then a
    ``status`` event with the job record when the job ends. Reconnects resume after ``Last-Event-ID``.
    With API keys on, a browser's EventSource may send the key as ``?api_key=``."""
    if not await redis.exists(store.job_key(job_id)):
        raise HTTPException(404, f"no job with id {job_id!r}")
    if last_event_id is not None and last_event_id.isascii() and last_event_id.isdigit():
        after = max(after, min(int(last_event_id), MAX_EPOCH))
    return EventSourceResponse(_loss_events(redis, store, job_id, after, request), ping=15)


@router.get(
    "/jobs/{job_id}/losses.png",
    response_class=Response,
    responses={**_NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "The learning curve."}},
)
def losses_png(job_id: str, store: StoreDep, settings: SettingsDep) -> Response:
    """The learning curve: train and validation loss per epoch."""
    job = job_or_404(store, job_id)
    records = store.losses(job_id)
    if records:
        return Response(plot_losses(records), media_type="image/png")
    saved = settings.runs_dir / job_id / "losses.png"
    if saved.is_file():
        return Response(saved.read_bytes(), media_type="image/png")
    raise HTTPException(404, f"job {job_id} ({job['status']}) has no finished epoch yet: no learning curve to draw")
