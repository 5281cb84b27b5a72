import math

import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from model.config import TORCHVISION_STEPS, ModelConfig
from model.default_boxes import boxes_per_location, default_boxes, feature_map_sizes

CONFIG = ModelConfig(num_classes=2)


def test_ssd300_has_8732_default_boxes_on_38_19_10_5_3_1_maps():
    sizes = feature_map_sizes(300)
    assert sizes == [38, 19, 10, 5, 3, 1]
    assert boxes_per_location(CONFIG.aspect_ratios) == [4, 6, 6, 6, 4, 4]
    assert default_boxes(sizes, CONFIG.scales, CONFIG.aspect_ratios).shape == (8732, 4)


def test_default_boxes_equal_torchvisions_generator_with_the_same_scales_and_ratios():
    for image_size in (300, 268, 512):
        sizes = feature_map_sizes(image_size)
        ours = default_boxes(sizes, CONFIG.scales, CONFIG.aspect_ratios)
        generator = DefaultBoxGenerator([list(r) for r in CONFIG.aspect_ratios], scales=list(CONFIG.scales))
        theirs = generator._grid_default_boxes([[s, s] for s in sizes], [image_size, image_size])
        torch.testing.assert_close(ours, theirs)


def test_default_boxes_follow_the_papers_formula_by_hand():
    sizes = feature_map_sizes(300)
    boxes = default_boxes(sizes, CONFIG.scales, CONFIG.aspect_ratios, dtype=torch.float64)
    # First box: cell (0, 0) of the 38x38 map, aspect ratio 1, scale s_0.
    torch.testing.assert_close(boxes[0], torch.tensor([0.5 / 38, 0.5 / 38, 0.07, 0.07], dtype=torch.float64))
    # Second: scale sqrt(s_0 s_1); third and fourth: ratio 2 and 1/2.
    s_prime = math.sqrt(0.07 * 0.15)
    torch.testing.assert_close(boxes[1, 2:], torch.tensor([s_prime, s_prime], dtype=torch.float64))
    r = math.sqrt(2)
    torch.testing.assert_close(boxes[2, 2:], torch.tensor([0.07 * r, 0.07 / r], dtype=torch.float64))
    torch.testing.assert_close(boxes[3, 2:], torch.tensor([0.07 / r, 0.07 * r], dtype=torch.float64))
    # Cell (row 2, column 5) of the 19x19 map, its ratio-3 box (index 4 of 6 per cell).
    first_19 = 38 * 38 * 4
    box = boxes[first_19 + (2 * 19 + 5) * 6 + 4]
    expected = [5.5 / 19, 2.5 / 19, 0.15 * math.sqrt(3), 0.15 / math.sqrt(3)]
    torch.testing.assert_close(box, torch.tensor(expected, dtype=torch.float64))
    # The last map's single cell: s'_5 = sqrt(0.87 * 1.05), and its 2:1 box is clipped to the image.
    s_prime_last = math.sqrt(0.87 * 1.05)
    torch.testing.assert_close(boxes[-3, 2:], torch.tensor([s_prime_last, s_prime_last], dtype=torch.float64))
    torch.testing.assert_close(boxes[-2, 2:], torch.tensor([1.0, 0.87 / r], dtype=torch.float64))


def test_default_boxes_follow_device_and_dtype():
    boxes = default_boxes([2, 1], (0.2, 0.5, 0.9), ((2,), (2,)), dtype=torch.float64, device="cpu")
    assert boxes.dtype == torch.float64 and boxes.shape == (2 * 2 * 4 + 4, 4)


def test_default_boxes_with_steps_equal_torchvisions_ssd300_generator():
    # torchvision's COCO SSD300 spaces the centres by its steps: 38 x 8 = 304 pixels, not 300.
    sizes = feature_map_sizes(300)
    ours = default_boxes(sizes, CONFIG.scales, CONFIG.aspect_ratios, steps=TORCHVISION_STEPS, image_size=300)
    generator = DefaultBoxGenerator(
        [list(r) for r in CONFIG.aspect_ratios], scales=list(CONFIG.scales), steps=list(TORCHVISION_STEPS)
    )
    theirs = generator._grid_default_boxes([[s, s] for s in sizes], [300, 300])
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, default_boxes(sizes, CONFIG.scales, CONFIG.aspect_ratios))
