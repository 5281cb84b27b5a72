"""mAP overall and per class, checked against torchmetrics' own per-class evaluation; matching class names."""

import logging
from dataclasses import replace
from typing import ClassVar

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from model.data import make_shapes_dataset
from model.metrics import ClassMismatchError, MeanAP, class_id_map, evaluate_detector


def _detections(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _reference_per_class(preds: list[dict], targets: list[dict], iou_thresholds=None) -> dict[int, float]:
    """torchmetrics' per-class AP (``class_metrics=True``: one COCO evaluation per class): class id -> AP."""
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True, iou_thresholds=iou_thresholds
    )
    metric.update(preds, targets)
    result = metric.compute()
    classes, ap = result["classes"].reshape(-1).tolist(), result["map_per_class"].reshape(-1).tolist()  # 0-d for one
    return dict(zip(classes, ap, strict=True))


def _scores(preds: list[dict], targets: list[dict], num_classes: int) -> dict:
    """``MeanAP`` over the same images, fed as ``engine.evaluate`` feeds it (padded ground truth)."""
    metric = MeanAP(num_classes)
    gt_boxes = torch.nn.utils.rnn.pad_sequence([t["boxes"] for t in targets], batch_first=True)
    gt_labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    metric.update(preds, gt_boxes, gt_labels)
    return metric.compute()


def _assert_matches_reference(preds, targets, num_classes):
    scores = _scores(preds, targets, num_classes)
    ap = _reference_per_class(preds, targets)
    ap50 = _reference_per_class(preds, targets, iou_thresholds=[0.5])
    for class_id, figures in scores["per_class"].items():
        # The reference says -1 for a class without ground truth, and leaves out classes never seen.
        for ours, theirs in ((figures["ap"], ap.get(class_id, -1)), (figures["ap50"], ap50.get(class_id, -1))):
            assert (ours is None) == (theirs < 0), (class_id, ours, theirs)
            if ours is not None:
                assert ours == pytest.approx(theirs, abs=1e-6), class_id
    return scores


def test_per_class_ap_by_hand():
    # Class 1: two boxes, both found (one of them at a looser IoU); class 2: one box, never found;
    # class 3: detected but absent from the ground truth; class 4: not there at all.
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 100, 100], [200, 200, 300, 300]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10, 60, 60]]), "labels": torch.tensor([1])},
    ]
    preds = [
        _detections([[0, 0, 100, 100], [150, 0, 200, 50]], [0.9, 0.8], [1, 3]),
        _detections([[10, 10, 60, 75]], [0.7], [1]),  # IoU 50*50 / (50*65) = 0.77: counts at 0.5 to 0.75
    ]
    scores = _assert_matches_reference(preds, targets, num_classes=4)
    per_class = scores["per_class"]
    assert per_class[1]["ap50"] == pytest.approx(1.0)
    assert 0.5 < per_class[1]["ap"] < 1.0
    assert per_class[2] == {"ap50": 0.0, "ap": 0.0, "num_boxes": 1}
    assert per_class[3] == {"ap50": None, "ap": None, "num_boxes": 0}
    assert per_class[4] == {"ap50": None, "ap": None, "num_boxes": 0}
    assert per_class[1]["num_boxes"] == 2
    # COCO's mAP is the mean over the classes with ground truth.
    assert scores["map50"] == pytest.approx((per_class[1]["ap50"] + per_class[2]["ap50"]) / 2)
    assert scores["map"] == pytest.approx((per_class[1]["ap"] + per_class[2]["ap"]) / 2)


