"""``python -m app``: serve the API with uvicorn on ``SSD_HOST``:``SSD_PORT`` (Compose's api command)."""

from __future__ import annotations

import uvicorn

from core.settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, proxy_headers=True, log_level="info")


if __name__ == "__main__":
    main()
