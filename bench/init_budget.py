"""scratch, imagenet and coco side by side at an equal time budget, on real photographs: validation mAP@0.5
per minute of training for each.

Needs torchvision's weight files: in ``--weights-dir`` already (``ssd-service weights fetch`` or
``import`` put them there), or downloaded into it on first use where this host reaches
download.pytorch.org (``--no-download`` forbids it; a start that cannot have its weights fails).
The dataset and its splits are ``photos_finetune.py``'s: each init trains on split A (validating
on a quarter of it) for ``--minutes`` of wall time, then its best checkpoint is scored on the
test split. Writes ``results.json`` and ``curves.png`` to ``--out``. Usage:

    python bench/init_budget.py /path/to/raccoon_dataset --weights-dir data/weights --minutes 30 --out runs/budget
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from photos_finetune import add_dataset_arguments, load_splits, plot, score_on  # a script's folder is on sys.path

from core.weights import WeightsFolder
from model.config import TrainConfig
from model.training import Callbacks, fit


def map_at_minutes(records: list[dict], minutes: int) -> list[float | None]:
    """The newest validation mAP@0.5 at the end of each whole minute (None before the first epoch ends)."""
    shown = []
    for minute in range(1, minutes + 1):
        done = [r["val_map50"] for r in records if r["minutes"] <= minute]
        shown.append(done[-1] if done else None)
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--weights-dir", type=Path, required=True)
    parser.add_argument("--no-download", action="store_true", help="use only the files already in --weights-dir")
    parser.add_argument("--inits", default="scratch,imagenet,coco")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time of each run's training")
    parser.add_argument("--epochs", type=int, default=1000, help="more than the budget allows: time ends each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    parts = load_splits(args)
    weights = WeightsFolder(args.weights_dir, download=not args.no_download)
    runs = []
    for init in args.inits.split(","):
        config = TrainConfig(
            init=init,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            val_fraction=args.val_fraction,
            num_workers=args.num_workers,
            seed=args.seed,
        )
        started, records = time.perf_counter(), []

        def on_epoch(record: dict, started=started, records=records, init=init) -> None:
            minutes = (time.perf_counter() - started) / 60
            records.append({**record, "minutes": round(minutes, 3)})
            print(
                json.dumps(
                    {
                        "init": init,
                        "epoch": record["epoch"],
                        "val_map50": record["val_map50"],
                        "minutes": round(minutes, 2),
                    }
                ),
                flush=True,
            )

        def out_of_time(started=started) -> bool:
            return time.perf_counter() - started > args.minutes * 60

        callbacks = Callbacks(on_epoch=on_epoch, should_stop=out_of_time)
        result = fit(config, parts["A"], args.out / init, callbacks, weights)
        run = {
            "run": init,
            "images": len(parts["A"].images),
            "init": result.init.to_dict(),
            "epochs": records,
            "best_val_map50": max((r["val_map50"] or 0.0) for r in records) if records else None,
            "val_map50_per_minute": map_at_minutes(records, int(args.minutes)),
            "config": config.to_dict(),
        }
        if result.best_checkpoint is not None:
            run["test"] = score_on(parts["test"], str(result.best_checkpoint))
        runs.append(run)
    title = f"scratch, imagenet and coco, {args.minutes:g} minutes each"
    (args.out / "curves.png").write_bytes(plot([r for r in runs if r["epochs"]], title))
    results = {"dataset": str(args.dataset), "minutes": args.minutes, "torch": torch.__version__, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("minute  " + "  ".join(f"{r['run']:>9}" for r in runs))
    for minute in range(int(args.minutes)):
        row = [r["val_map50_per_minute"][minute] for r in runs]
        print(f"{minute + 1:>6}  " + "  ".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in row))


if __name__ == "__main__":
    main()
