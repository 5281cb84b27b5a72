"""Mixed precision against float32 with trained models: convergence, detections and mAP on held-out images.

On ``--device`` (default: the CPU; bf16 there where it computes it natively, bf16 or fp16 on CUDA):

1. Trains the synthetic shapes set twice with ``fit``, the same seed, split, epochs and width: once in the
   device's mixed precision, once with ``amp=False`` (float32).
   Records both validation mAP@0.5 curves and the final gap.
2. For each of the two trained models, on ``--held-out`` new images (another seed): every float32
   detection above 0.3 must have a mixed-precision counterpart of the same class with IoU >= 0.9 and a score
   within 0.03 (its detections down to 0.2 are candidates), and mAP@0.5 and mAP@0.5:0.95 from
   ``evaluate_detector`` may move by at most 0.01 between the two precisions. Each float32 detection
   without such a partner is explained (``model.agreement``): whether the mixed-precision network's boxes
   before NMS hold a partner for it, which kept detection suppressed that partner, and whether that was
   NMS swapping a near tie.

Usage: python bench/precision_agreement.py [--images 300] [--held-out 100] [--epochs 12] [--width 0.5]
       [--batch-size 16] [--device cpu|cuda] [--workers 2] [--trained-in amp fp32] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from model.agreement import explain_miss, partners
from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.detector import Detector, load_model
from model.metrics import evaluate_detector
from model.training import Callbacks, fit


def train(data, config: TrainConfig, folder: Path) -> dict:
    started = time.perf_counter()
    curve: list[dict] = []

    def on_epoch(record: dict) -> None:
        curve.append({"epoch": record["epoch"], "minutes": (time.perf_counter() - started) / 60, **_map(record)})
        print(f"  {'amp' if config.amp else 'fp32'} epoch {record['epoch']}: {curve[-1]}", flush=True)

    result = fit(config, data, folder, Callbacks(on_epoch=on_epoch))
    return {"precision": result.precision, "curve": curve, "checkpoint": str(result.last_checkpoint)}


def _map(record: dict) -> dict:
    return {"val_map50": record["val_map50"], "val_map": record["val_map"], "train_loss": record["train_loss"]}


def agreement(checkpoint: str, held_out, device: str) -> dict:
    """The detection rule and the mAP shift between float32 and mixed-precision inference of one trained model."""
    network, classes = load_model(checkpoint)
    fp32, bf16 = Detector(network, classes, device, amp=False), Detector(network, classes, device)
    no_nms = Detector(network, classes, device, nms_threshold=1.0)  # bf16's boxes before suppression
    images = [Image.open(record.path) for record in held_out.images]
    compared, unpartnered, worst_iou, largest_score_gap, misses = 0, [], 1.0, 0.0, []
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        kept_and_raw = zip(bf16.predict(chunk, 0.2), no_nms.predict(chunk, 0.2, max_detections=10_000), strict=True)
        for index, (ref, (got, raw)) in enumerate(zip(fp32.predict(chunk, 0.3), kept_and_raw, strict=True)):
            if not len(ref["scores"]):
                continue
            partnered, best_iou, gap = partners(ref, got)
            unpartnered += ref["scores"][~partnered].tolist()
            worst_iou = min(worst_iou, float(best_iou.min()))
            largest_score_gap = max(largest_score_gap, float(gap.max()))
            compared += len(ref["scores"])
            for k in (~partnered).nonzero()[:, 0].tolist():
                miss = explain_miss(ref, k, got, raw, bf16.nms_threshold)
                image = held_out.images[start + index].path.name
                misses.append({"image": image, **dataclasses.asdict(miss), "near_tie": miss.near_tie})
    maps = {
        name: evaluate_detector(detector, held_out.images, 16, None, held_out.classes)
        for name, detector in (("fp32", fp32), (bf16.precision, bf16))
    }
    (a, b) = maps.values()
    return {
        "inference_precisions": list(maps),
        "fp32_detections_above_0.3": compared,
        "without_bf16_partner": len(unpartnered),
        "misses_not_near_ties": sum(not miss["near_tie"] for miss in misses),
        "misses": misses,
        "worst_best_iou": worst_iou,
        "largest_score_gap_to_best_match": largest_score_gap,
        "map50": {k: v["map50"] for k, v in maps.items()},
        "map": {k: v["map"] for k, v in maps.items()},
        "map50_shift": abs(a["map50"] - b["map50"]),
        "map_shift": abs(a["map"] - b["map"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=TrainConfig.num_workers, help="data-loading processes")
    parser.add_argument("--trained-in", nargs="+", choices=["amp", "fp32"], default=["amp", "fp32"])
    parser.add_argument(
        "--keep", type=Path, help="keep the datasets and run folders here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    summary: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    summary["torch"] = torch.__version__

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        data = make_shapes_dataset(folder / "train", args.images, seed=0)
        held_out = make_shapes_dataset(folder / "held-out", args.held_out, seed=1)
        common = {"epochs": args.epochs, "width_multiplier": args.width, "batch_size": args.batch_size}
        common |= {"device": args.device, "num_workers": args.workers}
        runs = {}
        for amp in (choice == "amp" for choice in args.trained_in):
            run = train(data, TrainConfig(amp=amp, **common), folder / f"amp-{amp}")
            runs[run["precision"]] = run
            summary["runs"] = runs
            save()
        last = {name: run["curve"][-1]["val_map50"] for name, run in runs.items()}
        summary["final_val_map50"] = last
        summary["final_val_map50_gap"] = abs(max(last.values()) - min(last.values()))
        summary["agreement"] = {name: agreement(run["checkpoint"], held_out, args.device) for name, run in runs.items()}
        save()
        print(json.dumps({k: summary[k] for k in ("final_val_map50", "final_val_map50_gap", "agreement")}, indent=2))


if __name__ == "__main__":
    main()
