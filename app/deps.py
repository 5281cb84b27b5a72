"""FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``app.dependency_overrides``."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio
from celery import Celery
from fastapi import Depends, Request

from app.inference import DetectionService
from app.metrics import Metrics
from worker.settings import Settings
from worker.store import Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_async_redis(request: Request) -> redis.asyncio.Redis:
    return request.app.state.async_redis


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_detection(request: Request) -> DetectionService:
    return request.app.state.detection


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
DetectorDep = Annotated[DetectionService, Depends(get_detection)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
