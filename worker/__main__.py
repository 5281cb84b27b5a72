"""``python -m worker``: a Celery training worker with the service's flags (what ``ssd-service worker`` runs).

Equivalent to Compose's worker command, with a node name unique per process so that
several workers on one machine (one per GPU) do not clash.
"""

from __future__ import annotations

import os
import sys

from core.settings import Settings


def celery_worker_args(settings: Settings, name: str) -> list[str]:
    """The argv of a worker: one task at a time (solo pool, prefetch 1) from the training queue."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--queues",
        settings.queue,
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def main() -> None:
    args = celery_worker_args(Settings(), f"ssd-worker-{os.getpid()}")
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
