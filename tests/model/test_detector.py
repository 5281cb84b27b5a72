"""The Detector's input handling: any mix of sizes, dtypes and PIL images, in the caller's order."""

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from model.config import ModelConfig
from model.detector import Detector
from model.network import SSD300


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Detector(SSD300(ModelConfig(num_classes=3, width_multiplier=0.125)), ["a", "b"])


def one_at_a_time(image: torch.Tensor) -> torch.Tensor:
    """The obvious per-image preprocessing: to 0-1 floats, then resize to 300x300."""
    image = image.float() / 255 if image.dtype == torch.uint8 else image
    return F.resize(image, [300, 300], antialias=True)


@pytest.mark.parametrize("pixels_per_resize", [2**24, 2 * 240 * 320], ids=["one resize a size", "chunked"])
def test_a_mixed_batch_is_prepared_as_one_image_at_a_time_in_the_callers_order(
    detector, monkeypatch, pixels_per_resize
):
    monkeypatch.setattr("model.detector._PIXELS_PER_RESIZE", pixels_per_resize)
    generator = torch.Generator().manual_seed(1)
    small = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8, generator=generator)
    square = torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8, generator=generator)
    tall = torch.rand(3, 500, 200, generator=generator)
    rgba = Image.fromarray(torch.randint(0, 256, (240, 320, 4), dtype=torch.uint8, generator=generator).numpy())
    images = [small, tall, rgba, square, small.flip(-1), tall.clone(), small.flip(-2)]

    batch, sizes = detector._prepare(images)

    as_tensors = [small, tall, F.pil_to_tensor(rgba.convert("RGB")), square, small.flip(-1), tall, small.flip(-2)]
    expected = torch.stack([one_at_a_time(t) for t in as_tensors])
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert sizes.tolist() == [[320, 240], [200, 500], [320, 240], [300, 300], [320, 240], [200, 500], [320, 240]]


def test_detections_of_an_image_do_not_depend_on_its_batch_neighbours(detector):
    generator = torch.Generator().manual_seed(2)
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in ((200, 260), (300, 300))
    ]
    alone = detector.predict(images[:1], score_threshold=0.0, max_detections=10)[0]
    together = detector.predict(images, score_threshold=0.0, max_detections=10)[0]
    torch.testing.assert_close(together["scores"], alone["scores"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together["boxes"], alone["boxes"], rtol=1e-4, atol=1e-3)


def test_a_tensor_that_is_not_rgb_is_refused(detector):
    with pytest.raises(ValueError, match=r"RGB image tensor \[3, H, W\]"):
        detector.predict([torch.zeros(1, 40, 40)])


@pytest.mark.slow
def test_a_compiled_detector_finds_what_the_eager_one_finds(detector):
    generator = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator) for _ in range(2)]
    # float32 on both sides: bf16's rounding differs between inductor's kernels and eager ones.
    eager_fp32 = Detector(detector.model, detector.classes, amp=False)
    compiled = Detector(detector.model, detector.classes, compile=True, amp=False)
    assert compiled.network is not compiled.model  # the compiled wrapper runs, not the plain module
    eager, fused = eager_fp32.detect(images, 0.01, 20), compiled.detect(images, 0.01, 20)
    for mine, theirs in zip(fused, eager, strict=True):
        assert [d["class_id"] for d in mine] == [d["class_id"] for d in theirs]
        assert mine[0]["score"] == pytest.approx(theirs[0]["score"], abs=1e-4)
        torch.testing.assert_close(
            torch.tensor([d["box"] for d in mine]), torch.tensor([d["box"] for d in theirs]), atol=0.05, rtol=0
        )
