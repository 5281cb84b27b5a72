"""Operations: liveness, readiness (Redis and the workers seen), Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import MetricsDep, SettingsDep, StoreDep
from app.schemas import Health, Ready
from core.storage import StorageUnavailable
from core.store import REDIS_ERRORS

router = APIRouter(tags=["operations"])
health_router = APIRouter(tags=["operations"])  # open even with API keys on: for load balancers


@health_router.get("/healthz", response_model=Health)
def check_health() -> dict:
    """The process is up (it checks nothing else)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "Redis or the storage (a bucket) is unreachable."}},
)
def check_readiness(store: StoreDep, settings: SettingsDep):
    """Ready when Redis and the storage answer; lists the training workers whose heartbeat was seen lately."""
    body: dict = {"status": "ready", "redis": "ok", "storage": "ok", "workers": []}
    try:
        store.ping()
        body["workers"] = store.workers_seen(within_seconds=3 * settings.worker_heartbeat_seconds)
    except REDIS_ERRORS as error:
        body.update(status="unavailable", redis=f"unreachable: {error}")
    try:
        settings.storage.check()
    except StorageUnavailable as error:
        body.update(status="unavailable", storage=str(error))
    return body if body["status"] == "ready" else JSONResponse(body, status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def get_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency by route, jobs by status, detect batch sizes."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
