"""``ssd``: the model core from the command line, without the service.

ssd synth data/shapes --num-images 200          # a synthetic COCO dataset (--voc, --yolo: also those)
ssd train data/shapes runs/first --epochs 20    # dataset folder -> run folder
ssd train data/more runs/second --init job:runs/first   # start from an earlier run's model
ssd detect runs/first/best.pt photo.jpg --annotated-dir out/
ssd evaluate runs/first/best.pt data/shapes
ssd export runs/first/best.pt first.onnx       # ONNX with decoding and NMS (the onnx extra)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig
from .data import DatasetError, DetectionData, make_shapes_dataset, read_dataset, write_voc, write_yolo

# Any other optional field takes a string.
_OPTIONAL_TYPES: dict[object, type] = {"int | None": int, "float | None": float}
_HELP = {
    "init": (
        "where the weights start: auto (default: COCO's SSD300 if in --weights-dir, else the ImageNet backbone, "
        "else random), scratch, imagenet, coco, or job:RUN_FOLDER (an earlier run's best.pt)"
    ),
    "backbone": "vgg16 or vgg16_bn; default: what the weights need (vgg16 for COCO's), else vgg16_bn",
}


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per TrainConfig field, with its default, so the CLI never drifts from the config."""
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            parser.add_argument(
                flag, type=_OPTIONAL_TYPES.get(field.type, str), default=None, help=_HELP.get(field.name)
            )
        else:
            parser.add_argument(
                flag, type=type(default), default=default, help=_HELP.get(field.name, f"default: {default}")
            )


def _cmd_synth(args: argparse.Namespace) -> None:
    data = make_shapes_dataset(args.out, args.num_images, seed=args.seed, image_size=(args.min_size, args.max_size))
    if args.voc:
        write_voc(data, args.out / "voc")
    if args.yolo:
        write_yolo(data, args.out / "yolo")
    print(
        json.dumps(
            {
                "folder": str(args.out),
                "num_images": len(data.images),
                "num_boxes": data.num_boxes,
                "classes": data.classes,
            }
        )
    )


class _ProgressBar:
    """A tqdm bar per epoch fed by fit's step callback, and one line per finished epoch."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_step(self, progress) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=progress.steps_per_epoch,
                desc=f"epoch {progress.epoch}/{progress.epochs}",
                unit="batch",
                leave=False,
            )
        self.bar.n = progress.step
        self.bar.set_postfix(
            loss=f"{progress.loss:.3f}", img_s=f"{progress.images_per_second:.1f}", eta=f"{progress.eta_seconds:.0f}s"
        )

    def on_epoch(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        tqdm.write(json.dumps(shown))


def _read_dataset(path: Path) -> DetectionData:
    """``read_dataset``, with the reader's warnings on stderr."""
    data = read_dataset(path)
    for warning in data.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return data


def _cmd_train(args: argparse.Namespace) -> None:
    from .initialisation import LocalWeights, WeightsUnavailable
    from .training import Callbacks, fit, training_precision  # torch-heavy; keep `ssd --help` fast

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    data = _read_dataset(args.dataset)
    device, precision = training_precision(config)
    print(f"{len(data.images)} images, {data.num_boxes} boxes, classes {data.classes}", file=sys.stderr)
    print(f"training on {device.type} in {precision}", file=sys.stderr)
    bar = _ProgressBar()
    callbacks = Callbacks(on_step=bar.on_step, on_epoch=bar.on_epoch, on_start=_print_start)
    try:
        result = fit(config, data, args.run_dir, callbacks, LocalWeights(args.weights_dir))
    except WeightsUnavailable as error:  # reported as a bad input, like the settings
        raise ValueError(str(error)) from None
    print(
        json.dumps(
            {
                "status": result.status,
                "epochs": result.epochs_completed,
                "best_val_loss": result.best_val_loss,
                "best_checkpoint": str(result.best_checkpoint),
                "device": result.device,
                "precision": result.precision,
                **(result.init.to_dict() if result.init else {}),
                "note": result.note,
            }
        )
    )


def _print_start(start) -> None:
    note = f" ({start.init.note})" if start.init.note else ""
    print(f"weights: {start.init.used}, backbone {start.config.backbone}{note}", file=sys.stderr)


