"""Training from JPEG files, and the time to a good model, against torchvision's SSD300 in the same run.

1. Draws ``--train-images + --val-images`` synthetic JPEGs (shapes on textured scenes, each side
   in ``--size``'s range) in parallel, one process per core.
2. Ours: ``fit`` (the path the worker runs) with the full SSD augmentation, until validation
   mAP@0.5 reaches ``--target`` or ``--max-seconds`` pass. Per epoch: wall time since ``fit``
   began, steady-state images/s (progress reports after the first tenth of the epoch), the rest
   of the training pass (loader start-up and tail), validation seconds (loss + mAP) and mAP.
3. The bare training step (``train_step``, the same batch size and augmentation on the device)
   on batches already on the device: what ``fit`` could reach if loading cost nothing.
4. The peer: torchvision's ``ssd300_vgg16`` (random weights) on the same files and validation
   split, with torchvision's SSD training transforms (its detection references' ``ssd`` preset)
   and Adam, the same batch size, workers, warm-up and schedule, mixed precision on CUDA;
   validated after every epoch by the same mAP code, until the same target or its own limit.

Wall times exclude process start and data generation; each side's clock includes building its model
and loaders. This compares the two recipes as each is meant to run (ours: vgg16_bn, Adam 1e-3, bf16;
torchvision's: its vgg16 SSD300, which was seen to train from scratch at Adam 1e-4 in fp16); pass
``--backbone vgg16`` for ours on the peer's backbone. Writes a JSON summary (``--json``) after every
phase and epoch, so a run cut short keeps what it measured.

Usage: python bench/time_to_map.py [--train-images 10000] [--val-images 500] [--size 480,640]
       [--batch-size 32] [--num-workers 14] [--max-seconds 120] [--peer-max-seconds 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import ssd300_vgg16
from torchvision.transforms import v2

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.data.annotations import DetectionData
from model.data.dataset import load_annotated, split_train_val
from model.device import amp_dtype, autocast, memory_format, resolve_device
from model.metrics import MeanAP
from model.training import Callbacks, WarmupSchedule, build_model, build_training_run, fit, train_step


def generate(folder: Path, count: int, size: tuple[int, int], seed: int, processes: int) -> DetectionData:
    """``count`` shapes images as JPEG files, drawn in ``processes`` parallel parts (each seeded apart)."""
    parts = [count // processes + (1 if k < count % processes else 0) for k in range(processes)]
    jobs = [(folder / f"part{k}", n, seed * 1000 + k, size) for k, n in enumerate(parts) if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        datasets = pool.starmap(make_shapes_dataset, jobs)
    images = [record for data in datasets for record in data.images]
    return DetectionData(classes=datasets[0].classes, images=images, format="coco")


def steady_rate(reports: list[tuple[float, int]], batch_size: int) -> float | None:
    """Images/s between the first progress report past a tenth of the epoch and the last one."""
    if not reports:
        return None
    last_step = reports[-1][1]
    later = [(t, step) for t, step in reports if step >= max(2, last_step // 10)]
    if len(later) < 2 or later[-1][0] <= later[0][0]:
        return None
    (t0, s0), (t1, s1) = later[0], later[-1]
    return (s1 - s0) * batch_size / (t1 - t0)


def train_ours(data: DetectionData, val_fraction: float, args, report: Callable[[dict], None]) -> dict:
    """``fit`` until the target or the time limit; ``report`` gets the results so far after each epoch."""
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_fraction=val_fraction,
        num_workers=args.num_workers,
        backbone=args.backbone,
        width_multiplier=args.width_multiplier,
    )
    epochs: list[dict] = []
    reports: dict[int, list[tuple[float, int]]] = {}
    train_images = len(split_train_val(len(data.images), val_fraction, config.seed)[0])
    started = time.perf_counter()

    def on_step(progress) -> None:
        reports.setdefault(progress.epoch, []).append((time.perf_counter(), progress.step))

    def on_epoch(record: dict) -> None:
        train_seconds = record["seconds"] - record["val_seconds"]
        rate = steady_rate(reports.get(record["epoch"], []), config.batch_size)
        row = {
            "epoch": record["epoch"],
            "elapsed": round(time.perf_counter() - started, 2),
            "val_map50": record["val_map50"],
            "train_loss": round(record["train_loss"], 4),
            "steady_img_s": rate and round(rate, 1),
            "epoch_img_s": round(train_images / train_seconds, 1),
            "train_seconds": round(train_seconds, 2),
            "loader_and_tail_seconds": rate and round(train_seconds - train_images / rate, 2),
            "val_seconds": record["val_seconds"],
        }
        epochs.append(row)
        print(json.dumps({"ours": row}), flush=True)
        report({"config": config.to_dict(), "epochs": epochs, **time_to(epochs, args.target)})

    def should_stop() -> bool:
        reached = bool(epochs) and (epochs[-1]["val_map50"] or 0) >= args.target
        return reached or time.perf_counter() - started > args.max_seconds

    with tempfile.TemporaryDirectory() as run_dir:
        fit(config, data, Path(run_dir), Callbacks(on_step=on_step, on_epoch=on_epoch, should_stop=should_stop))
    return {"config": config.to_dict(), "epochs": epochs, **time_to(epochs, args.target)}


def time_to(epochs: list[dict], target: float) -> dict:
    reached = next((row for row in epochs if (row["val_map50"] or 0) >= target), None)
    return {
        "seconds_to_target": reached and reached["elapsed"],
        "epochs_to_target": reached and reached["epoch"],
        "best_val_map50": max((row["val_map50"] or 0 for row in epochs), default=None),
        "seconds_run": epochs[-1]["elapsed"] if epochs else None,
    }


def bare_step_rate(args, num_classes: int) -> float:
    """Images/s of ``train_step`` alone (photometric distortion included) on uint8 batches already on the device."""
    device = resolve_device("auto")
    config = TrainConfig(
        batch_size=args.batch_size, backbone=args.backbone, width_multiplier=args.width_multiplier, learning_rate=1e-5
    )
    model = build_model(config.model_config(num_classes=num_classes), config)
    model = model.to(device, memory_format=memory_format(device, amp_dtype(device, config.amp)))
    run = build_training_run(model, config, device, total_steps=1000)
    images = torch.randint(0, 256, (args.batch_size, 3, 300, 300), dtype=torch.uint8, device=device)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]], device=device).expand(args.batch_size, 2, 4)
    labels = torch.tensor([1, 2], device=device).expand(args.batch_size, 2)
    batch = (images, boxes.contiguous(), labels.contiguous())
    for step in range(3):
        train_step(run, batch, step)
    synchronize(device)
    started = time.perf_counter()
    for step in range(args.bare_steps):
        train_step(run, batch, step)
    synchronize(device)
    return args.batch_size * args.bare_steps / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeerDataset(Dataset):
    """The same records as torchvision's detection references feed its SSD: uint8 image, target dict."""

    def __init__(self, data: DetectionData, indices: list[int], transforms):
        self.records = [data.images[i] for i in indices]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image, target = load_annotated(self.records[index])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def peer_transforms() -> v2.Compose:
    """torchvision's detection references, ``--data-augmentation ssd`` (images stay uint8 until the device)."""
    mean = [123.0, 117.0, 104.0]
    return v2.Compose(
        [
            v2.RandomPhotometricDistort(),
            v2.RandomZoomOut(fill=mean),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def as_lists(batch):
    return tuple(zip(*batch, strict=True))


def train_peer(
    data: DetectionData, val_fraction: float, args, max_seconds: float, report: Callable[[dict], None]
) -> dict:
    """torchvision's SSD300 on the same files until the target or ``max_seconds``; ``report`` as ``train_ours``'s."""
    started = time.perf_counter()  # as ours: building the model and the loaders counts
    device = resolve_device("auto")
    train_idx, val_idx = split_train_val(len(data.images), val_fraction, seed=0)
    loader_args = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "collate_fn": as_lists,
        "pin_memory": device.type == "cuda",
        "persistent_workers": args.num_workers > 0,
    }
    train_loader = DataLoader(PeerDataset(data, train_idx, peer_transforms()), shuffle=True, **loader_args)
    val_loader = DataLoader(PeerDataset(data, val_idx, None), **loader_args)
    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=len(data.classes) + 1, detections_per_img=100)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.peer_learning_rate)
    total_steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(total_steps, 100, cosine=True))
    dtype = torch.float16 if device.type == "cuda" else None  # the precision it was seen to train in
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epochs: list[dict] = []
    recipe = {"backbone": "vgg16", "learning_rate": args.peer_learning_rate, "precision": str(dtype)}
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_started, images, losses = time.perf_counter(), 0, torch.zeros((), device=device)
        for batch_images, targets in train_loader:
            batch_images = [image.to(device, non_blocking=True).float() / 255 for image in batch_images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with autocast(device, dtype):
                loss = sum(model(batch_images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses += loss.detach()
            images += len(batch_images)
            if time.perf_counter() - started > max_seconds:
                break
        train_seconds = time.perf_counter() - epoch_started
        val_started = time.perf_counter()
        val_map50 = peer_map50(model, val_loader, device, dtype, len(data.classes))
        row = {
            "epoch": epoch,
            "elapsed": round(time.perf_counter() - started, 2),
            "val_map50": val_map50,
            "train_loss": round(float(losses) / max(1, math.ceil(images / args.batch_size)), 4),
            "epoch_img_s": round(images / train_seconds, 1),
            "train_seconds": round(train_seconds, 2),
            "val_seconds": round(time.perf_counter() - val_started, 2),
        }
        epochs.append(row)
        print(json.dumps({"torchvision": row}), flush=True)
        report({"recipe": recipe, "epochs": epochs, **time_to(epochs, args.target)})
        if (val_map50 or 0) >= args.target or time.perf_counter() - started > max_seconds:
            break
    return {"recipe": recipe, "epochs": epochs, **time_to(epochs, args.target)}


@torch.inference_mode()
def peer_map50(model, loader: DataLoader, device: torch.device, dtype, num_classes: int) -> float | None:
    """Validation mAP@0.5 of torchvision's model by the same ``MeanAP`` as ``fit``'s, in relative coordinates."""
    model.eval()
    metric = MeanAP(num_classes)
    for batch_images, targets in loader:
        inputs = [image.to(device).float() / 255 for image in batch_images]
        with autocast(device, dtype):
            outputs = model(inputs)
        scales = [torch.tensor([w, h, w, h], dtype=torch.float32) for w, h in (i.shape[:-3:-1] for i in inputs)]
        detections = [
            {"boxes": o["boxes"].float().cpu() / s, "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu()}
            for o, s in zip(outputs, scales, strict=True)
        ]
        most = max(1, max(len(t["labels"]) for t in targets))
        gt_boxes = torch.zeros(len(targets), most, 4)
        gt_labels = torch.zeros(len(targets), most, dtype=torch.int64)
        for row, (target, scale) in enumerate(zip(targets, scales, strict=True)):
            gt_boxes[row, : len(target["labels"])] = target["boxes"] / scale
            gt_labels[row, : len(target["labels"])] = target["labels"]
        metric.update(detections, gt_boxes, gt_labels)
    return metric.compute()["map50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--size", default="480,640", help="each side's range in pixels, min,max")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--backbone", default="vgg16_bn")
    parser.add_argument("--width-multiplier", type=float, default=1.0, help="ours only (quick CPU runs)")
    parser.add_argument("--bare-steps", type=int, default=30, help="timed steps of the bare training step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--peer-learning-rate", type=float, default=1e-4, help="torchvision's SSD was seen to train at 1e-4"
    )
    parser.add_argument("--epochs", type=int, default=20, help="the schedule's length; runs stop at the target")
    parser.add_argument("--target", type=float, default=0.95, help="validation mAP@0.5 to reach")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--peer-max-seconds", type=float, default=200.0)
    parser.add_argument(
        "--peer-stop-ratio",
        type=float,
        default=None,
        help="also stop the peer once it has run this many times our time to the target (its ratio is then a bound)",
    )
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="for drawing the images")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    low, high = (int(v) for v in args.size.split(","))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary: dict = {"device": device, "torch": torch.__version__, "args": {**vars(args), "json": str(args.json)}}

    def save(key: str | None = None, value=None) -> None:
        """Keep ``value`` under ``key`` and write the summary so far (a run cut short keeps what it measured)."""
        if key is not None:
            summary[key] = value
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        count = args.train_images + args.val_images
        data = generate(Path(folder), count, (low, high), seed=1, processes=min(args.processes, count))
        save("generate_seconds", round(time.perf_counter() - started, 1))
        print(json.dumps({"generated": count, "seconds": summary["generate_seconds"]}), flush=True)
        val_fraction = args.val_images / count
        save("ours", train_ours(data, val_fraction, args, partial(save, "ours")))
        save("bare_step_img_s", round(bare_step_rate(args, len(data.classes) + 1), 1))
        print(json.dumps({"bare_step_img_s": summary["bare_step_img_s"]}), flush=True)
        rates = [row["steady_img_s"] for row in summary["ours"]["epochs"] if row["steady_img_s"]]
        if rates:
            save("fit_over_bare_step", round(max(rates) / summary["bare_step_img_s"], 3))
        if not args.skip_peer:
            limit = args.peer_max_seconds
            if args.peer_stop_ratio and summary["ours"]["seconds_to_target"]:
                limit = min(limit, args.peer_stop_ratio * summary["ours"]["seconds_to_target"])
            save("torchvision", train_peer(data, val_fraction, args, limit, partial(save, "torchvision")))
            ours, peer = summary["ours"]["seconds_to_target"], summary["torchvision"]["seconds_to_target"]
            peer_bound = peer or summary["torchvision"]["seconds_run"]
            if ours and peer_bound:
                # Without the peer reaching the target, its run time is a lower bound on its time to it.
                save("peer_over_ours", {"ratio": round(peer_bound / ours, 2), "peer_reached": peer is not None})
    print(json.dumps({k: v for k, v in summary.items() if k not in ("ours", "torchvision", "args")}), flush=True)


if __name__ == "__main__":
    main()
