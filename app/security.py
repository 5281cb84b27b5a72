"""API keys: with ``SSD_API_KEY`` set, every route but /healthz needs one (401 otherwise).

The key travels in the ``X-API-Key`` header; only the Server-Sent Events route also takes
``?api_key=``, because a browser's ``EventSource`` cannot send headers. Keys are compared in
constant time, each of them, so the answer's timing says nothing about how close a guess
was or which key it matched. The web page (``/``, ``/static``) and the OpenAPI docs are no
data and stay open: the page asks for the key itself. A key given in the query is masked in
uvicorn's access log, which would otherwise record it with the path.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Annotated

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, APIKeyQuery

from app.deps import SettingsDep

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in SSD_API_KEY (when it is set)."
)
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
