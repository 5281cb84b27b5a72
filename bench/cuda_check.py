"""Correctness of the CUDA paths against the CPU, on random inputs. Run on a GPU machine.

Checks: matching + loss on CUDA equal the CPU's; decoding + NMS on CUDA equal the CPU's;
the network under bf16/fp16 autocast stays close to fp32; a few AMP training steps stay
finite and lower the loss; the Detector on CUDA finds what it finds on the CPU; nvJPEG decoding
with the EXIF orientation applied on the GPU gives the CPU path's pixels; the batched
photometric distortion on CUDA gives the CPU's colours.
Exits non-zero on the first failure. Usage: python bench/cuda_check.py
"""

from __future__ import annotations

import sys

import torch

from model.config import ModelConfig, TrainConfig
from model.detector import Detector
from model.loss import SSDLoss
from model.network import SSD300
from model.postprocess import postprocess
from model.training import build_training_run, train_step


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        sys.exit(1)


def random_gt(batch: int, generator: torch.Generator):
    boxes = torch.zeros(batch, 6, 4)
    labels = torch.zeros(batch, 6, dtype=torch.int64)
    for b in range(batch):
        n = int(torch.randint(0, 7, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 0.6
        boxes[b, :n] = torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 0.35 + 0.05], 1)
        labels[b, :n] = torch.randint(1, 5, (n,), generator=generator)
    return boxes, labels


