"""Mixed precision on the CPU: bf16 only where the processor computes it natively, float32 weights,
optimiser state and checkpoints, and bf16 detections that agree with float32 ones.

bf16 is forced on where a test needs it (``native_bf16``): oneDNN computes it on any x86-64 CPU,
emulated where the instructions are missing, so these tests check the same thing everywhere.
"""

import pytest
import torch
from PIL import Image

import model.device
from model.agreement import explain_miss, partners
from model.checkpoint import load_checkpoint
from model.config import ModelConfig, TrainConfig
from model.detector import Detector, load_model
from model.device import amp_dtype, cpu_has_native_bf16, memory_format, precision_name
from model.metrics import evaluate_detector
from model.network import SSD300
from model.postprocess import Detections
from model.training import build_training_run, fit, train_step, training_precision
from tests.support.tiny import TINY

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(model.device, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(model.device, "cpu_has_native_bf16", lambda: False)


@pytest.mark.parametrize(
    ("onednn_bf16", "avx512_bf16", "amx", "native"),
    [
        (True, True, True, True),  # Sapphire Rapids and later
        (True, True, False, True),  # Cooper Lake, Zen 4
        (True, False, False, False),  # AVX-512 alone: oneDNN emulates bf16, slower than float32
        (False, False, False, False),  # no AVX-512
    ],
)
def test_bf16_counts_as_native_only_with_avx512_bf16_or_amx(monkeypatch, onednn_bf16, avx512_bf16, amx, native):
    monkeypatch.setattr(model.device.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu_has_native_bf16.cache_clear()
    try:
        assert cpu_has_native_bf16() is native
    finally:
        cpu_has_native_bf16.cache_clear()


def test_the_cpu_runs_bf16_where_native_and_float32_elsewhere_or_when_off(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(model.device, "cpu_has_native_bf16", lambda native=native: native)
        assert amp_dtype(CPU, enabled=True) == (torch.bfloat16 if native else None)
        assert amp_dtype(CPU, enabled=False) is None
        assert training_precision(TrainConfig(device="cpu"))[1] == ("bf16" if native else "fp32")
        assert training_precision(TrainConfig(device="cpu", amp=False))[1] == "fp32"
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]
    assert memory_format(CPU, torch.bfloat16) == torch.channels_last
    assert memory_format(CPU, None) == torch.contiguous_format


def test_a_bf16_training_step_keeps_weights_optimiser_state_and_loss_in_float32(native_bf16):
    torch.manual_seed(0)
    network = SSD300(ModelConfig(num_classes=3, width_multiplier=0.125)).to(memory_format=torch.channels_last)
    run = build_training_run(network, TrainConfig(**TINY), CPU, total_steps=10)
    assert run.autocast_dtype == torch.bfloat16 and run.precision == "bf16"
    computed_in = []
    network.heads[0].register_forward_hook(lambda _m, _i, out: computed_in.append(out.dtype))
    images = torch.rand(2, 3, 300, 300)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6]], [[0.3, 0.2, 0.9, 0.8]]])
    losses = train_step(run, (images, boxes, torch.tensor([[1], [2]])))
    assert computed_in == [torch.bfloat16]  # the convolutions ran in bf16
    assert losses.total.dtype == torch.float32 and torch.isfinite(losses.total)
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    moments = [v for state in run.optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert not run.scaler.is_enabled()  # bf16 has float32's range: no loss scaling


def test_fit_reports_its_precision_and_writes_float32_checkpoints(shapes, tmp_path, native_bf16):
    result = fit(TrainConfig(epochs=1, val_fraction=0.25, **TINY), shapes, tmp_path)
    assert (result.device, result.precision) == ("cpu", "bf16")
    state = load_checkpoint(result.last_checkpoint)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if v.dim() > 0]
    assert {v.dtype for v in moments} == {torch.float32}


def test_fit_without_amp_trains_in_float32(shapes, tmp_path, native_bf16):
    result = fit(TrainConfig(epochs=1, val_fraction=0, amp=False, **TINY), shapes, tmp_path)
    assert result.precision == "fp32"


def test_a_cpu_without_native_bf16_trains_and_detects_in_float32(shapes, tmp_path, no_native_bf16):
    result = fit(TrainConfig(epochs=1, val_fraction=0, **TINY), shapes, tmp_path)
    assert result.precision == "fp32"
    assert Detector.from_checkpoint(result.last_checkpoint, device="cpu").precision == "fp32"


# The overfitted model is confident on the images it learned and knows nothing else (its mAP@0.5 on new
# shapes images is under 0.01, and there its boxes move with sub-pixel noise in fp32 alone): the agreement
# is checked here on its own images, and on held-out images with models trained until they generalise in
# bench/precision_agreement.py (recorded in bench/RESULTS.md).


