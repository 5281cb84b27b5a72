"""Request body limits enforced while the body streams in, before an upload is parsed or spooled."""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_OVERHEAD = 64 * 1024  # form boundaries, headers and small fields around the file


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI passes HTTPExceptions through its body parsing unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Answers 413 to a request whose body exceeds its route's limit.

    ``limits`` maps ``(method, path)`` to the largest upload in bytes, which the body may
    exceed by ``MULTIPART_OVERHEAD``; every other request's body (JSON) may hold ``default``
    bytes. A Content-Length over the limit is refused before the body is read; a body
    without one (chunked) is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, limits: dict[tuple[str, str], int], default: int):
        self.app = app
        self.limits = limits
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self.limits.get((scope.get("method", ""), scope.get("path", "")))
        limit = upload if upload is not None else self.default
        allowed = limit + (MULTIPART_OVERHEAD if upload is not None else 0)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            await _reply_413(send, f"the request body is {int(length)} bytes; the limit is {limit} bytes")
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > allowed:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


async def _reply_413(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