def check_loss(defaults: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(0)
    boxes, labels = random_gt(16, generator)
    loc = torch.randn(16, 8732, 4, generator=generator)
    logits = torch.randn(16, 8732, 5, generator=generator)
    cpu = SSDLoss(defaults)(loc, logits, boxes, labels)
    gpu = SSDLoss(defaults.cuda())(loc.cuda(), logits.cuda(), boxes.cuda(), labels.cuda())
    for part in ("loc", "conf"):
        err = relative_error(getattr(gpu, part).cpu(), getattr(cpu, part))
        check(f"loss.{part} cuda == cpu", err < 1e-5, f"relative error {err:.2e}")
    check("positives cuda == cpu", int(gpu.num_positives) == int(cpu.num_positives), str(int(cpu.num_positives)))


def check_postprocess(defaults: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(1)
    loc = torch.randn(8, 8732, 4, generator=generator) * 0.5
    logits = torch.randn(8, 8732, 5, generator=generator) * 1.5
    sizes = torch.tensor([[640, 480], [300, 300], [1000, 250], [64, 64]] * 2)
    cpu = postprocess(loc, logits, defaults, sizes, score_threshold=0.2)
    gpu = postprocess(loc.cuda(), logits.cuda(), defaults.cuda(), sizes.cuda(), score_threshold=0.2)
    for i, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        same = len(c["boxes"]) == len(g["boxes"]) and torch.equal(c["labels"], g["labels"].cpu())
        err = relative_error(g["boxes"].cpu(), c["boxes"]) if same else float("inf")
        check(f"postprocess image {i} cuda == cpu", same and err < 1e-5, f"{len(c['boxes'])} boxes, error {err:.2e}")


def check_amp_forward() -> None:
    torch.manual_seed(0)
    for backbone in ("vgg16", "vgg16_bn"):
        model = SSD300(ModelConfig(num_classes=5, backbone=backbone)).cuda().eval()
        images = torch.rand(4, 3, 300, 300, device="cuda")
        with torch.inference_mode():
            torch.backends.cudnn.allow_tf32 = False
            ref_loc, ref_logits = model(images)
            torch.backends.cudnn.allow_tf32 = True
            model = model.to(memory_format=torch.channels_last)
            for dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cuda", dtype=dtype):
                    loc, logits = model(images.contiguous(memory_format=torch.channels_last))
                err = max(relative_error(loc.float(), ref_loc), relative_error(logits.float(), ref_logits))
                check(f"{backbone} {dtype} forward ~ fp32", err < 2e-2, f"relative error {err:.2e}")


def check_amp_training() -> None:
    generator = torch.Generator().manual_seed(2)
    boxes, labels = random_gt(16, generator)
    batch = (torch.rand(16, 3, 300, 300, device="cuda"), boxes.cuda(), labels.cuda())
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        config = TrainConfig(learning_rate=1e-4, warmup_steps=0, lr_schedule="constant")
        model = SSD300(config.model_config(num_classes=5)).cuda().to(memory_format=torch.channels_last)
        run = build_training_run(model, config, torch.device("cuda"), total_steps=30, precision=dtype)
        losses = [float(train_step(run, batch).total.detach()) for _ in range(30)]
        finite = all(torch.isfinite(torch.tensor(losses)))
        check(
            f"{dtype} AMP training 30 steps",
            finite and losses[-1] < 0.5 * losses[0],
            f"loss {losses[0]:.2f} -> {losses[-1]:.2f}",
        )


def check_detector() -> None:
    torch.manual_seed(0)
    model = SSD300(ModelConfig(num_classes=4, backbone="vgg16_bn")).eval()
    classes = ["a", "b", "c"]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((480, 640), (300, 300), (200, 500))]
    cpu = Detector(model, classes, "cpu").predict(images, score_threshold=0.3)
    gpu_detector = Detector(model, classes, "cuda")
    gpu_detector.autocast_dtype = None  # exactness check in fp32; AMP is covered above
    gpu = gpu_detector.predict(images, score_threshold=0.3)
    for i, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        top = min(5, len(c["scores"]), len(g["scores"]))
        err = relative_error(g["scores"][:top].cpu(), c["scores"][:top]) if top else 0.0
        check(
            f"detector image {i} cuda ~ cpu",
            abs(len(c["scores"]) - len(g["scores"])) <= 2 and err < 1e-2,
            f"{len(c['scores'])} vs {len(g['scores'])} detections, top-score error {err:.1e}",
        )


def check_jpeg_decoding() -> None:
    """nvJPEG with the orientation applied on the GPU gives the pixels the CPU path gives (JPEG decoders
    differ by a level or two in chroma upsampling)."""
    import io

    from PIL import Image

    from model.data.tensor_decode import decode_images

    jpegs = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        generator = torch.Generator().manual_seed(orientation)
        pixels = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=generator)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).resize((640, 480)).save(buffer, format="JPEG", quality=90, exif=exif)
        jpegs.append(buffer.getvalue())
    on_cpu, on_gpu = decode_images(jpegs, "cpu"), decode_images(jpegs, "cuda")
    for orientation, cpu, gpu in zip(range(1, 9), on_cpu, on_gpu, strict=True):
        same_shape = cpu.shape == gpu.shape and gpu.device.type == "cuda"
        difference = float((gpu.cpu().float() - cpu.float()).abs().mean()) if same_shape else float("inf")
        ok = same_shape and difference < 2.0
        check(f"nvJPEG orientation {orientation} ~ cpu", ok, f"mean |diff| {difference:.2f}")


def check_photometric() -> None:
    from model.data import photometric

    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (64, 3, 300, 300), dtype=torch.uint8, generator=generator)
    params = photometric.draw_params(64, generator)
    on_cpu = photometric.distort(images, params)
    on_gpu = photometric.distort(images.cuda(), params.to("cuda")).cpu()
    difference = float((on_gpu - on_cpu).abs().max())
    check("photometric distortion cuda == cpu (64 images)", difference < 1e-5, f"max |diff| {difference:.1e}")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    config = ModelConfig(num_classes=5)
    defaults = SSD300(config).defaults
    check_loss(defaults)
    check_postprocess(defaults)
    check_amp_forward()
    check_amp_training()
    check_detector()
    check_jpeg_decoding()
    check_photometric()
    print("all CUDA checks passed", flush=True)


if __name__ == "__main__":
    main()
