"""Validation's mAP cost by COCO backend: torchmetrics' MeanAveragePrecision over the same detections
with pycocotools and with faster-coco-eval (what ``model.metrics.MeanAP`` uses when installed).

Random boxes stand in for a validation split: ``--images`` images of ``--detections`` detections
(COCO's cap is 100) and 1-4 ground-truth boxes each. Both backends must agree to 1e-6.

Usage: python bench/map_backends.py [--images 500] [--detections 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchmetrics.detection import MeanAveragePrecision


def random_split(images: int, detections: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    generator = torch.Generator().manual_seed(seed)

    def boxes(count: int) -> torch.Tensor:
        corner = torch.rand(count, 2, generator=generator) * 0.7
        return torch.cat([corner, corner + torch.rand(count, 2, generator=generator) * 0.3 + 0.01], dim=1)

    preds, targets = [], []
    for _ in range(images):
        truth = int(torch.randint(1, 5, (), generator=generator))
        targets.append({"boxes": boxes(truth), "labels": torch.randint(1, 4, (truth,), generator=generator)})
        preds.append(
            {
                "boxes": boxes(detections),
                "scores": torch.rand(detections, generator=generator),
                "labels": torch.randint(1, 4, (detections,), generator=generator),
            }
        )
    return preds, targets


def time_backend(backend: str, preds: list[dict], targets: list[dict], batch: int = 32) -> dict:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend, extended_summary=True)
    started = time.perf_counter()
    for start in range(0, len(preds), batch):
        metric.update(preds[start : start + batch], targets[start : start + batch])
    updated = time.perf_counter()
    result = metric.compute()
    done = time.perf_counter()
    return {
        "backend": backend,
        "update_seconds": round(updated - started, 3),
        "compute_seconds": round(done - updated, 3),
        "map50": float(result["map_50"]),
        "map": float(result["map"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    preds, targets = random_split(args.images, args.detections)
    rows = [time_backend(backend, preds, targets) for backend in ("pycocotools", "faster_coco_eval")]
    for row in rows:
        print(json.dumps(row), flush=True)
    reference, fast = rows
    assert abs(reference["map50"] - fast["map50"]) < 1e-6 and abs(reference["map"] - fast["map"]) < 1e-6
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "detections": args.detections, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
