"""Builds the FastAPI app: ``uvicorn app.main:app`` (settings from ``SSD_*``) or ``create_app(settings)``."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from functools import partial

import redis
import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio.retry import Retry as AsyncRetry
from starlette.concurrency import run_in_threadpool

from app import openapi
from app.event_streams import EventStreams
from app.inference import DetectionService, detects_on_gpu, load_detector
from app.limits import BodyLimitMiddleware
from app.prometheus import Metrics, MetricsMiddleware
from app.routers import datasets, detect, evaluation, exports, jobs, ops, web, weights
from app.security import (
    KeysBeforeBodies,
    LocalOnlyMiddleware,
    key_check,
    mask_keys_in_access_log,
    require_api_key,
    require_api_key_or_query,
)
from app.uploads import ImportAdmission, ImportSlots
from core.cpu_threads import DetectingSignal, api_threads, threads_line, use_threads
from core.dispatch import make_celery
from core.leftovers import start_sweep
from core.s3 import BucketError
from core.settings import Settings
from core.storage import StorageUnavailable
from core.store import POOL_WAIT_SECONDS, Store, quick_retry

log = logging.getLogger(__name__)

# The API's Redis connections are capped, so that no flood of requests can take the Redis
# server's connections from the workers (whose lease renewals must get through). Routes that
# use the synchronous store run on Starlette's thread pool (40 threads), so 48 never waits
# for long; the event streams' asynchronous client gets one connection per allowed stream.
SYNC_REDIS_CONNECTIONS = 48
ASYNC_REDIS_SPARE_CONNECTIONS = 8  # for a stream route's lookups beside the streams themselves

DESCRIPTION = """
Train SSD300 object detectors on your own labelled images and serve them.

1. `POST /datasets` (a COCO, VOC or YOLO zip) or `POST /datasets/synthetic`
2. `POST /train` with the dataset id -> a job; watch `GET /jobs/{id}` and `GET /jobs/{id}/losses/stream`
   (`init` says where its weights start: COCO-trained by default where `GET /weights` has them)
3. `POST /detect` with an image -> boxes (`?format=png` for the image with boxes drawn); `POST /detect/batch`
   with several; `?model=coco` for the COCO-trained SSD300 before any training

Errors are `{"detail": "..."}`. Boxes are `[x1, y1, x2, y2]` in the image's pixels.
When the server has API keys (`SSD_API_KEY`), send one in the `X-API-Key` header
(the **Authorize** button here); `/healthz` needs none.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API with its own Redis clients, Celery client, detector cache and metrics registry."""
    settings = settings or Settings()
    mask_keys_in_access_log()
    store = Store.from_url(settings.redis_url, settings.key_prefix, max_connections=SYNC_REDIS_CONNECTIONS)
    metrics = Metrics(store.status_counts)
    on_gpu = detects_on_gpu(settings.device)
    # Detecting on CPU cores a worker shares: tell it, so it leaves the API its SSD_API_CPU_CORES meanwhile.
    detecting = DetectingSignal(store.mark_api_detecting) if settings.api_cpu_cores and not on_gpu else None
    detection = DetectionService(
        load=partial(load_detector, device=settings.device, cpu_precision=settings.cpu_precision),
        cache_size=settings.detector_cache_size,
        threads=settings.inference_threads,
        max_batch=settings.detect_batch_size_for(on_gpu),
        max_wait_ms=settings.detect_batch_wait_ms,
        max_pending=settings.pending_detections(on_gpu),
        image_threads=settings.detect_image_threads(on_gpu),
        on_batch=metrics.detect_batch_size.observe,
        on_pending=metrics.detect_pending.set,
        on_forward=detecting.detected if detecting is not None else None,
    )

    imports = ImportSlots(settings.import_slots)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        use_threads(api_threads(settings))
        log.info("%s", threads_line(settings))
        if detecting is not None:
            detecting.start()
        settings.datasets_dir.mkdir(parents=True, exist_ok=True)
        # This process's owner lock first: from then on, nothing it writes looks abandoned.
        await run_in_threadpool(start_sweep, settings.layout, store, settings.storage)
        await run_in_threadpool(_check_storage, settings)
        # Everything imported so far (torch's objects included) lives as long as the process: out of
        # the collector's sight, a full collection no longer walks them (a 200 ms pause otherwise).
        gc.freeze()
        yield
        detection.close()
        if detecting is not None:
            detecting.stop()
        imports.close()
        await app.state.async_redis.aclose()
        store.redis.close()

    app = FastAPI(
        title="SSD detector service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.settings = settings
    app.state.store = store
    async_pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.max_event_streams + ASYNC_REDIS_SPARE_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=30,  # above the SSE route's 1 s XREAD BLOCK
        retry=quick_retry(AsyncRetry),
    )
    app.state.async_redis = redis.asyncio.Redis(connection_pool=async_pool)
    app.state.event_streams = EventStreams(settings.max_event_streams)
    app.state.celery = make_celery(settings)
    app.state.metrics = metrics
    app.state.detection = detection
    app.state.imports = imports

    routers = (
        datasets.router,
        jobs.router,
        exports.router,
        detect.router,
        evaluation.router,
        ops.router,
        weights.router,
    )
    for router in routers:
        app.include_router(router, **key_check(settings, require_api_key))
    app.include_router(jobs.stream_router, **key_check(settings, require_api_key_or_query))
    app.include_router(ops.health_router)
    app.include_router(web.router)
    web.mount_static(app)
    app.add_middleware(
        BodyLimitMiddleware,
        limits={
            ("POST", "/datasets"): settings.max_upload_bytes,
            ("POST", "/detect"): settings.max_image_bytes,
            ("POST", "/detect/batch"): settings.max_batch_request_bytes,
        },
        default=settings.max_body_bytes,
    )
    app.add_middleware(ImportAdmission, slots=imports)
    if settings.api_keys:  # the key protects every route whatever the Host or the sending page
        app.add_middleware(
            KeysBeforeBodies,
            keys=settings.api_keys,
            open_routes=[*ops.health_router.routes, *web.router.routes],
            open_paths=(app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url),
            open_prefixes=(f"{web.STATIC_PATH}/",),
            query_key_routes=jobs.stream_router.routes,
        )
    else:
        app.add_middleware(LocalOnlyMiddleware, allowed_hosts=settings.allowed_hosts.split(","))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: refusals are counted too

    @app.exception_handler(BucketError)
    async def storage_unavailable(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"the storage is unreachable: {error}"}, status_code=503)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_unavailable(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"the job store (Redis) is unreachable: {error}"}, status_code=503)

    openapi.install(app, batch_images=detect.batch_image_limit(settings, detection))
    return app


def _check_storage(settings: Settings) -> None:
    """Say at start-up, in the log, when the storage cannot be used: /readyz says so until it can."""
    try:
        settings.storage.check(thorough=True)
    except StorageUnavailable as error:
        log.error("%s; /readyz answers 503 until it can be reached", error)
    else:
        log.info("datasets and runs are kept in %s", settings.storage)


def __getattr__(name: str) -> FastAPI:
    """``app.main:app`` for uvicorn, built on first access so importing this module reads no settings."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
