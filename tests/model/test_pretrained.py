"""torchvision's published weights in this network: names, the state dict mapping, class rows, the COCO model.

The files are made by torchvision's own constructors (``weights=None``), so they have the published
layout; the checks compare against torchvision's ``ssd300_vgg16`` running the same tensors.
"""

import re

import pytest
import torch
from torchvision.models.detection import ssd300_vgg16

from model.config import TORCHVISION_STEPS, ModelConfig
from model.detector import Detector, load_model
from model.network import SSD300
from model.pretrained import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCO_WEIGHTS,
    IMAGENET_WEIGHTS,
    WeightsError,
    coco_model,
    load_ssd_weights,
    match_class_rows,
    read_state_dict,
    ssd_state_from_torchvision,
)
from tests.support.pretrained_files import published_state


@pytest.fixture(scope="module")
def coco_state(published):
    return read_state_dict(published.path(COCO_WEIGHTS))


def torchvision_outputs(tv_model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's head outputs for 300x300 images in 0-1 (its transform is the identity at that size)."""
    transformed, _ = tv_model.transform(list(images))
    features = list(tv_model.backbone(transformed.tensors).values())
    return tv_model.head(features)


def test_the_published_files_carry_their_hash_in_their_names():
    names = {w.file_name: w.sha256_prefix for w in (COCO_WEIGHTS, *IMAGENET_WEIGHTS.values())}
    assert names == {
        "ssd300_vgg16_coco-b556d3b4.pth": "b556d3b4",
        "vgg16_features-amdegroot-88682ab5.pth": "88682ab5",
        "vgg16_bn-6c64b313.pth": "6c64b313",
    }
    assert COCO_WEIGHTS.backbone == IMAGENET_WEIGHTS["vgg16"].backbone == "vgg16"


def test_coco_has_80_category_names_and_91_class_ids():
    assert len(COCO_CATEGORY_IDS) == 91 and COCO_CATEGORY_IDS[0] == "__background__"
    assert len(COCO_CLASSES) == 80 and "N/A" not in COCO_CLASSES
    assert COCO_CLASSES[:3] == ("person", "bicycle", "car") and COCO_CLASSES[-1] == "toothbrush"


def test_class_rows_are_matched_by_name_ignoring_case_and_spaces():
    rows = match_class_rows(COCO_CATEGORY_IDS[1:], ["Person", "TrafficLight", "widget", "n/a", "hair  drier"])
    assert rows == [0, 1, COCO_CATEGORY_IDS.index("traffic light"), None, None, COCO_CATEGORY_IDS.index("hair drier")]
    assert match_class_rows(["cat", "dog"], ["dog", "bird"]) == [0, 2, None]


@pytest.mark.slow
def test_torchvisions_ssd_state_dict_maps_to_ours_with_equal_outputs():
    torch.manual_seed(0)
    tv_model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=5).eval()
    ours = SSD300(ModelConfig(num_classes=5, backbone="vgg16", steps=TORCHVISION_STEPS)).eval()
    state, num_classes = ssd_state_from_torchvision(tv_model.state_dict())
    assert num_classes == 5
    ours.load_state_dict(state)

    images = torch.rand(2, 3, 300, 300)
    with torch.no_grad():
        loc, logits = ours(images)
        theirs = torchvision_outputs(tv_model, images)
    torch.testing.assert_close(loc, theirs["bbox_regression"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, theirs["cls_logits"], rtol=1e-4, atol=1e-4)
    transformed, _ = tv_model.transform(list(images))
    anchors = tv_model.anchor_generator(transformed, list(tv_model.backbone(transformed.tensors).values()))[0]
    torch.testing.assert_close(ours.defaults, anchors_as_centre_size(anchors) / 300, rtol=1e-5, atol=1e-5)


def anchors_as_centre_size(anchors: torch.Tensor) -> torch.Tensor:
    return torch.cat([(anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2:] - anchors[:, :2]], dim=1)


@pytest.mark.slow
def test_coco_weights_start_every_layer_and_the_rows_of_coco_named_classes(coco_state):
    classes = ["Person", "traffic light", "widget"]
    ours_state, num_classes = ssd_state_from_torchvision(coco_state)
    torch.manual_seed(1)
    model = SSD300(ModelConfig(num_classes=4, backbone="vgg16", steps=TORCHVISION_STEPS)).eval()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_ssd_weights(model, ours_state, num_classes, match_class_rows(COCO_CATEGORY_IDS[1:], classes))
    tv_model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    tv_model.load_state_dict(coco_state)

    images = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        loc, logits = model(images)
        theirs = torchvision_outputs(tv_model, images)
    torch.testing.assert_close(loc, theirs["bbox_regression"], rtol=1e-4, atol=1e-4)
    coco_rows = [0, 1, COCO_CATEGORY_IDS.index("traffic light")]  # background, person, traffic light
    torch.testing.assert_close(logits[..., :3], theirs["cls_logits"][..., coco_rows], rtol=1e-4, atol=1e-4)
    # "widget" is no COCO category: its row of each head keeps the new model's initial weights.
    for i, boxes in enumerate(model.boxes_per_location):
        for name in ("weight", "bias"):
            rows = getattr(model.heads[i], name).view(boxes, 8, -1)[:, 7]
            assert torch.equal(rows, fresh[f"heads.{i}.{name}"].view(boxes, 8, -1)[:, 7])


@pytest.mark.slow
def test_the_coco_detector_equals_torchvisions_ssd300_with_the_same_weights(coco_state):
    state = {k: v.clone() for k, v in coco_state.items()}
    unused = [i for i, name in enumerate(COCO_CATEGORY_IDS) if name == "N/A"]
    for i in range(6):
        weight, bias = (state[f"head.classification_head.module_list.{i}.{n}"] for n in ("weight", "bias"))
        # The random backbone's activations are large (inputs are 0-255 less the mean): a tenth of the
        # head's random weights spreads the scores below 1 instead of saturating them, so no ties decide the order.
        weight *= 0.1
        # A trained head never scores COCO's unused ids (no box ever had one); here they are made so,
        # so that the served model's softmax over 81 classes equals torchvision's over 91.
        bias.view(-1, 91)[:, unused] = -1e4
    tv_model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    tv_model.load_state_dict(state)
    tv_model.score_thresh = 0.05
    detector = Detector(coco_model(state), list(COCO_CLASSES), "cpu", topk_candidates=400, amp=False)

    torch.manual_seed(0)
    images = [torch.rand(3, 300, 300) for _ in range(2)]
    with torch.no_grad():
        theirs = tv_model(images)
    ours = detector.predict(images, score_threshold=0.05, max_detections=200)
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(reference["scores"]) > 10
        torch.testing.assert_close(mine["scores"], reference["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine["boxes"], reference["boxes"], rtol=1e-4, atol=1e-3)
        names = [COCO_CLASSES[c - 1] for c in mine["labels"].tolist()]
        assert names == [COCO_CATEGORY_IDS[c] for c in reference["labels"].tolist()]


def test_the_published_coco_file_loads_as_a_detector(published):
    model, classes = load_model(published.path(COCO_WEIGHTS))
    assert classes == list(COCO_CLASSES) and model.config.steps == TORCHVISION_STEPS
    assert model.config.backbone == "vgg16" and model.num_classes == 81


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn"])
def test_imagenet_files_load_into_the_backbone(published, backbone):
    state = read_state_dict(published.path(IMAGENET_WEIGHTS[backbone]))
    model = SSD300(ModelConfig(num_classes=2, backbone=backbone))
    model.load_vgg_weights(state)
    torch.testing.assert_close(model.features[0].weight, state["features.0.weight"])
    conv5_1 = "features.24.weight" if backbone == "vgg16" else "features.34.weight"
    torch.testing.assert_close(model.extra[0][1].weight, state[conv5_1])


def test_files_that_are_not_the_weights_they_claim_are_errors_naming_them(tmp_path, coco_state):
    corrupt = tmp_path / COCO_WEIGHTS.file_name
    corrupt.write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(WeightsError, match=re.escape(str(corrupt))):
        read_state_dict(corrupt)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not torchvision's SSD300-VGG16"):
        ssd_state_from_torchvision(published_state(IMAGENET_WEIGHTS["vgg16_bn"]))
    ours, num_classes = ssd_state_from_torchvision(coco_state)
    with pytest.raises(WeightsError, match="do not fit vgg16_bn"):
        load_ssd_weights(SSD300(ModelConfig(num_classes=2)), ours, num_classes, [0, 1])
    with pytest.raises(WeightsError, match=re.escape("do not fit vgg16 at width 0.5")):
        narrow = SSD300(ModelConfig(num_classes=2, backbone="vgg16", width_multiplier=0.5))
        load_ssd_weights(narrow, ours, num_classes, [0, 1])
