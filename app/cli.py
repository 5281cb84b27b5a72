"""``ssd-service``: ``up`` (everything, no Docker), ``api`` (the HTTP server), ``worker`` (a training worker),
``workers`` (one per GPU), ``storage`` (check, or create, where datasets and runs are kept).

Each reads its settings from ``SSD_*`` environment variables (see ``worker.settings``).
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
    storage = commands.add_parser("storage", help="check that the data folder or SSD_STORAGE_URL's bucket can be used")
    storage.add_argument("--create-bucket", action="store_true", help="create SSD_STORAGE_URL's bucket if missing")
    args = parser.parse_args(argv)
    command = args.command
    if command == "storage":
        raise SystemExit(check_storage(args.create_bucket))
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


def check_storage(create_bucket: bool) -> int:
    """``ssd-service storage``: 0 when the storage can be used (after creating the bucket if asked), else 1."""
    from worker.settings import Settings
    from worker.storage import StorageUnavailable

    settings = Settings()
    storage = settings.storage
    try:
        if create_bucket and settings.storage_url and storage.bucket.create():
            print(f"created {storage}")
        storage.check(thorough=True)
    except (StorageUnavailable, OSError) as error:
        print(f"ssd-service storage: {error}")
        return 1
    print(f"ok: datasets and runs are kept in {storage}")
    return 0


if __name__ == "__main__":
    main()
