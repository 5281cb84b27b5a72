"""Where the training loader's time goes, on camera-sized JPEGs: each step of the SSD augmentation on one
core, then the whole loader (``fit``'s, with its seeded sampler and persistent workers) at several
worker counts. Tells whether the loader can feed the training step (bench/bench_model.py --only train).

Usage: python bench/loader_profile.py [--images 128] [--size 640x480] [--workers 0,2] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from model.config import ModelConfig, TrainConfig
from model.data import make_shapes_dataset
from model.data.images import open_rgb
from model.data.transforms import train_transforms
from model.training import build_loaders, epoch_seed


def step_costs(data, image_size: int, repeats: int) -> dict[str, float]:
    """Milliseconds per image of decoding and of each augmentation step, on one thread (as in a loader
    worker, which torch runs single-threaded)."""
    fill = (123, 117, 104)
    steps = list(train_transforms(image_size, fill).transforms)
    totals = {"decode": 0.0, **{type(step).__name__: 0.0 for step in steps}}
    torch.manual_seed(0)
    for _ in range(repeats):
        for record in data.images:
            start = time.perf_counter()
            image = tv_tensors.Image(F.pil_to_tensor(open_rgb(record.path, record.orientation)))
            totals["decode"] += time.perf_counter() - start
            boxes = tv_tensors.BoundingBoxes(record.boxes.clone(), format="XYXY", canvas_size=image.shape[-2:])
            sample = (image, {"boxes": boxes, "labels": record.labels.clone()})
            for step in steps:
                start = time.perf_counter()
                sample = step(*sample)
                totals[type(step).__name__] += time.perf_counter() - start
    count = repeats * len(data.images)
    return {name: round(seconds / count * 1000, 3) for name, seconds in totals.items()}


def loader_rate(data, workers: int, batch_size: int, epochs: int) -> dict[str, float]:
    """Images a second out of ``fit``'s training loader, and the wait for each epoch's first batch."""
    config = TrainConfig(batch_size=batch_size, num_workers=workers, val_fraction=0.0)
    loader, _ = build_loaders(data, config, ModelConfig(num_classes=4), torch.device("cpu"))
    first_batch, images, busy = [], 0, 0.0
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch_seed(0, epoch))
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            if i == 0:
                first_batch.append(time.perf_counter() - start)
            images += batch[0].shape[0]
        busy += time.perf_counter() - start
    return {
        "workers": workers,
        "images_per_second": round(images / busy, 1),
        "first_batch_seconds": [round(s, 3) for s in first_batch],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", default="640x480", help="width x height")
    parser.add_argument("--workers", default="0,2", help="loader worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="passes per worker count (persistent workers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        data = make_shapes_dataset(Path(folder), args.images, seed=0, image_size=(height, width))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        costs = step_costs(data, 300, repeats=2)
        torch.set_num_threads(threads)
        print(json.dumps({"ms_per_image_one_core": costs, "total": round(sum(costs.values()), 2)}), flush=True)
        rates = []
        for workers in (int(v) for v in args.workers.split(",")):
            rates.append(loader_rate(data, workers, args.batch_size, args.epochs))
            print(json.dumps(rates[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "steps_ms": costs, "loaders": rates}, indent=2))


if __name__ == "__main__":
    main()
