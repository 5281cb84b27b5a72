"""Training-step and inference throughput of this SSD300 against torchvision's ssd300_vgg16, in one run.

Both networks get the same random 300x300 images and targets on the same device. Rows:

- train step: forward + loss + backward + optimiser step, images already on the device
  (torchvision: its own per-image matching and loss, SGD as in its references; ours: the
  batched SSDLoss and Adam as ``fit`` uses them).
- match+loss: matching and loss alone on fixed head outputs.
- infer net: backbone + heads only. infer full: preprocessing + network + decoding + NMS.
- bytes->boxes: 640x480 JPEG bytes in, boxes out (decoding on the device: nvJPEG on CUDA).

Usage: python bench/bench_model.py [--quick] [--device cpu|cuda] [--json out.json]
       [--only train|loss|infer|bytes] [--checkpoint best.pt (inference with trained weights)]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from functools import partial

import torch
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_iou

from model.config import ModelConfig, TrainConfig
from model.data.tensor_decode import decode_images
from model.detector import Detector, load_model
from model.device import amp_dtype, autocast, memory_format
from model.loss import SSDLoss
from model.network import SSD300
from model.training import build_training_run, train_step

NUM_CLASSES = 21  # as the VOC-sized peer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_targets(batch: int, device: torch.device, seed: int = 0):
    """1-5 boxes per image in 300x300 pixels: a list of dicts (torchvision) and padded relative tensors (ours)."""
    generator = torch.Generator().manual_seed(seed)
    per_image, most = [], 5
    for _ in range(batch):
        n = int(torch.randint(1, most + 1, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 200
        wh = torch.rand(n, 2, generator=generator) * 90 + 10
        labels = torch.randint(1, NUM_CLASSES, (n,), generator=generator)
        per_image.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": labels.to(device)})
    boxes = torch.zeros(batch, most, 4, device=device)
    labels = torch.zeros(batch, most, dtype=torch.int64, device=device)
    for i, target in enumerate(per_image):
        boxes[i, : len(target["boxes"])] = target["boxes"] / 300
        labels[i, : len(target["labels"])] = target["labels"]
    return per_image, boxes, labels


def torchvision_train_step(model, images, targets, device, dtype):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    image_list = list(images)

    def step():
        with autocast(device, dtype):
            losses = model(image_list, targets)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def our_train_step(model, images, boxes, labels, device, dtype):
    """The exact step ``fit`` takes (Adam with its parameter groups, schedule, loss), timed alone."""
    amp = dtype is not None
    config = TrainConfig(learning_rate=1e-4, amp=amp, warmup_steps=0, lr_schedule="constant")
    # bf16 or fp16 as asked, not just what the card prefers.
    run = build_training_run(model, config, device, total_steps=1000, precision=dtype)
    batch = (images.contiguous(memory_format=memory_format(device, dtype)), boxes, labels)
    return partial(train_step, run, batch)


def precisions_on(device: torch.device) -> list[tuple[str, torch.dtype | None]]:
    """fp32, and the reduced precisions ``fit`` and the Detector use there (bf16 on a CPU only where native)."""
    if device.type == "cuda":
        return [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
    return [("fp32", None)] + ([("bf16", torch.bfloat16)] if amp_dtype(device, enabled=True) else [])


def bench_training(rows: list, device: torch.device, quick: bool) -> None:
    batches = [2] if quick else ([32, 64] if device.type == "cuda" else [8])
    precisions = precisions_on(device)
    for batch in batches:
        images = torch.rand(batch, 3, 300, 300, device=device)
        targets, boxes, labels = random_targets(batch, device)
        for name, dtype in precisions:
            iters, warm = (2, 1) if quick else (10, 3)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device).train()
            t_tv = median_seconds(torchvision_train_step(tv, images, targets, device, dtype), device, iters, warm)
            del tv
            for backbone in ("vgg16", "vgg16_bn"):
                ours = SSD300(ModelConfig(num_classes=NUM_CLASSES, backbone=backbone)).to(device)
                ours = ours.to(memory_format=memory_format(device, dtype)).train()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step = our_train_step(ours, images, boxes, labels, device, dtype)
                t_ours = median_seconds(step, device, iters, warm)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                rows.append(
                    {
                        "row": f"train step {name} bs{batch}",
                        "ours": backbone,
                        "ours_img_s": batch / t_ours,
                        "torchvision_img_s": batch / t_tv,
                        "ratio": t_tv / t_ours,
                        "ours_peak_gib": peak,
                    }
                )
                print(rows[-1], flush=True)
                del ours


def bench_photometric(rows: list, device: torch.device, quick: bool) -> None:
    """The batch photometric distortion ``fit`` adds to each training step, alone."""
    from model.data import photometric

    for batch in [2] if quick else [32, 64]:
        images = torch.randint(0, 256, (batch, 3, 300, 300), dtype=torch.uint8, device=device)
        params = photometric.draw_params(batch, torch.Generator().manual_seed(0)).to(device)
        iters, warm = (2, 1) if quick else (20, 3)
        seconds = median_seconds(partial(photometric.distort, images, params), device, iters, warm)
        rows.append({"row": f"photometric distortion bs{batch}", "ms": seconds * 1000, "img_s": batch / seconds})
        print(rows[-1], flush=True)


def bench_match_and_loss(rows: list, device: torch.device, quick: bool) -> None:
    batch = 4 if quick else 64
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device)
    ours = SSD300(ModelConfig(num_classes=NUM_CLASSES, backbone="vgg16")).to(device)
    targets, boxes, labels = random_targets(batch, device)
    loc = torch.randn(batch, 8732, 4, device=device)
    logits = torch.randn(batch, 8732, NUM_CLASSES, device=device)
    anchors = [
        torch.cat([ours.defaults[:, :2] - ours.defaults[:, 2:] / 2, ours.defaults[:, :2] + ours.defaults[:, 2:] / 2], 1)
        * 300
    ] * batch
    loss_fn = SSDLoss(ours.defaults).to(device)

    def torchvision_loss():
        matched = [tv.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors, strict=True)]
        tv.compute_loss(targets, {"bbox_regression": loc, "cls_logits": logits}, anchors, matched)

    iters, warm = (3, 1) if quick else (20, 5)
    t_tv = median_seconds(torchvision_loss, device, iters, warm)
    t_ours = median_seconds(lambda: loss_fn(loc, logits, boxes, labels), device, iters, warm)
    rows.append(
        {"row": f"match+loss bs{batch}", "ours_ms": t_ours * 1e3, "torchvision_ms": t_tv * 1e3, "ratio": t_tv / t_ours}
    )
    print(rows[-1], flush=True)


@torch.inference_mode()
def run_torchvision_net(model, images, device, dtype):
    with autocast(device, dtype):
        model.head(list(model.backbone(images).values()))


@torch.inference_mode()
def run_torchvision_full(model, image_list, device, dtype):
    with autocast(device, dtype):
        model(image_list)


@torch.inference_mode()
def run_our_net(model, images, device, dtype):
    with autocast(device, dtype):
        model(images)


def inference_models(checkpoint: str | None) -> tuple[dict[str, SSD300], list[str]]:
    """Our networks by backbone, and their class names: random vgg16 and vgg16_bn, or a trained one.

    Random weights put nearly every class score above 0.01: the worst case for decoding. A
    trained checkpoint gives the candidate counts real images give.
    """
    if checkpoint:
        model, classes = load_model(checkpoint)
        if model.config.width_multiplier != 1.0 or model.config.image_size != 300:
            print(f"warning: {checkpoint} is not SSD300 at full width: no like-for-like comparison", flush=True)
        return {model.config.backbone: model}, classes
    classes = [f"c{i}" for i in range(1, NUM_CLASSES)]
    return {b: SSD300(ModelConfig(num_classes=NUM_CLASSES, backbone=b)).eval() for b in ("vgg16", "vgg16_bn")}, classes


def bench_inference(rows: list, device: torch.device, quick: bool, checkpoint: str | None = None) -> None:
    """Both backbones: vgg16 is the peer's architecture; vgg16_bn (the default) shows what
    the Detector's batch-norm folding buys ("<backbone>_net" times the unfolded network)."""
    batches = [1, 8] if quick else ([1, 32, 128] if device.type == "cuda" else [1, 8])
    ours, classes = inference_models(checkpoint)
    # The peer's network time does not depend on its weights; it gets the same class count.
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=len(classes) + 1).to(device).eval()
    for name, dtype in precisions_on(device)[:2]:
        detectors = {b: Detector(net, classes, device, amp=dtype is not None) for b, net in ours.items()}
        nets = {b: net.to(device, memory_format=memory_format(device, dtype)) for b, net in ours.items()}
        # The peer's best layout: channels_last helps it only in reduced precision.
        tv_layout = torch.channels_last if dtype else torch.contiguous_format
        tv = tv.to(memory_format=tv_layout)
        for batch in batches:
            images = torch.rand(batch, 3, 300, 300, device=device)
            image_list = list(images)
            iters, warm = (3, 1) if quick else (10, 3)
            timed = {
                "tv_net": partial(run_torchvision_net, tv, images.contiguous(memory_format=tv_layout), device, dtype),
                "tv_full": partial(run_torchvision_full, tv, image_list, device, dtype),
            }
            ours_layout = images.contiguous(memory_format=memory_format(device, dtype))
            for backbone, detector in detectors.items():
                detector.autocast_dtype = dtype  # fp16 too on CUDA, where the default would be bf16
                timed[f"{backbone}_net"] = partial(run_our_net, nets[backbone], ours_layout, device, dtype)
                timed[f"{backbone}_full@0.01"] = partial(detector.predict, image_list, 0.01, 200)
            first = next(iter(detectors))
            timed[f"{first}_full@0.5"] = partial(detectors[first].predict, image_list, 0.5, 100)
            t = {key: median_seconds(fn, device, iters, warm) for key, fn in timed.items()}
            weights = "trained" if checkpoint else "random"
            row = {"row": f"infer {name} bs{batch} {weights}", **{f"{k}_img_s": batch / v for k, v in t.items()}}
            for backbone in detectors:
                row[f"{backbone}_full@0.01 / tv_net"] = t["tv_net"] / t[f"{backbone}_full@0.01"]
                row[f"{backbone}_full@0.01 / tv_full"] = t["tv_full"] / t[f"{backbone}_full@0.01"]
            rows.append(row)
            print(row, flush=True)


