"""Listings in pages: ``limit`` and an opaque ``cursor`` in, the page as a JSON array out, and the
next page named in a ``Link: <...>; rel="next"`` header (RFC 8288), absent on the last page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Query, Request, Response
from fastapi.exceptions import RequestValidationError

from core.store import CURSOR_PATTERN, Page

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=1000, description="Most items in the page.")]
Cursor = Annotated[
    str | None,
    Query(
        max_length=100,
        pattern=CURSOR_PATTERN,
        description='Where the page starts: the cursor in the previous page\'s `Link: <...>; rel="next"` header.',
    ),
]


def read_page(read: Callable[[], Page[T]]) -> Page[T]:
    """``read()``, with a cursor the store cannot read answered 422 like any bad query parameter."""
    try:
        return read()
    except ValueError as error:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": str(error), "input": None}]
        ) from error


def link_next(request: Request, response: Response, page: Page) -> None:
    """Name the next page in the answer's Link header (a reference relative to this server)."""
    if page.next is not None:
        url = request.url.include_query_params(cursor=page.next)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
