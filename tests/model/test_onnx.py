"""ONNX export with decoding and NMS: ONNX Runtime on CPU finds the Detector's detections."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.cli import main
from model.config import ModelConfig
from model.detector import Detector
from model.export import GRAPH_VERSION, ExportableSSD
from model.network import SSD300
from model.postprocess import Detections

pytestmark = pytest.mark.slow  # each export traces the network with torch's dynamo exporter

CLASSES = ["circle", "square", "triangle"]
SCORE_THRESHOLD = 0.01
SLOTS = 100
TOLERANCE = 1e-3  # boxes (relative) and scores
# Two scores this close may come out of PyTorch and ONNX Runtime in either order: their float
# rounding differs in the last bits (the scores here agree to about 2e-7).
NEAR_TIE = 1e-5


def structured_images(count: int, seed: int, side: int = 300) -> torch.Tensor:
    """Float Tensor[count, 3, side, side] in 0-1: a few flat-coloured rectangles on a shaded, slightly noisy background.

    The noise keeps equal-looking places from having exactly equal scores.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = torch.linspace(-0.1, 0.1, side)[None, :, None]
    images = []
    for _ in range(count):
        image = 0.25 + 0.5 * torch.rand(3, 1, 1, generator=generator) + rows
        image = image + 0.03 * torch.rand(3, side, side, generator=generator)
        for _ in range(int(torch.randint(3, 7, (), generator=generator))):
            x, y = torch.randint(0, side - 40, (2,), generator=generator).tolist()
            width, height = torch.randint(20, 150, (2,), generator=generator).tolist()
            image[:, y : y + height, x : x + width] = torch.rand(3, 1, 1, generator=generator)
        images.append(image.clamp(0, 1))
    return torch.stack(images)


def random_model(backbone: str, seed: int = 0) -> SSD300:
    """A tiny random network whose detections look like a trained one's: some images fill all 100
    slots, others a few, scores spread from the threshold up.

    Random weights alone give logits of a few units whose scores clear 0.01 nearly everywhere
    (every image would fill its 100 slots), and batch norms that do nothing. So: batch norms with
    running statistics of their own (folding them then matters), heads scaled to logits of
    spread 2.5, and a background logit raised until about 150 class scores per image clear the
    threshold (a class score is at most exp(its logit - the background's)).
    """
    torch.manual_seed(seed)
    model = SSD300(ModelConfig(num_classes=len(CLASSES) + 1, backbone=backbone, width_multiplier=0.125)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
                module.weight.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))
        calibration = structured_images(4, seed=1000 + seed)
        _, logits = model(calibration)
        for head in model.heads:
            head.weight.mul_(2.5 / logits.std())
            head.bias.mul_(2.5 / logits.std())
        _, logits = model(calibration)
        margins = (logits[..., 1:] - logits[..., :1]).flatten()  # foreground minus background logits
        raise_by = margins.quantile(1 - 150 * len(calibration) / margins.numel()) - math.log(SCORE_THRESHOLD)
        for head, boxes in zip(model.heads, model.boxes_per_location, strict=True):
            head.bias.view(boxes, 4 + model.num_classes)[:, 4] += raise_by  # channel 4 of each box: background
    return model


def write_checkpoint(path, model: SSD300) -> None:
    save_checkpoint(
        path, {"epoch": 1, "classes": CLASSES, "model_config": model.config.to_dict(), "model": model.state_dict()}
    )


def assert_same_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, expected: Detections, side):
    """One image's slots from ONNX Runtime (boxes relative) against the Detector's list (boxes in pixels of ``side``).

    The detections fill a prefix of the slots, sorted by score; the other slots are empty (label
    0, score 0, box 0).

    Ties and near-ties: PyTorch's topk and ONNX Runtime's TopK may put two detections of equal
    or nearly equal scores (see NEAR_TIE) in either order. Where that order decides something,
    the two sides may then differ in which of the two they keep: at the last of the 100 places,
    at the last of a class's candidates for NMS, or (two overlapping boxes of one class) which
    one NMS keeps. So the lists are compared as sets: each detection pairs with one of the same
    label and box on the other side, with the same score; what is left unpaired on either side
    must pair up by near-equal scores (one near-tie kept instead of the other) or lie at the
    score threshold (kept on one side only, by rounding).
    """
    count = int((labels > 0).sum())
    assert (labels[:count] > 0).all() and (labels[count:] == 0).all(), labels
    assert (scores[count:] == 0).all() and (boxes[count:] == 0).all()
    assert (np.diff(scores[:count]) <= 0).all(), "not sorted by descending score"
    assert scores.dtype == boxes.dtype == np.float32 and labels.dtype == np.int64

    found = list(zip(boxes[:count], scores[:count], labels[:count], strict=True))
    reference = list(
        zip((expected["boxes"] / side).numpy(), expected["scores"].numpy(), expected["labels"].numpy(), strict=True)
    )
    unpaired = []
    for box, score, label in reference:
        partners = [
            i
            for i, (b, s, lab) in enumerate(found)
            if lab == label and np.abs(b - box).max() <= TOLERANCE and abs(s - score) <= TOLERANCE
        ]
        if partners:  # one at most, but for empty boxes (which suppress nothing): then the closest score
            found.pop(min(partners, key=lambda i: abs(found[i][1] - score)))
        else:
            unpaired.append(score)
    left = [float(s) for s in sorted(s for _, s, _ in found) if s > SCORE_THRESHOLD + NEAR_TIE]
    right = [float(s) for s in sorted(unpaired) if s > SCORE_THRESHOLD + NEAR_TIE]
    assert len(left) == len(right) and np.allclose(left, right, rtol=0, atol=NEAR_TIE), (
        f"detections without a partner: {len(found)} from ONNX, {len(unpaired)} from the Detector; "
        f"scores {left} and {right}"
    )
    assert len(unpaired) <= 3, "near-ties decide only a few places"
    return count


