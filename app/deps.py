"""FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``app.dependency_overrides``.

Each only reads ``app.state``, so each is ``async``: FastAPI runs it on the event loop
instead of sending it to the thread pool.
"""

from __future__ import annotations

from typing import Annotated

import redis.asyncio
from celery import Celery
from fastapi import Depends, HTTPException, Request

from app.event_streams import EventStreams
from app.inference import DetectionService
from app.prometheus import Metrics
from app.uploads import ImportSlots
from core.records import DatasetRecord, JobRecord
from core.settings import Settings
from core.store import Store, is_id


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_async_redis(request: Request) -> redis.asyncio.Redis:
    return request.app.state.async_redis


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_detection(request: Request) -> DetectionService:
    return request.app.state.detection


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_imports(request: Request) -> ImportSlots:
    return request.app.state.imports


async def get_event_streams(request: Request) -> EventStreams:
    return request.app.state.event_streams


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
DetectorDep = Annotated[DetectionService, Depends(get_detection)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ImportsDep = Annotated[ImportSlots, Depends(get_imports)]
EventStreamsDep = Annotated[EventStreams, Depends(get_event_streams)]


def checked_id(kind: str, value: str) -> str:
    """``value`` if it has the form of the service's ids, else 404 naming it: an id of another form
    names nothing, and never reaches Redis or the storage (``core.store.ID_PATTERN``)."""
    if not is_id(value):
        raise HTTPException(404, f"no {kind} with id {value!r}")
    return value


async def _job_id(job_id: str) -> str:
    return checked_id("job", job_id)


async def _dataset_id(dataset_id: str) -> str:
    return checked_id("dataset", dataset_id)


# A route's ``{job_id}`` or ``{dataset_id}``, checked before the route runs.
JobId = Annotated[str, Depends(_job_id)]
DatasetId = Annotated[str, Depends(_dataset_id)]


def job_or_404(store: Store, job_id: str) -> JobRecord:
    """The job's record, or 404 naming the id."""
    job = store.get_job(checked_id("job", job_id))
    if job is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return job


def dataset_or_404(store: Store, dataset_id: str) -> DatasetRecord:
    """The dataset's record, or 404 naming the id."""
    dataset = store.get_dataset(checked_id("dataset", dataset_id))
    if dataset is None:
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    return dataset
