import torch
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_convert

from model.boxes import encode
from model.config import ModelConfig
from model.default_boxes import default_boxes, feature_map_sizes
from model.postprocess import postprocess

CONFIG = ModelConfig(num_classes=4)
DEFAULTS = default_boxes(feature_map_sizes(300), CONFIG.scales, CONFIG.aspect_ratios)


def test_postprocess_equals_torchvisions_ssd_postprocessing():
    generator = torch.Generator().manual_seed(0)
    batch, num_classes = 3, 4
    loc = torch.randn(batch, 8732, 4, generator=generator) * 0.5
    logits = torch.randn(batch, 8732, num_classes, generator=generator) * 1.5  # no saturated ties
    original_sizes = [(480, 640), (300, 300), (1000, 250)]  # (height, width)

    ours = postprocess(loc, logits, DEFAULTS, torch.tensor([[w, h] for h, w in original_sizes]), score_threshold=0.2)

    tv_model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    tv_model.score_thresh = 0.2
    anchors = [box_convert(DEFAULTS, "cxcywh", "xyxy") * 300] * batch
    theirs = tv_model.postprocess_detections(
        {"bbox_regression": loc, "cls_logits": logits}, anchors, [(300, 300)] * batch
    )
    theirs = tv_model.transform.postprocess(theirs, [(300, 300)] * batch, original_sizes)

    for mine, tv in zip(ours, theirs, strict=True):
        assert len(mine["boxes"]) == len(tv["boxes"]) == 200
        torch.testing.assert_close(mine["scores"], tv["scores"])
        torch.testing.assert_close(mine["labels"], tv["labels"])
        torch.testing.assert_close(mine["boxes"], tv["boxes"], rtol=1e-4, atol=1e-3)


def confident_logits(num_classes: int, hits: dict[int, int]) -> torch.Tensor:
    """Logits Tensor[A, C] that are background everywhere except ``{default index: class}``."""
    logits = torch.zeros(DEFAULTS.shape[0], num_classes)
    logits[:, 0] = 10.0
    for index, label in hits.items():
        logits[index] = 0.0
        logits[index, label] = 10.0
    return logits


def test_a_known_box_maps_back_to_a_non_square_images_pixels():
    width, height = 640, 360
    box_pixels = torch.tensor([[64.0, 36.0, 320.0, 270.0]])  # in the 640x360 original
    relative = box_pixels / torch.tensor([width, height, width, height])
    index = 1234
    loc = torch.zeros(1, 8732, 4)
    loc[0, index] = encode(relative[None], DEFAULTS[index : index + 1], CONFIG.variances)[0, 0]
    logits = confident_logits(3, {index: 2})[None]

    (detections,) = postprocess(loc, logits, DEFAULTS, torch.tensor([[width, height]]), score_threshold=0.5)
    assert detections["labels"].tolist() == [2]
    torch.testing.assert_close(detections["boxes"], box_pixels, rtol=0, atol=1e-3)
    assert detections["scores"][0] > 0.99


def test_max_detections_sorting_and_empty_images():
    # Image 0: three separate confident boxes; image 1: nothing above the threshold.
    far_apart = [0, 38 * 38 * 4 - 4, 38 * 38 * 2]
    logits = torch.stack([confident_logits(3, {i: 1 for i in far_apart}), confident_logits(3, {})])
    logits[0, far_apart[1], 1] = 8.0  # a slightly lower score
    loc = torch.zeros(2, 8732, 4)
    sizes = torch.tensor([[300, 300], [100, 50]])

    full, empty = postprocess(loc, logits, DEFAULTS, sizes, score_threshold=0.5)
    assert len(full["boxes"]) == 3 and len(empty["boxes"]) == 0
    assert empty["boxes"].shape == (0, 4)
    assert torch.all(full["scores"][:-1] >= full["scores"][1:])

    capped, _ = postprocess(loc, logits, DEFAULTS, sizes, score_threshold=0.5, max_detections=2)
    torch.testing.assert_close(capped["scores"], full["scores"][:2])


def test_a_batch_with_nothing_above_the_threshold_gives_empty_results():
    loc, logits = torch.zeros(2, 8732, 4), torch.stack([confident_logits(3, {}), confident_logits(3, {})])
    results = postprocess(loc, logits, DEFAULTS, torch.tensor([[10, 10], [20, 20]]), score_threshold=0.5)
    assert [len(r["boxes"]) for r in results] == [0, 0]
    assert results[0]["boxes"].shape == (0, 4) and results[0]["labels"].dtype == torch.int64
