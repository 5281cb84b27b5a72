"""What a CPU trains in ten minutes: the synthetic shapes set, validation mAP@0.5 against wall time, per width.

The CPU demo's defaults (README's walk, the web page on a CPU host) come from this. For each
``--widths`` entry: times a few bare training steps, picks the number of epochs whose training fits
``--minutes`` at that rate (the schedule then decays over the whole budget, as a user's run with those
epochs would), runs ``fit`` (the worker's path: loader workers, augmentation, validation after every
epoch) in the precision the machine gives (bf16 where the CPU computes it natively), and records each
epoch's wall time since ``fit`` began and validation mAP@0.5. Writes the curves as JSON and one plot.

Usage: python bench/cpu_demo.py [--images 300] [--widths 1.0,0.5,0.25] [--minutes 10] [--batch-size 16]
       [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.data.dataset import split_train_val
from model.device import amp_dtype, memory_format
from model.training import Callbacks, build_model, build_training_run, fit, train_step, training_precision

CALIBRATION_STEPS = 4


def seconds_per_image(config: TrainConfig, num_classes: int) -> float:
    """The bare training step's time per image at ``config``'s width, batch size and precision."""
    device, _ = training_precision(config)
    layout = memory_format(device, amp_dtype(device, config.amp))
    model = build_model(config.model_config(num_classes), config).to(device, memory_format=layout)
    run = build_training_run(model, config, device, total_steps=100)
    images = torch.randint(0, 256, (config.batch_size, 3, config.image_size, config.image_size), dtype=torch.uint8)
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]]).expand(config.batch_size, -1, -1)
    labels = torch.ones(config.batch_size, 2, dtype=torch.int64)
    train_step(run, (images, boxes, labels), augment_seed=0)  # warm-up
    started = time.perf_counter()
    for step in range(CALIBRATION_STEPS):
        train_step(run, (images, boxes, labels), augment_seed=step)
    return (time.perf_counter() - started) / (CALIBRATION_STEPS * config.batch_size)


def run_width(data, width: float, args: argparse.Namespace, folder: Path) -> dict:
    probe = TrainConfig(width_multiplier=width, batch_size=args.batch_size, epochs=1)
    per_image = seconds_per_image(probe, len(data.classes) + 1)
    train_images = len(split_train_val(len(data.images), probe.val_fraction, probe.seed)[0])
    # Validation and loading take their share too: plan on training for 85% of the budget.
    epochs = max(1, int(0.85 * args.minutes * 60 / (per_image * train_images)))
    config = TrainConfig(width_multiplier=width, batch_size=args.batch_size, epochs=epochs, num_workers=args.workers)
    _, precision = training_precision(config)
    print(f"width {width}: {per_image * 1000:.0f} ms/img bare step in {precision}: {epochs} epochs", flush=True)

    started = time.perf_counter()
    curve: list[dict] = []

    def on_epoch(record: dict) -> None:
        minutes = (time.perf_counter() - started) / 60
        curve.append({"epoch": record["epoch"], "minutes": minutes, "val_map50": record["val_map50"]})
        print(f"  epoch {record['epoch']}: {minutes:.1f} min, mAP@0.5 {record['val_map50']:.3f}", flush=True)

    hard_stop = 1.5 * args.minutes * 60  # a run that overshoots its plan is stopped, and says so
    callbacks = Callbacks(on_epoch=on_epoch, should_stop=lambda: time.perf_counter() - started > hard_stop)
    result = fit(config, data, folder / f"width-{width}", callbacks)
    return {
        "width_multiplier": width,
        "precision": result.precision,
        "epochs": epochs,
        "status": result.status,
        "bare_step_ms_per_image": per_image * 1000,
        "curve": curve,
        "best_val_map50": max((point["val_map50"] for point in curve), default=None),
        "minutes_to_0.9": next((p["minutes"] for p in curve if p["val_map50"] >= 0.9), None),
    }


def plot(runs: list[dict], minutes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        ax.plot(
            [p["minutes"] for p in run["curve"]],
            [p["val_map50"] for p in run["curve"]],
            marker="o",
            label=f"width {run['width_multiplier']} ({run['precision']}, {run['epochs']} epochs)",
        )
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.axvline(minutes, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="minutes of training (fit, validation included)", ylabel="validation mAP@0.5", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300, help="synthetic images (POST /datasets/synthetic's)")
    parser.add_argument("--widths", default="1.0,0.5,0.25")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=TrainConfig.num_workers)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "images": args.images}
    print(info, flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        data = make_shapes_dataset(Path(folder) / "shapes", args.images, seed=0)
        for width in (float(w) for w in args.widths.split(",")):
            runs.append(run_width(data, width, args, Path(folder)))
            if args.json:
                args.json.write_text(json.dumps({"info": info, "runs": runs}, indent=2))
            if args.plot:
                plot(runs, args.minutes, args.plot)


if __name__ == "__main__":
    main()
