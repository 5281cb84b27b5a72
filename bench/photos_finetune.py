"""Training on from an earlier job, on real photographs: from scratch, then ``init: "job:<that run>"`` on the
same images and on a second, unseen split.

The dataset is a folder of real photographs with boxes: one the project's readers take (COCO, VOC,
YOLO; BCCD_Dataset/BCCD of github.com/Shenggan/BCCD_Dataset is a VOC folder), or ``annotations/*.xml`` +
``images/`` (Pascal VOC files in the layout of github.com/datitran/raccoon_dataset). Its images are
shuffled by ``--seed`` and split three ways: a test split, split A and split B. Three runs, each
validating on a part of its own split:

1. scratch: random weights, split A, ``--epochs``;
2. job on A: starts from run 1's best checkpoint, the same images, ``--fine-tune-epochs``;
3. job on B: starts from run 1's best checkpoint, images run 1 never saw.

Then each run's best checkpoint is scored on the test split. Writes ``results.json`` (every epoch
record, the test mAPs, the settings) and ``curves.png`` (validation mAP@0.5 per epoch and per
minute of training, the three runs in one plot) to ``--out``. Usage (CPU, lowest priority):

    nice -n 19 python bench/photos_finetune.py /path/to/BCCD_Dataset/BCCD --out bench/results/<date>-cpu-bccd
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from model.config import TrainConfig
from model.data import DetectionData, read_dataset
from model.detector import Detector
from model.initialisation import LocalWeights
from model.metrics import evaluate_detector
from model.training import Callbacks, fit


def read_photos(folder: Path, work: Path) -> DetectionData:
    """The dataset in ``folder``; ``annotations/`` + ``images/`` is read as VOC through links made in ``work``."""
    if (folder / "annotations").is_dir() and (folder / "images").is_dir() and not (folder / "Annotations").exists():
        view = work / "voc-view"
        view.mkdir(parents=True, exist_ok=True)
        for name, target in (("Annotations", "annotations"), ("JPEGImages", "images")):
            if not (view / name).exists():
                (view / name).symlink_to((folder / target).resolve())
        folder = view
    return read_dataset(folder)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset, its splits and the output folder: the same for the benchmarks on photographs."""
    parser.add_argument("dataset", type=Path, help="a folder of real photographs with boxes (see above)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--max-images", type=int, default=None, help="use only this many images (a quick try)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the split, seeds the runs")


def load_splits(args: argparse.Namespace) -> dict[str, DetectionData]:
    """``args``' dataset split into test, A and B (see ``split``); the split sizes are printed."""
    args.out.mkdir(parents=True, exist_ok=True)
    data = read_photos(args.dataset, args.out)
    if args.max_images:
        data = replace(data, images=data.images[: args.max_images])
    parts = split(data, args.test_fraction, args.seed)
    print(json.dumps({name: len(part.images) for name, part in parts.items()} | {"classes": data.classes}), flush=True)
    return parts


def split(data: DetectionData, test_fraction: float, seed: int) -> dict[str, DetectionData]:
    """Test, A and B: disjoint, shuffled by ``seed``; A and B share what the test split leaves."""
    images = list(data.images)
    random.Random(seed).shuffle(images)
    test_count = round(len(images) * test_fraction)
    rest = images[test_count:]
    half = len(rest) // 2
    parts = {"test": images[:test_count], "A": rest[:half], "B": rest[half:]}
    return {name: replace(data, images=part) for name, part in parts.items()}


def train(name: str, config: TrainConfig, data: DetectionData, out: Path, log: list[dict]) -> dict:
    """One run of ``fit``; its epoch records (with the minutes of training so far) and its best checkpoint."""
    started, records = time.perf_counter(), []

    def on_epoch(record: dict) -> None:
        minutes = (time.perf_counter() - started) / 60
        records.append({**record, "minutes": round(minutes, 3)})
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        print(json.dumps({"run": name, "epoch": record["epoch"], **shown, "minutes": round(minutes, 2)}), flush=True)

    result = fit(config, data, out / name, Callbacks(on_epoch=on_epoch), LocalWeights(out))
    summary = {
        "run": name,
        "images": len(data.images),
        "init": result.init.to_dict(),
        "status": result.status,
        "epochs": records,
        "best_val_map50": max((r["val_map50"] or 0.0) for r in records),
        "train_minutes": round((time.perf_counter() - started) / 60, 2),
        "best_checkpoint": str(result.best_checkpoint),
        "config": config.to_dict(),
    }
    log.append(summary)
    return summary


def score_on(test: DetectionData, checkpoint: str) -> dict:
    detector = Detector.from_checkpoint(checkpoint, device="cpu" if not torch.cuda.is_available() else "auto")
    scores = evaluate_detector(detector, test.images, batch_size=8, dataset_classes=test.classes)
    return {"map50": scores["map50"], "map": scores["map"]}


def plot(runs: list[dict], title: str) -> bytes:
    """Validation mAP@0.5 of each run per epoch and per minute of its own training, in one figure."""
    fig = Figure(figsize=(10, 4.2), dpi=100)
    by_epoch, by_minute = fig.subplots(1, 2)
    for run in runs:
        label = f"{run['run']} ({run['images']} images)"
        epochs = [r["epoch"] for r in run["epochs"]]
        maps = [r["val_map50"] for r in run["epochs"]]
        by_epoch.plot(epochs, maps, "o-", label=label, markersize=3)
        by_minute.plot([r["minutes"] for r in run["epochs"]], maps, "o-", label=label, markersize=3)
    for axis, xlabel in ((by_epoch, "epoch"), (by_minute, "minutes of training (CPU)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation mAP@0.5")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    by_epoch.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the run from scratch")
    parser.add_argument("--fine-tune-epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--fine-tune-learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    parts = load_splits(args)

    common = TrainConfig(
        batch_size=args.batch_size,
        width_multiplier=args.width_multiplier,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    runs: list[dict] = []
    scratch_config = replace(common, init="scratch", epochs=args.epochs, learning_rate=args.learning_rate)
    scratch = train("scratch", scratch_config, parts["A"], args.out, runs)
    fine_tune = replace(
        common,
        init=f"job:{args.out / 'scratch'}",
        epochs=args.fine_tune_epochs,
        learning_rate=args.fine_tune_learning_rate,
    )
    train("job-on-A", fine_tune, parts["A"], args.out, runs)
    train("job-on-B", fine_tune, parts["B"], args.out, runs)

    for run in runs:
        run["test"] = score_on(parts["test"], run["best_checkpoint"])
        first = run["epochs"][0]["val_map50"] or 0.0
        run["first_epoch_vs_scratch_best"] = (
            round(first / scratch["best_val_map50"], 3) if scratch["best_val_map50"] else None
        )
    (args.out / "curves.png").write_bytes(plot(runs, "From scratch, then starting from that job (init job:<id>)"))
    results = {
        "dataset": str(args.dataset),
        "splits": {name: len(part.images) for name, part in parts.items()},
        "classes": parts["test"].classes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for run in runs:
        print(
            json.dumps(
                {
                    "run": run["run"],
                    "first_epoch_val_map50": run["epochs"][0]["val_map50"],
                    "best_val_map50": run["best_val_map50"],
                    "first_epoch_vs_scratch_best": run["first_epoch_vs_scratch_best"],
                    "test_map50": run["test"]["map50"],
                    "train_minutes": run["train_minutes"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
