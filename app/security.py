"""Access: API keys when ``SSD_API_KEY`` is set, else requests from this machine only.

With keys, every route but /healthz needs one (401 otherwise), checked from the headers before
anything reads the request's body (``KeysBeforeBodies``).

The key travels in the ``X-API-Key`` header; only the Server-Sent Events route also takes
``?api_key=``, because a browser's ``EventSource`` cannot send headers. Keys are compared in
constant time, each of them, so the answer's timing says nothing about how close a guess
was or which key it matched. The web page (``/``, ``/static``) and the OpenAPI docs are no
data and stay open: the page asks for the key itself. A key given in the query is masked in
uvicorn's access log, which would otherwise record it with the path.

Without keys the API is for the local machine, and ``LocalOnlyMiddleware`` keeps the web
pages that machine's browser opens from using it (see there).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Security
from fastapi.security import APIKeyHeader, APIKeyQuery
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import SettingsDep
from core.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of the keys in SSD_API_KEY.")
api_key_query = APIKeyQuery(
    name="api_key", auto_error=False, description="Only for the event stream: browsers cannot set its headers."
)


# The name as sent may percent-encode its underscore: the server decodes it to api_key.
_KEY_IN_QUERY = re.compile(r"([?&]api(?:_|%5[Ff])key=)[^&\s]*")


class MaskQueryKeys(logging.Filter):
    """Replaces the value of ``api_key=`` in a log record's string arguments with ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_KEY_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def mask_keys_in_access_log() -> None:
    """Install ``MaskQueryKeys`` on uvicorn's access logger (once per process)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, MaskQueryKeys) for f in logger.filters):
        logger.addFilter(MaskQueryKeys())


def check_api_key(keys: tuple[bytes, ...], presented: str | None) -> None:
    """Raises 401 unless ``presented`` is one of ``keys`` (no keys: authentication is off)."""
    if not keys:
        return
    if not presented:
        raise HTTPException(
            401, "this server needs an API key: send it in the X-API-Key header", {"WWW-Authenticate": "ApiKey"}
        )
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise HTTPException(401, "the API key is not valid", {"WWW-Authenticate": "ApiKey"})


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]) -> None:
    check_api_key(settings.api_keys, key)


async def require_api_key_or_query(
    settings: SettingsDep,
    header: Annotated[str | None, Security(api_key_header)],
    query: Annotated[str | None, Security(api_key_query)],
) -> None:
    check_api_key(settings.api_keys, header or query)


class KeysBeforeBodies:
    """With API keys: a request that needs one gets its 401 before anything reads its body or takes a
    place for it (an import slot, a detection).

    FastAPI reads a request's body before it runs the route's dependencies, so the check the routers
    declare (``key_check``, which puts the key in the OpenAPI document) would answer a keyless upload
    only once it had streamed to disk, holding an import slot all along. This middleware, outside
    every other one but the metrics, checks the key from the headers alone: on every request but
    those for ``open_routes`` (matched as the router matches them), ``open_paths`` and paths under
    ``open_prefixes``; ``query_key_routes`` also take the key as ``?api_key=``.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[bytes, ...],
        open_routes: Iterable[BaseRoute],
        open_paths: Iterable[str | None],
        open_prefixes: tuple[str, ...],
        query_key_routes: Iterable[BaseRoute],
    ):
        self.app = app
        self.keys = keys
        self.open_routes = list(open_routes)
        self.open_paths = frozenset(path for path in open_paths if path)
        self.open_prefixes = open_prefixes
        self.query_key_routes = list(query_key_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._open(scope):
            presented = Headers(scope=scope).get("x-api-key")
            if not presented and _matches(self.query_key_routes, scope):
                presented = QueryParams(scope["query_string"]).get("api_key")
            try:
                check_api_key(self.keys, presented)
            except HTTPException as refused:
                answer = JSONResponse({"detail": refused.detail}, refused.status_code, refused.headers)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self.open_paths or path.startswith(self.open_prefixes) or _matches(self.open_routes, scope)


def _matches(routes: list[BaseRoute], scope: Scope) -> bool:
    """Whether one of ``routes`` answers the request (its path, whatever the method)."""
    return any(route.matches(scope)[0] is not Match.NONE for route in routes)


def key_check(settings: Settings, check: Callable[..., Awaitable[None]]) -> dict[str, Any]:
    """``include_router`` arguments that put ``check`` on a router's routes when keys are set, else none.

    Without keys no route depends on a Security scheme, so the OpenAPI document declares no key
    that the server would ignore (generated clients would ask for one, scanners see a key not checked).
    """
    if not settings.api_keys:
        return {}
    return {"dependencies": [Depends(check)], "responses": {401: {"description": "No API key, or a wrong one."}}}


# A Host header: a name or a bracketed IPv6 address, maybe a port.
_AUTHORITY = re.compile(r"(?P<host>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site of what the user did (none: typed the address) or of this server's own page.
_OWN_SITE = frozenset({"same-origin", "none"})
_REMEDY = (
    "open the API by one of those names, add the name to SSD_ALLOWED_HOSTS, "
    "or set SSD_API_KEY (then the key protects it and any name is answered)"
)


class LocalOnlyMiddleware:
    """Without API keys: answers only requests for this machine's names, and refuses cross-site writes.

    Any web page the user opens may post a form to ``127.0.0.1:8000`` (no CORS preflight needed)
    or point a name of its own at 127.0.0.1 and then read the answers as its own (DNS rebinding).
    Rebinding shows in the Host header, which names the page's host; a cross-site post shows in
    the ``Sec-Fetch-Site`` and ``Origin`` headers that browsers add. Other clients (curl,
    scripts) send neither of those, and pass. /healthz stays open to probes by any name: it
    tells nothing. A host not in the list gets 403, not 400 as for a Host header that names no
    host: the request is well formed, this server refuses it to that sender, and the remedy is
    in its settings (the message names them), not in the request's syntax.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed_hosts = tuple(dict.fromkeys(host.strip().lower() for host in allowed_hosts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/healthz":
            refusal = self._refusal(Headers(scope=scope), scope["method"])
            if refusal is not None:
                status, detail = refusal
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers, method: str) -> tuple[int, str] | None:
        """The status and message that refuse a request with these headers, or None to let it in."""
        host = headers.get("host", "").lower()
        match = _AUTHORITY.fullmatch(host)
        if match is None:
            return 400, f"the Host header {host!r} names no host"
        if match["host"] not in self.allowed_hosts:
            return 403, (
                "without API keys this server answers only for the hosts in SSD_ALLOWED_HOSTS "
                f"({', '.join(self.allowed_hosts)}), and this request is for {host!r}: {_REMEDY}"
            )
        if method in _UNSAFE_METHODS:
            return self._cross_site_refusal(headers, host, method)
        return None

    @staticmethod
    def _cross_site_refusal(headers: Headers, host: str, method: str) -> tuple[int, str] | None:
        site = headers.get("sec-fetch-site", "same-origin").lower()  # absent: not a browser, or an old one
        origin = headers.get("origin")
        # A page's Origin is scheme://host[:port] as its address bar shows it, the same as Host if it is ours.
        if site in _OWN_SITE and (origin is None or origin.lower().partition("://")[2] == host):
            return None
        sender = f"the web page at {origin!r}" if origin else f"another web page (Sec-Fetch-Site: {site})"
        return 403, (
            f"without API keys this server refuses {method} requests from {sender}: any page the browser "
            f"opens could send them. Use the page this server serves at http://{host}/, or a client that is "
            "not a browser (curl, scripts)"
        )