def _cmd_detect(args: argparse.Namespace) -> None:
    from .data.images import open_rgb  # the decoding rule of training and /detect: EXIF orientation applied
    from .detector import Detector
    from .draw import draw_detections

    detector = Detector.from_checkpoint(args.checkpoint, device=args.device, amp=args.precision == "auto")
    results = {}
    for path in tqdm(args.images, unit="image", disable=len(args.images) < 2):
        image = open_rgb(path)
        (found,) = detector.detect([image], args.score_threshold, args.max_detections)
        results[str(path)] = {"image": {"width": image.width, "height": image.height}, "detections": found}
        if args.annotated_dir:
            args.annotated_dir.mkdir(parents=True, exist_ok=True)
            draw_detections(image, found).save(args.annotated_dir / f"{path.stem}.png")
    print(json.dumps(results, indent=2))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .detector import Detector
    from .metrics import evaluate_detector

    detector = Detector.from_checkpoint(args.checkpoint, device=args.device, amp=args.precision == "auto")
    data = _read_dataset(args.dataset)
    with tqdm(total=len(data.images), unit="image") as bar:
        scores = evaluate_detector(
            detector, data.images, args.batch_size, on_batch=bar.update, dataset_classes=data.classes
        )
    print(json.dumps(scores))
    print(per_class_table(scores["per_class"]), file=sys.stderr)


def per_class_table(per_class: list[dict]) -> str:
    """``evaluate_detector``'s per-class figures as aligned text: label, AP@0.5, AP@0.5:0.95, boxes."""
    rows = [("label", "AP@0.5", "AP", "boxes")]
    rows += [(c["label"], _figure(c["ap50"]), _figure(c["ap"]), str(c["num_boxes"])) for c in per_class]
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{label:<{width}}  {ap50:>6}  {ap:>6}  {boxes:>6}" for label, ap50, ap, boxes in rows)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import OnnxUnavailable, export_onnx, require_onnx

    try:
        require_onnx()
    except OnnxUnavailable as error:  # a missing install, not a bad input (which main() reports)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # what the exporter prints (some onnxscript releases do): not our JSON
        export_onnx(args.checkpoint, args.out)
    print(json.dumps({"onnx": str(args.out), "bytes": args.out.stat().st_size}))


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32"],
        help="auto: bf16 (or fp16) where the device computes it natively, else float32; fp32: float32 always",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="Train and run SSD300 object detectors.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate a synthetic shapes dataset (COCO format)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--num-images", type=int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--min-size", type=int, default=240, help="smallest image side in pixels")
    synth.add_argument("--max-size", type=int, default=400, help="largest image side in pixels")
    synth.add_argument("--voc", action="store_true", help="also write the same data as Pascal VOC in OUT/voc")
    synth.add_argument("--yolo", action="store_true", help="also write the same data as YOLO in OUT/yolo")
    synth.set_defaults(run=_cmd_synth)

    train = commands.add_parser("train", help="train on a dataset folder (COCO, VOC or YOLO); resumes a run folder")
    train.add_argument("dataset", type=Path)
    train.add_argument("run_dir", type=Path)
    train.add_argument(
        "--weights-dir",
        type=Path,
        help="holds torchvision's weight files under their published names (default: torch.hub's cache); no downloads",
    )
    _add_train_options(train)
    train.set_defaults(run=_cmd_train)

    detect = commands.add_parser("detect", help="detect objects in images; prints JSON")
    detect.add_argument("checkpoint", type=Path, help="a run's checkpoint, or torchvision's COCO SSD300 weights file")
    detect.add_argument("images", type=Path, nargs="+")
    detect.add_argument("--score-threshold", type=float, default=0.5)
    detect.add_argument("--max-detections", type=int, default=100)
    detect.add_argument("--annotated-dir", type=Path, help="also save each image with its boxes drawn here")
    _add_inference_options(detect)
    detect.set_defaults(run=_cmd_detect)

    evaluate = commands.add_parser(
        "evaluate", help="mAP@0.5 and mAP@0.5:0.95 of a checkpoint on a dataset, overall (JSON) and per class"
    )
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("dataset", type=Path)
    evaluate.add_argument("--batch-size", type=int, default=16)
    _add_inference_options(evaluate)
    evaluate.set_defaults(run=_cmd_evaluate)

    export = commands.add_parser(
        "export",
        help="write a checkpoint's model as ONNX with decoding and NMS (needs the onnx extra)",
        description=(
            "Input images: float32 [N, 3, S, S], RGB in 0-1, resized to the model's input; outputs boxes [N, 100, 4] "
            "(relative x1, y1, x2, y2), scores [N, 100] and labels [N, 100] (0 = empty slot), after a 0.01 score "
            "threshold and NMS. The class names are a JSON list in the metadata key 'classes'."
        ),
    )
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path, help="the .onnx file to write")
    export.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