def test_per_class_ap_on_random_boxes_matches_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(12):
        n = int(torch.randint(0, 6, (), generator=generator))
        corner = torch.rand(n, 2, generator=generator) * 200
        boxes = torch.cat([corner, corner + 20 + torch.rand(n, 2, generator=generator) * 80], dim=1)
        labels = torch.randint(1, 6, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        # Jittered copies of the truth (some with the wrong class) and some stray boxes.
        jittered = boxes + torch.randn(boxes.shape, generator=generator) * 8
        wrong = torch.where(torch.rand(n, generator=generator) < 0.2, labels % 5 + 1, labels)
        stray_corner = torch.rand(5, 2, generator=generator) * 200
        stray = torch.cat([stray_corner, stray_corner + 30], dim=1)
        preds.append(
            {
                "boxes": torch.cat([jittered, stray]),
                "scores": torch.rand(n + 5, generator=generator),
                "labels": torch.cat([wrong, torch.randint(1, 6, (5,), generator=generator)]),
            }
        )
    scores = _assert_matches_reference(preds, targets, num_classes=5)
    assert sum(c["num_boxes"] for c in scores["per_class"].values()) == sum(len(t["labels"]) for t in targets)


def test_a_single_class_seen():
    targets = [{"boxes": torch.tensor([[0.0, 0, 50, 50]]), "labels": torch.tensor([2])}]
    preds = [_detections([[0, 0, 50, 50]], [0.9], [2])]
    scores = _assert_matches_reference(preds, targets, num_classes=2)
    assert scores["per_class"][2]["ap50"] == pytest.approx(1.0) and scores["per_class"][1]["ap50"] is None


def test_nothing_to_score_gives_none():
    scores = MeanAP(2).compute()
    assert scores == {
        "map50": None,
        "map": None,
        "per_class": {1: {"ap50": None, "ap": None, "num_boxes": 0}, 2: {"ap50": None, "ap": None, "num_boxes": 0}},
    }


def test_class_names_are_matched_in_any_order():
    mapping = class_id_map(["triangle", "circle", "square"], ["circle", "square", "triangle"])
    assert mapping.tolist() == [0, 3, 1, 2]  # dataset label 1 (triangle) is the model's 3; 0 stays padding


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        (["circle", "square"], ["missing from the dataset: triangle"]),
        (["circle", "square", "triangle", "star"], ["not classes of the model: star"]),
        (["disc", "square", "triangle"], ["missing from the dataset: circle", "not classes of the model: disc"]),
        (["circle", "square", "triangle", "circle"], ["named more than once in the dataset: circle"]),
    ],
)
def test_different_class_names_are_named(dataset, words):
    with pytest.raises(ClassMismatchError) as caught:
        class_id_map(dataset, ["circle", "square", "triangle"])
    for word in words:
        assert word in str(caught.value)


class _TruthDetector:
    """Answers each batch with the model-id ground truth of the next images: a perfect detector."""

    classes: ClassVar[list[str]] = ["circle", "square", "triangle"]

    def __init__(self, images):
        self._truth = iter(images)

    def predict(self, pictures, score_threshold, max_detections):
        found = []
        for picture, record in zip(pictures, self._truth, strict=False):
            assert picture.size == (record.width, record.height)
            found.append({"boxes": record.boxes, "scores": torch.ones(len(record.labels)), "labels": record.labels})
        return found


def test_evaluate_detector_moves_the_datasets_labels_onto_the_models_ids(tmp_path):
    data = make_shapes_dataset(tmp_path, num_images=5, seed=3, image_size=(64, 96))
    # The same images, their classes listed in another order: each label renumbered to match.
    order = ["triangle", "circle", "square"]
    new_label = torch.tensor([0, *(order.index(name) + 1 for name in data.classes)])
    relabelled = [replace(image, labels=new_label[image.labels]) for image in data.images]

    scores = evaluate_detector(_TruthDetector(data.images), relabelled, batch_size=2, dataset_classes=order)
    assert scores["num_images"] == 5 and scores["map50"] == pytest.approx(1.0)
    assert [c["label"] for c in scores["per_class"]] == ["circle", "square", "triangle"]
    for class_id, figures in enumerate(scores["per_class"], start=1):
        assert figures["num_boxes"] == sum(int((image.labels == class_id).sum()) for image in data.images)
        assert figures["ap50"] == pytest.approx(1.0) or figures["num_boxes"] == 0

    # Taken as the model's own order, the same labels name the wrong classes.
    unmatched = evaluate_detector(_TruthDetector(data.images), relabelled, batch_size=2)
    assert unmatched["map50"] < 0.5


def test_validation_scores_with_faster_coco_eval_checked_against_pycocotools_above(caplog):
    # The tests above hold MeanAP (on this backend) to torchmetrics' pycocotools evaluation.
    from model.metrics import COCO_BACKEND

    assert COCO_BACKEND == "faster_coco_eval"
    caplog.set_level(logging.INFO)
    targets = [{"boxes": torch.tensor([[0.0, 0, 50, 50]]), "labels": torch.tensor([1])}]
    _scores([_detections([[0, 0, 50, 50]], [0.9], [1])], targets, num_classes=1)
    assert not [r for r in caplog.records if "Average Precision" in r.getMessage()]  # no summary table in the logs
