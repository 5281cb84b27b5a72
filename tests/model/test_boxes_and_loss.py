import pytest
import torch
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_convert, box_iou

from model.boxes import decode, encode, match
from model.config import ModelConfig
from model.default_boxes import default_boxes, feature_map_sizes
from model.loss import SSDLoss
from tests.support.reference import encode_one, match_one_image, ssd_loss_one_image_at_a_time

CONFIG = ModelConfig(num_classes=4)
DEFAULTS = default_boxes(feature_map_sizes(300), CONFIG.scales, CONFIG.aspect_ratios)
DEFAULTS_XYXY = box_convert(DEFAULTS, "cxcywh", "xyxy")
VARIANCES = CONFIG.variances


def random_boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    """Tensor[n, 4] of relative (x1, y1, x2, y2) boxes with sides between 0.05 and 0.6."""
    xy = torch.rand(n, 2, generator=generator) * 0.6
    wh = torch.rand(n, 2, generator=generator) * 0.55 + 0.05
    return torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1)


def random_batch(seed: int, counts: list[int], num_classes: int = 4):
    """Padded ground truth: boxes Tensor[B, M, 4], labels Tensor[B, M] (0 on padding rows)."""
    generator = torch.Generator().manual_seed(seed)
    max_boxes = max(1, max(counts))
    boxes = torch.zeros(len(counts), max_boxes, 4)
    labels = torch.zeros(len(counts), max_boxes, dtype=torch.int64)
    for b, n in enumerate(counts):
        boxes[b, :n] = random_boxes(generator, n)
        labels[b, :n] = torch.randint(1, num_classes, (n,), generator=generator)
    return boxes, labels


def test_encode_then_decode_gives_the_boxes_back():
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(generator, 3 * 8732).view(3, 8732, 4)
    torch.testing.assert_close(decode(encode(boxes, DEFAULTS, VARIANCES), DEFAULTS, VARIANCES), boxes)


def test_encode_matches_the_formula_and_torchvisions_box_coder():
    generator = torch.Generator().manual_seed(1)
    boxes = random_boxes(generator, 8732)
    ours = encode(boxes, DEFAULTS, VARIANCES)
    for i in (0, 17, 5000, 8731):
        torch.testing.assert_close(
            ours[i], torch.tensor(encode_one(boxes[i].tolist(), DEFAULTS[i].tolist(), VARIANCES))
        )
    coder = tv_det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(ours, coder.encode_single(boxes, DEFAULTS_XYXY), rtol=1e-5, atol=1e-4)


def test_decode_follows_the_dtype_of_its_input():
    offsets = torch.zeros(2, 8732, 4, dtype=torch.float64)
    decoded = decode(offsets, DEFAULTS, VARIANCES)
    assert decoded.dtype == torch.float64
    torch.testing.assert_close(decoded[0], DEFAULTS_XYXY.double())


def test_batched_matching_equals_a_per_box_reference():
    counts = [3, 0, 5, 1]
    boxes, labels = random_batch(2, counts)
    matched = match(boxes, labels > 0, DEFAULTS_XYXY, 0.5)
    assert matched.shape == (4, 8732)
    for b, n in enumerate(counts):
        if n == 0:
            assert (matched[b] == -1).all()
            continue
        expected = match_one_image(boxes[b, :n], DEFAULTS_XYXY, 0.5)
        torch.testing.assert_close(matched[b], expected)


def test_batched_matching_equals_torchvisions_ssd_matcher():
    counts = [4, 2, 6]
    boxes, labels = random_batch(3, counts)
    matched = match(boxes, labels > 0, DEFAULTS_XYXY, 0.5)
    matcher = tv_det_utils.SSDMatcher(0.5)
    for b, n in enumerate(counts):
        torch.testing.assert_close(matched[b], matcher(box_iou(boxes[b, :n], DEFAULTS_XYXY)))


def test_every_object_gets_at_least_one_default_box_even_a_tiny_one():
    boxes = torch.tensor([[[0.40, 0.40, 0.42, 0.43], [0.1, 0.1, 0.9, 0.9]]])
    matched = match(boxes, torch.tensor([[True, True]]), DEFAULTS_XYXY, 0.5)
    assert (matched == 0).sum() == 1  # the tiny box has IoU < 0.5 everywhere, but is forced
    assert (matched == 1).sum() >= 1


def head_outputs(seed: int, batch: int, num_classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, 8732, 4, generator=generator)
    logits = torch.randn(batch, 8732, num_classes, generator=generator) * 2
    return loc, logits


@pytest.mark.parametrize("counts", [[3, 1, 4], [0, 2], [0, 0]])
def test_batched_loss_equals_a_per_image_reference(counts):
    boxes, labels = random_batch(3, counts)
    loc, logits = head_outputs(4, len(counts))
    loss = SSDLoss(DEFAULTS, VARIANCES)(loc, logits, boxes, labels)
    matched = [
        match_one_image(boxes[b, :n], DEFAULTS_XYXY, 0.5) if n else torch.full((8732,), -1)
        for b, n in enumerate(counts)
    ]
    ref_loc, ref_conf = ssd_loss_one_image_at_a_time(loc, logits, boxes, labels, DEFAULTS, matched, VARIANCES)
    torch.testing.assert_close(loss.loc.double(), torch.as_tensor(ref_loc, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.conf.double(), torch.as_tensor(ref_conf, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.total, loss.loc + loss.conf)
    assert int(loss.num_positives) == sum(int((m >= 0).sum()) for m in matched)


def test_batched_loss_equals_torchvisions_ssd_loss():
    counts = [2, 5, 1, 3]
    boxes, labels = random_batch(5, counts, num_classes=6)
    loc, logits = head_outputs(6, len(counts), num_classes=6)
    loss = SSDLoss(DEFAULTS, VARIANCES)(loc, logits, boxes, labels)

    tv_model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=6)
    # torchvision works in input pixels; SSD's encoding is scale-free, so scaling everything
    # by 300 must leave the loss unchanged.
    anchors = [DEFAULTS_XYXY * 300] * len(counts)
    targets = [{"boxes": boxes[b, :n] * 300, "labels": labels[b, :n]} for b, n in enumerate(counts)]
    matched = [tv_model.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors, strict=True)]
    tv_loss = tv_model.compute_loss(targets, {"bbox_regression": loc, "cls_logits": logits}, anchors, matched)
    torch.testing.assert_close(loss.loc, tv_loss["bbox_regression"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.conf, tv_loss["classification"], rtol=1e-5, atol=1e-5)


def test_loss_of_images_without_objects_is_finite_and_has_gradients():
    boxes, labels = random_batch(0, [0, 0])
    loc, logits = head_outputs(1, 2)
    loc.requires_grad_(True)
    logits.requires_grad_(True)
    loss = SSDLoss(DEFAULTS, VARIANCES)(loc, logits, boxes, labels)
    assert torch.isfinite(loss.total) and loss.total.item() == 0.0
    loss.total.backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(logits.grad).all()


def test_loss_gradients_are_finite_with_padding_rows():
    boxes, labels = random_batch(7, [1, 6])
    loc, logits = head_outputs(2, 2)
    loc.requires_grad_(True)
    logits.requires_grad_(True)
    SSDLoss(DEFAULTS, VARIANCES)(loc, logits, boxes, labels).total.backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(logits.grad).all()
    assert loc.grad.abs().sum() > 0