def test_bf16_detections_match_float32_ones(overfitted, shapes, monkeypatch):
    result, _ = overfitted
    network, classes = load_model(result.best_checkpoint)
    fp32 = Detector(network, classes, amp=False)
    monkeypatch.setattr(model.device, "cpu_has_native_bf16", lambda: True)
    bf16 = Detector(network, classes)
    before_nms = Detector(network, classes, nms_threshold=1.0)  # bf16, nothing suppressed
    assert (fp32.precision, bf16.precision, before_nms.precision) == ("fp32", "bf16", "bf16")

    images = [Image.open(image.path) for image in shapes.images]
    reference = fp32.predict(images, score_threshold=0.3)
    # Below the threshold too: a float32 score of 0.31 may be 0.29 in bf16 and still be the same detection.
    candidates = bf16.predict(images, score_threshold=0.2)
    raw = before_nms.predict(images, score_threshold=0.2, max_detections=10_000)
    compared, misses = 0, []
    for ref, got, unsuppressed in zip(reference, candidates, raw, strict=True):
        compared += len(ref["scores"])
        for k in (~partners(ref, got).partnered).nonzero()[:, 0].tolist():
            misses.append(explain_miss(ref, k, got, unsuppressed, bf16.nms_threshold))
    assert compared >= shapes.num_boxes
    # Each fp32 detection has its bf16 partner, or is a near tie whose order NMS swapped (model.agreement);
    # which near ties swap depends on the arithmetic down to the thread count, but they stay rare.
    assert all(miss.near_tie for miss in misses), misses
    assert len(misses) <= max(1, compared // 20), misses


def test_a_near_tie_is_two_boxes_that_each_run_kept_in_the_others_place():
    def detections(*rows: tuple[float, float, float, float, float]) -> Detections:
        table = torch.tensor(rows).reshape(-1, 5)
        return Detections(boxes=table[:, :4], scores=table[:, 4], labels=torch.ones(len(table), dtype=torch.int64))

    box = (10, 10, 50, 50)
    fp32 = detections((*box, 0.80))
    neighbour = (12, 10, 54, 50)  # IoU 0.86 with box: NMS at 0.45 keeps one of the two
    assert partners(fp32, detections((10, 10, 50, 51, 0.79))).partnered.tolist() == [True]
    assert partners(fp32, detections((*neighbour, 0.81))).partnered.tolist() == [False]

    def explain(kept: Detections, before_nms: Detections, reference: Detections = fp32):
        return explain_miss(reference, 0, kept, before_nms, nms_threshold=0.45)  # row 0: the fp32 box

    swapped = explain(detections((*neighbour, 0.81)), detections((*neighbour, 0.81), (*box, 0.805)))
    assert swapped.partner_before_nms and swapped.near_tie
    assert (swapped.twin_score, swapped.suppressor_score) == pytest.approx((0.805, 0.81))

    lost = explain(detections((*neighbour, 0.81)), detections((*neighbour, 0.81), (*box, 0.70)))
    assert not lost.partner_before_nms and not lost.near_tie  # the network's own score moved by 0.1

    far_ahead = explain(detections((*neighbour, 0.95)), detections((*neighbour, 0.95), (*box, 0.80)))
    assert far_ahead.partner_before_nms and not far_ahead.near_tie  # the box that won scores 0.15 more

    # The box that suppressed the twin decides, not the kept box that overlaps it most: here a lower one,
    # which NMS cannot have suppressed it with, overlaps more than the 0.95 that did.
    twin, suppressor, lower = (10, 10, 50, 52, 0.80), (10, 25, 50, 65, 0.95), (10, 20, 50, 60, 0.79)
    # IoU with the twin: suppressor 0.49, lower 0.64; the fp32 box has no partner among them.
    kept = detections(suppressor, lower)
    missed = explain(kept, detections(suppressor, lower, twin))
    assert missed.partner_before_nms and missed.suppressor_score == pytest.approx(0.95) and not missed.near_tie
    # A kept box scoring below the twin cannot have suppressed it: no suppressor, no near tie.
    below = explain(detections((*neighbour, 0.79)), detections((*neighbour, 0.79), (*box, 0.80)))
    assert below.partner_before_nms and below.suppressor_score is None and not below.near_tie
    # Both runs kept the neighbour: nothing swapped, the twin was lost to something else.
    both_kept = explain(
        detections((*neighbour, 0.81)),
        detections((*neighbour, 0.81), (*box, 0.805)),
        reference=detections((*box, 0.80), (*neighbour, 0.80)),
    )
    assert both_kept.suppressor_kept_by_reference and not both_kept.near_tie


def test_bf16_moves_map_by_at_most_a_hundredth(overfitted, shapes, monkeypatch):
    result, _ = overfitted
    network, classes = load_model(result.best_checkpoint)
    fp32 = evaluate_detector(Detector(network, classes, amp=False), shapes.images, 8, None, shapes.classes)
    monkeypatch.setattr(model.device, "cpu_has_native_bf16", lambda: True)
    bf16 = evaluate_detector(Detector(network, classes), shapes.images, 8, None, shapes.classes)
    assert fp32["map50"] > 0.5
    assert abs(bf16["map50"] - fp32["map50"]) <= 0.01
    assert abs(bf16["map"] - fp32["map"]) <= 0.01
