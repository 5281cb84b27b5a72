"""Server-Sent Event streams, counted and capped: each open stream holds a Redis connection.

Past ``SSD_MAX_EVENT_STREAMS`` open streams the stream route answers 503, so slow or idle
listeners can never take every connection the API may open to Redis (its pool is capped
too), nor crowd out the workers' lease renewals on the Redis server.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send


class EventStreams:
    """How many event streams are open; touched only on the event loop, so a plain count."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open_now = 0

    def open(self) -> Callable[[], None]:
        """Count a new stream; the function it returns counts it closed (once, however often called).

        Raises:
            HTTPException: 503 with Retry-After when ``limit`` streams are open.
        """
        if self.open_now >= self.limit:
            raise HTTPException(
                503,
                f"{self.limit} event streams are open (SSD_MAX_EVENT_STREAMS): try again later, or poll "
                "GET /jobs/{id}/losses?after=N instead",
                {"Retry-After": "10"},
            )
        self.open_now += 1
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.open_now -= 1

        return close


class CountedEventSourceResponse(EventSourceResponse):
    """An ``EventSourceResponse`` that calls ``close`` when it is done, however it ends (the client
    went away before the first event included, when the event generator never even starts)."""

    def __init__(self, content, close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()
