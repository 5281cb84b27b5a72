"""``ssd-service``: ``up`` (everything, no Docker), ``api`` (the HTTP server), ``worker`` (a training worker),
``workers`` (one per GPU).

All three read their settings from ``SSD_*`` environment variables (see ``worker.settings``).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssd-service", description="Train and serve SSD object detectors.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start Redis (unless SSD_REDIS_URL answers), a worker and the API; Ctrl-C stops all")
    commands.add_parser("api", help="serve the HTTP API on SSD_HOST:SSD_PORT")
    commands.add_parser("worker", help="run a Celery training worker (one job at a time)")
    commands.add_parser("workers", help="run a training worker per GPU (SSD_GPUS), or one CPU worker")
    commands.add_parser("settings", help="print every SSD_* setting with its default, as a Markdown table")
    command = parser.parse_args(argv).command
    if command == "up":
        from app.up import main as run
    elif command == "api":
        from app.__main__ import main as run
    elif command == "worker":
        from worker.__main__ import main as run
    elif command == "workers":
        from worker.pool import main as run
    else:
        from worker.settings import settings_table

        print(settings_table())
        return
    run()


if __name__ == "__main__":
    main()
