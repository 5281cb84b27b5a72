"""The web page at ``/`` and its static files under ``/static`` (HTML, CSS, ES modules; no build step).

The page is a client of the public HTTP API only; nothing here serves data.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)


class _RevalidatedFiles(StaticFiles):
    """Static files the browser revalidates (ETag) before each use, so a new release shows at once."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """Serve ``app/static`` at ``/static``; include ``router`` for the page itself."""
    app.mount(STATIC_PATH, _RevalidatedFiles(directory=STATIC_DIR), name="static")
