"""Prometheus metrics: requests and latency by route, jobs by status, detect batch sizes and pending detections.

Each app gets its own ``CollectorRegistry``, so several apps in one process (tests) do not
collide. Jobs by status are read from Redis when /metrics is scraped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.store import REDIS_ERRORS

log = logging.getLogger(__name__)

# Anything else a client sends is counted as "other": the label takes no unbounded client input.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JobsByStatus:
    """A custom collector: ``ssd_jobs{status=...}``, counted in Redis at scrape time."""

    def __init__(self, count: Callable[[], dict[str, int]]):
        self._count = count

    def collect(self):
        family = GaugeMetricFamily("ssd_jobs", "Training jobs by status.", labels=["status"])
        try:
            counts = self._count()
        except REDIS_ERRORS as error:  # Redis away: report nothing rather than fail the scrape
            log.warning("could not count jobs for /metrics: %s", error)
            return
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


class Metrics:
    def __init__(self, count_jobs: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ssd_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ssd_http_request_duration_seconds",
            "Time to the response's first byte, by method and route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.detect_batch_size = Histogram(
            "ssd_detect_batch_size",
            "Images per batched forward pass of /detect.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.detect_pending = Gauge(
            "ssd_detect_pending",
            "/detect requests admitted and not yet answered (decoding, waiting or running).",
            registry=self.registry,
        )
        self.registry.register(JobsByStatus(count_jobs))


class MetricsMiddleware:
    """Counts requests and times them to the first response byte (an SSE stream counts once)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        started = False

        async def send_and_count(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._observe(scope, message["status"], start)
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception:
            if not started:  # the error handler never answered: count the failure here
                self._observe(scope, 500, start)
            raise

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        if method not in STANDARD_METHODS:
            method = "other"
        self.metrics.requests.labels(method, template, str(status)).inc()
        self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