def photo_jpegs(count: int, width: int = 640, height: int = 480) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (the synthetic shapes generator's textured scenes)."""
    import tempfile
    from pathlib import Path

    from model.data import make_shapes_dataset

    with tempfile.TemporaryDirectory() as folder:
        data = make_shapes_dataset(Path(folder), count, seed=0, image_size=(height, width))
        return [image.path.read_bytes() for image in data.images]


@torch.inference_mode()
def run_torchvision_from_bytes(model, jpegs: list[bytes], device, dtype):
    """torchvision's whole path from JPEG bytes: its decoder (nvJPEG in one batch on CUDA), its transform,
    network and postprocessing."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    with autocast(device, dtype):
        model([image.float() / 255 for image in images])


def bench_encoded(
    rows: list, device: torch.device, quick: bool, checkpoint: str | None = None, compiled: bool = False
) -> None:
    """Bytes in, boxes out: ``Detector.detect_encoded`` on a list of 640x480 JPEGs against torchvision's
    pipeline from the same bytes (both decode on the device: nvJPEG on CUDA)."""
    count = 8 if quick else (128 if device.type == "cuda" else 16)
    jpegs = photo_jpegs(count)
    ours, classes = inference_models(checkpoint)
    backbone, net = next(iter(ours.items()))
    detector = Detector(net, classes, device)
    dtype = detector.autocast_dtype
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=len(classes) + 1).to(device).eval()
    if dtype:
        tv = tv.to(memory_format=torch.channels_last)
    iters, warm = (2, 1) if quick else (10, 3)
    timed = {
        "tv_from_bytes": partial(run_torchvision_from_bytes, tv, jpegs, device, dtype),
        f"{backbone}_from_bytes@0.5": partial(detector.detect_encoded, jpegs, 0.5, 100),
    }
    t = {key: median_seconds(fn, device, iters, warm) for key, fn in timed.items()}
    weights = "trained" if checkpoint else "random"
    row = {"row": f"bytes->boxes {count} jpegs 640x480 {weights}", **{f"{k}_img_s": count / v for k, v in t.items()}}
    row["ours / tv"] = t["tv_from_bytes"] / t[f"{backbone}_from_bytes@0.5"]
    rows.append(row)
    print(row, flush=True)
    if compiled:
        bench_compiled(rows, detector, jpegs, iters, warm)


def bench_compiled(rows: list, detector: Detector, jpegs: list[bytes], iters: int, warm: int) -> None:
    """The same bytes through a compiled copy of the detector (``compile=True``), and its network alone."""
    started = time.perf_counter()
    fast = Detector(detector.model, detector.classes, detector.device, compile=True)
    fast.detect_encoded(jpegs, 0.5, 100)  # compiles for this batch size
    compile_seconds = time.perf_counter() - started
    batch, _ = fast._prepare(decode_images(jpegs, fast.device))

    @torch.inference_mode()
    def network_alone():
        with autocast(fast.device, fast.autocast_dtype):
            fast.network(batch)

    device, count = fast.device, len(jpegs)
    t_full = median_seconds(partial(fast.detect_encoded, jpegs, 0.5, 100), device, iters, warm)
    t_net = median_seconds(network_alone, device, iters, warm)
    row = {
        "row": f"compiled, {count} jpegs 640x480",
        "from_bytes_img_s": count / t_full,
        "network_alone_img_s": count / t_net,
        "compile_seconds": round(compile_seconds, 1),
    }
    rows.append(row)
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--only", choices=["train", "loss", "infer", "bytes"])
    parser.add_argument("--checkpoint", help="inference rows with this trained checkpoint instead of random weights")
    parser.add_argument("--compile", action="store_true", help="bytes rows: also a compiled detector (compiles first)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = {
        "date": date.today().isoformat(),
        "machine": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(info, flush=True)
    rows: list[dict] = []
    if args.only in (None, "loss"):
        bench_match_and_loss(rows, device, args.quick)
    if args.only in (None, "train"):
        bench_photometric(rows, device, args.quick)
        bench_training(rows, device, args.quick)
    if args.only in (None, "infer"):
        bench_inference(rows, device, args.quick, args.checkpoint)
    if args.only in (None, "bytes"):
        bench_encoded(rows, device, args.quick, args.checkpoint, args.compile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
