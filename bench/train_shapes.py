"""Sanity bar: train from scratch on synthetic shapes and report mAP on unseen images, with wall time.

Generates a training set and a separate test set (different seeds), runs ``fit`` and then
``evaluate_detector`` on the test set. Usage:

    python bench/train_shapes.py --train-images 2000 --epochs 20 --batch-size 32 --out runs/shapes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.detector import Detector
from model.metrics import evaluate_detector
from model.training import Callbacks, fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--backbone", default="vgg16_bn")
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--max-seconds", type=float, default=None, help="stop training after this long")
    args = parser.parse_args()

    started = time.perf_counter()
    train = make_shapes_dataset(args.out / "train-data", args.train_images, seed=1)
    test = make_shapes_dataset(args.out / "test-data", args.test_images, seed=2)
    print(f"generated data in {time.perf_counter() - started:.1f}s", flush=True)

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_fraction=0.05,
        backbone=args.backbone,
        width_multiplier=args.width_multiplier,
        num_workers=args.num_workers,
    )
    started = time.perf_counter()

    def on_epoch(record: dict) -> None:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        print(json.dumps({**shown, "elapsed": round(time.perf_counter() - started, 1)}), flush=True)

    def out_of_time() -> bool:
        return args.max_seconds is not None and time.perf_counter() - started > args.max_seconds

    result = fit(config, train, args.out / "run", Callbacks(on_epoch=on_epoch, should_stop=out_of_time))
    train_seconds = time.perf_counter() - started
    detector = Detector.from_checkpoint(result.last_checkpoint)
    scores = evaluate_detector(detector, test.images, batch_size=64)
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "train_images": args.train_images,
        "epochs": result.epochs_completed,
        "status": result.status,
        "train_seconds": round(train_seconds, 1),
        "test_map50": scores["map50"],
        "test_map": scores["map"],
        "config": config.to_dict(),
    }
    print(json.dumps(summary), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
