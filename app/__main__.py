"""``python -m app``: serve the API with uvicorn on ``SSD_HOST``:``SSD_PORT`` (Compose's api command)."""

from __future__ import annotations

import copy
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from core.settings import Settings

# The service's own loggers, beside uvicorn's and in its format: what the API says at start-up (its CPU
# threads, where datasets and runs are kept, what an interrupted write left and was removed) is at INFO.
SERVICE_LOGGERS = ("app", "core", "model")


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    for name in SERVICE_LOGGERS:
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def main() -> None:
    settings = Settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        proxy_headers=True,
        log_level="info",
        log_config=log_config(),
    )


if __name__ == "__main__":
    main()
