"""``ssd-service``: ``up`` (everything, no Docker), ``api`` (the HTTP server), ``worker`` (a training worker),
``workers`` (one per GPU), ``storage`` (check, or create, where datasets and runs are kept), ``weights``
(list, fetch or import the pretrained weights).

Each reads its settings from ``SSD_*`` environment variables (see ``core.settings``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

# The commands that run one of the service's processes, and the module that process runs as.
PROCESS_MODULES = {"api": "app", "worker": "worker", "workers": "worker.pool"}


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
    weights = commands.add_parser(
        "weights",
        help="list the weights folder (SSD_WEIGHTS_DIR) and what each init would use; fetch or import weights",
        description="Without an action: what the weights folder holds and what each training init would start from.",
    )
    actions = weights.add_subparsers(dest="action")
    fetch = actions.add_parser("fetch", help="download torchvision's weights into the folder (checked by hash)")
    fetch.add_argument("which", nargs="?", choices=["coco", "imagenet", "all"], default="all")
    install = actions.add_parser("import", help="check a weights file copied by hand and install it (offline hosts)")
    install.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    command = args.command
    if command == "storage":
        raise SystemExit(check_storage(args.create_bucket))
    if command == "weights":
        raise SystemExit(manage_weights(args.action, getattr(args, "which", None), getattr(args, "file", None)))
    if command == "up":
        from core.launcher import main as run

        run()
    elif command in PROCESS_MODULES:
        # ``python -m <module>`` in this process: core names the API and the worker, never imports them.
        runpy.run_module(PROCESS_MODULES[command], run_name="__main__")
    else:
        from core.settings import settings_table

        print(settings_table())


def check_storage(create_bucket: bool) -> int:
    """``ssd-service storage``: 0 when the storage can be used (after creating the bucket if asked), else 1."""
    from core.bucket_storage import BucketStorage
    from core.settings import Settings
    from core.storage import StorageUnavailable

    settings = Settings()
    storage = settings.storage
    try:
        if create_bucket and isinstance(storage, BucketStorage) and storage.bucket.create():
            print(f"created {storage}")
        storage.check(thorough=True)
    except (StorageUnavailable, OSError) as error:
        print(f"ssd-service storage: {error}")
        return 1
    print(f"ok: datasets and runs are kept in {storage}")
    return 0


def manage_weights(action: str | None, which: str | None, file: Path | None) -> int:
    """``ssd-service weights [fetch WHICH | import FILE]``: 0 when done, 1 when a fetch or import failed."""
    from core.s3 import BucketError
    from core.settings import Settings
    from core.weights import WeightsFolder, what_inits_use
    from model.initialisation import WeightsUnavailable
    from model.pretrained import PUBLISHED, WeightsError

    folder = WeightsFolder.from_settings(Settings())
    try:
        if action == "fetch":
            if not folder.download:  # Compose's one-shot weights service then does nothing
                print(
                    "skipped: downloads are off (SSD_WEIGHTS_DOWNLOAD=never); `ssd-service weights import FILE` instead"
                )
                return 0
            for weights in (w for w in PUBLISHED if which in ("all", w.kind)):
                folder.fetch(weights, _ProgressLine(weights.file_name))
                print(f"ok: {folder.path(weights)}")
        elif action == "import" and file is not None:  # argparse asks for it
            weights = folder.import_file(file)
            print(f"ok: {file} is {weights.file_name} ({weights.kind}, {weights.backbone}): {folder.path(weights)}")
    except (WeightsUnavailable, WeightsError, BucketError, OSError) as error:
        print(f"ssd-service weights {action}: {error}", file=sys.stderr)
        return 1
    if action is None:
        print(f"{folder} (downloads: {'auto' if folder.download else 'never'})")
        for row in folder.listing():
            size = f"{row['bytes'] / 1e6:.0f} MB" if row["present"] else "missing"
            print(f"  {row['file']:<42} {row['kind']:<9} {row['backbone']:<9} {size}")
        print("init would use:")
        for init, uses in what_inits_use(folder).items():
            print(f"  {init:<9} {uses}")
    return 0


class _ProgressLine:
    """A download's progress on one terminal line."""

    def __init__(self, name: str):
        self.name = name
        self.shown: int | None = -1

    def __call__(self, done: int, total: int | None) -> None:
        percent = int(100 * done / total) if total else None
        if percent != self.shown and sys.stderr.isatty():
            self.shown = percent
            end = "\n" if total and done >= total else ""
            print(f"\r{self.name}: {done / 1e6:.0f} MB" + (f" ({percent}%)" if total else ""), end=end, file=sys.stderr)


if __name__ == "__main__":
    main()