@pytest.fixture(scope="module", params=["vgg16", "vgg16_bn"])
def exported(request, tmp_path_factory):
    """A random checkpoint of the backbone exported by ``ssd export``: its Detector, an ORT session, the file."""
    folder = tmp_path_factory.mktemp(request.param)
    write_checkpoint(folder / "model.pt", random_model(request.param))
    out = folder / "new folder" / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(folder / "model.pt"), str(out)]) == 0
    assert json.loads(printed.getvalue()) == {"onnx": str(out), "bytes": out.stat().st_size}
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    # The graph computes in float32: compared with the Detector's float32 path.
    return Detector.from_checkpoint(folder / "model.pt", device="cpu", amp=False), session, out


@pytest.mark.parametrize(("batch", "seed"), [(1, 2), (4, 1)], ids=["batch of 1", "batch of 4"])
def test_onnx_runtime_finds_the_detectors_detections(exported, batch, seed):
    detector, session, _ = exported
    images = structured_images(batch, seed)
    boxes, scores, labels = session.run(None, {"images": images.numpy()})
    assert boxes.shape == (batch, SLOTS, 4) and scores.shape == labels.shape == (batch, SLOTS)

    expected = detector.predict(list(images), score_threshold=SCORE_THRESHOLD, max_detections=SLOTS)
    counts = [
        assert_same_detections(b, s, lab, reference, 300)
        for b, s, lab, reference in zip(boxes, scores, labels, expected, strict=True)
    ]
    # Not a trivial agreement: dozens of detections of several classes, full lists and lists with empty slots.
    assert len(np.unique(labels[labels > 0])) == len(CLASSES)
    if batch == 1:
        assert counts[0] >= 50, counts
    else:
        assert max(counts) == SLOTS and min(counts) < SLOTS and sum(counts) >= 200, counts


def test_the_exportable_module_is_the_detector_in_pytorch(exported):
    """The graph before export (NMS by ``grouped_nms``), on the Detector's own folded network."""
    detector, _, _ = exported
    images = structured_images(4, seed=4)
    with torch.inference_mode():
        boxes, scores, labels = ExportableSSD.from_detector(detector)(images)
    expected = detector.predict(list(images), score_threshold=SCORE_THRESHOLD, max_detections=SLOTS)
    for i, reference in enumerate(expected):
        count = len(reference["scores"])
        torch.testing.assert_close(boxes[i, :count] * 300, reference["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(scores[i, :count], reference["scores"], rtol=0, atol=0)
        assert labels[i, :count].tolist() == reference["labels"].tolist() and not labels[i, count:].any()


def test_the_model_names_its_classes_inputs_and_outputs_with_a_dynamic_batch(exported):
    _, _, path = exported
    model = onnx.load(path)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["classes"]) == CLASSES and metadata["ssd_graph_version"] == str(GRAPH_VERSION)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)

    (images,) = model.graph.input
    assert (images.name, shape(images), dtype(images)) == ("images", ["batch", 3, 300, 300], np.float32)
    outputs = {value.name: value for value in model.graph.output}
    assert list(outputs) == ["boxes", "scores", "labels"]
    assert [dtype(v) for v in outputs.values()] == [np.float32, np.float32, np.int64]
    assert isinstance(shape(outputs["boxes"])[0], str) and shape(outputs["boxes"])[1:] == [SLOTS, 4]
    assert any(node.op_type == "NonMaxSuppression" for node in model.graph.node)


def test_ssd_export_reports_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "bad.pt"), str(tmp_path / "bad.onnx")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_ssd_export_says_what_to_install_without_the_onnx_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit) as exit:
        main(["export", str(tmp_path / "model.pt"), str(tmp_path / "model.onnx")])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "onnxscript" in error and 'pip install "ssd-service[onnx]"' in error
    assert not (tmp_path / "model.onnx").exists()
