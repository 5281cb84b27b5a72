"""Admission of dataset imports: they run on a thread pool of their own (``ImportSlots``), not the one
that serves the other routes, and a request that finds every slot busy is turned away before its body
is read (``ImportAdmission``): an upload never fills the disk only to be refused. The import itself is
``core.dataset_import``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

IMPORT_ROUTES = {("POST", "/datasets"), ("POST", "/datasets/synthetic")}

T = TypeVar("T")


class ImportsBusy(RuntimeError):
    """Every import slot is taken: the client should try again later (503 with Retry-After)."""


class ImportPermit:
    """A reserved import slot, freed once (``release``) by whoever holds it last."""

    def __init__(self, free: threading.BoundedSemaphore):
        self._free = free
        self._released = False
        self._lock = threading.Lock()
        self.handed_over = False  # to an import's thread, which frees it when done

    def release(self) -> None:
        with self._lock:
            if not self._released:
                self._released = True
                self._free.release()


class ImportSlots:
    """Dataset imports on a bounded thread pool of their own: ``slots`` at once, more are refused.

    A slot is reserved before the request's body is read (``reserve``) and freed when its
    import's thread is done, not when the request that started it goes away, so the count
    never runs ahead of the threads.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="ssd-import")

    def reserve(self) -> ImportPermit:
        """A free slot, or ImportsBusy."""
        if not self._free.acquire(blocking=False):
            raise ImportsBusy(f"{self.slots} dataset imports are running (the limit): try again in a minute")
        return ImportPermit(self._free)

    async def run(self, permit: ImportPermit, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the import pool, in the slot ``permit`` reserved (freed when it is done)."""
        permit.handed_over = True
        future = self.executor.submit(function, *args)
        future.add_done_callback(lambda _: permit.release())
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ImportAdmission:
    """Reserves an import slot for ``IMPORT_ROUTES`` before anything of the request is read: 503 with
    Retry-After when every slot is busy. The route finds the permit in ``request.state.import_permit``;
    a permit the route did not hand to an import is freed when the request ends."""

    def __init__(self, app: ASGIApp, slots: ImportSlots):
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) not in IMPORT_ROUTES:
            await self.app(scope, receive, send)
            return
        try:
            permit = self.slots.reserve()
        except ImportsBusy as error:
            body = json.dumps({"detail": str(error)}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"30"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["import_permit"] = permit
        try:
            await self.app(scope, receive, send)
        finally:
            if not permit.handed_over:
                permit.release()
