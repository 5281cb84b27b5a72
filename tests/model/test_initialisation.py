"""Where a run's weights start: auto's choice and its notes, explicit choices, earlier runs, frozen layers,
resuming, and patience."""

import re
from contextlib import contextmanager

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import TORCHVISION_STEPS, ModelConfig, TrainConfig
from model.data import make_shapes_dataset
from model.initialisation import LocalWeights, WeightsUnavailable, plan_start
from model.network import SSD300
from model.pretrained import COCO_WEIGHTS, IMAGENET_WEIGHTS, WeightsError, read_state_dict
from model.training import Callbacks, fit
from model.training.fit import _out_of_patience

CLASSES = ["person", "widget"]


class UntouchableWeights:
    """A weights source that fails any test that asks it for a file."""

    @contextmanager
    def published(self, weights, may_download):
        raise AssertionError(f"{weights.file_name} was asked for")
        yield

    @contextmanager
    def checkpoint(self, reference):
        raise AssertionError(f"{reference} was asked for")
        yield


def test_auto_takes_coco_then_imagenet_then_scratch_saying_why(published, tmp_path):
    everything = LocalWeights(published.folder_with(tmp_path / "all", COCO_WEIGHTS, IMAGENET_WEIGHTS["vgg16_bn"]))
    start = plan_start(TrainConfig(), CLASSES, everything)
    assert (start.init.asked, start.init.used, start.init.note) == ("auto", "coco", None)
    assert start.config.backbone == "vgg16" and start.config.init == "coco" and start.steps == TORCHVISION_STEPS
    assert start.config.resolved_frozen_layers == 10 and start.load is not None

    imagenet_only = LocalWeights(published.folder_with(tmp_path / "imagenet", IMAGENET_WEIGHTS["vgg16_bn"]))
    start = plan_start(TrainConfig(), CLASSES, imagenet_only)
    assert start.init.used == "imagenet" and start.config.backbone == "vgg16_bn" and start.steps is None
    assert COCO_WEIGHTS.file_name in start.init.note and "is not in" in start.init.note

    start = plan_start(TrainConfig(), CLASSES, LocalWeights(tmp_path / "empty"))
    assert start.init.used == "scratch" and start.config.init == "scratch" and start.load is None
    assert "COCO weights" in start.init.note and "ImageNet vgg16_bn weights" in start.init.note
    assert start.config.resolved_frozen_layers == 0

    # A backbone asked for narrows the choice: COCO's weights are vgg16's.
    start = plan_start(TrainConfig(backbone="vgg16_bn"), CLASSES, everything)
    assert start.init.used == "imagenet" and start.config.backbone == "vgg16_bn"


def test_auto_at_another_width_or_without_a_folder_starts_from_scratch_without_asking():
    start = plan_start(TrainConfig(width_multiplier=0.25), CLASSES, UntouchableWeights())
    assert start.init.used == "scratch" and "width_multiplier 1.0" in start.init.note
    assert plan_start(TrainConfig(), CLASSES, None).init.note == "no weights folder was given"


def test_explicit_choices_the_weights_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="init 'coco' needs the vgg16 backbone"):
        TrainConfig(init="coco", backbone="vgg16_bn")
    with pytest.raises(ValueError, match=re.escape("init 'imagenet' needs width_multiplier 1.0")):
        TrainConfig(init="imagenet", width_multiplier=0.5)
    for bad in ("coco2", "job:", "job:has space", "", "JOB:x"):
        with pytest.raises(ValueError, match="init"):
            TrainConfig(init=bad)
    assert TrainConfig(pretrained_backbone="imagenet").init == "imagenet"  # the synonym
    with pytest.raises(ValueError, match="contradicts init 'coco'"):
        TrainConfig(pretrained_backbone="imagenet", init="coco")
    with pytest.raises(ValueError, match="only 'imagenet'"):
        TrainConfig(pretrained_backbone="/etc/passwd")
    with pytest.raises(ValueError, match="patience needs a validation split"):
        TrainConfig(patience=3, val_fraction=0)


def test_explicit_weights_that_are_missing_or_do_not_load_fail_naming_the_file(published, tmp_path):
    with pytest.raises(WeightsUnavailable, match=re.escape("vgg16_bn-6c64b313.pth is not in")):
        plan_start(TrainConfig(init="imagenet"), CLASSES, LocalWeights(tmp_path))
    with pytest.raises(WeightsUnavailable, match="no weights folder"):
        plan_start(TrainConfig(init="coco"), CLASSES, None)
    # Present but not what the name says: an error, under auto too (never a quiet start from random).
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / COCO_WEIGHTS.file_name).symlink_to(published.path(IMAGENET_WEIGHTS["vgg16_bn"]))
    with pytest.raises(WeightsError, match=f"{wrong / COCO_WEIGHTS.file_name}.*not torchvision's SSD300"):
        plan_start(TrainConfig(), CLASSES, LocalWeights(wrong))
    (wrong / IMAGENET_WEIGHTS["vgg16"].file_name).write_bytes(b"half a download")
    with pytest.raises(WeightsError, match="not a readable weights file"):
        plan_start(TrainConfig(init="imagenet", backbone="vgg16"), CLASSES, LocalWeights(wrong))


def tiny_checkpoint(path, classes, backbone="vgg16_bn", width=0.125, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(num_classes=len(classes) + 1, backbone=backbone, width_multiplier=width)
    model = SSD300(config)
    save_checkpoint(
        path, {"epoch": 1, "classes": classes, "model_config": config.to_dict(), "model": model.state_dict()}
    )
    return model


def test_a_job_start_loads_everything_and_matches_class_rows_by_name(tmp_path):
    source = tiny_checkpoint(tmp_path / "run" / "best.pt", ["cat", "dog", "bird"], backbone="vgg16")
    config = TrainConfig(init=f"job:{tmp_path / 'run'}", width_multiplier=0.125)
    start = plan_start(config, ["Dog", "fish", "cat"], LocalWeights(tmp_path / "weights"))
    assert start.init.used == start.init.asked == config.init and start.init.note is None
    assert start.config.backbone == "vgg16" and start.config.resolved_frozen_layers == 0  # nothing frozen
    torch.manual_seed(5)
    model = SSD300(start.model_config(num_classes=4))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    start.load(model)
    for key, value in source.state_dict().items():
        if not key.startswith("heads."):
            assert torch.equal(model.state_dict()[key], value), key
    for i, boxes in enumerate(model.boxes_per_location):
        new = model.heads[i].weight.view(boxes, 8, -1)
        old = source.heads[i].weight.view(boxes, 8, -1)  # [4 offsets, background, cat, dog, bird]
        assert torch.equal(new[:, :5], old[:, :5])  # offsets and background
        assert torch.equal(new[:, 5], old[:, 6])  # Dog <- dog
        assert torch.equal(new[:, 6], fresh[f"heads.{i}.weight"].view(boxes, 8, -1)[:, 6])  # fish: new
        assert torch.equal(new[:, 7], old[:, 5])  # cat <- cat (bird is dropped)


def test_a_job_start_of_another_architecture_is_refused(tmp_path):
    tiny_checkpoint(tmp_path / "run" / "best.pt", ["cat"])
    weights = LocalWeights(tmp_path)
    with pytest.raises(ValueError, match=re.escape("width_multiplier 0.125, not 1.0")):
        plan_start(TrainConfig(init=f"job:{tmp_path / 'run'}"), ["cat"], weights)
    with pytest.raises(ValueError, match="backbone vgg16_bn, not vgg16"):
        plan_start(
            TrainConfig(init=f"job:{tmp_path / 'run'}", backbone="vgg16", width_multiplier=0.125), ["cat"], weights
        )
    with pytest.raises(WeightsUnavailable, match="no checkpoint at"):
        plan_start(TrainConfig(init=f"job:{tmp_path / 'nothing'}"), ["cat"], weights)


@pytest.fixture(scope="module")
def coco_run(published, tmp_path_factory):
    """One epoch (one step) of a full-width SSD300 started from the COCO file, on two small images."""
    data = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=2, seed=0, image_size=(120, 160))
    weights = LocalWeights(published.folder_with(tmp_path_factory.mktemp("weights"), COCO_WEIGHTS))
    config = TrainConfig(epochs=1, batch_size=2, val_fraction=0, num_workers=0, warmup_steps=0, augment=False)
    run_dir = tmp_path_factory.mktemp("coco-run")
    starts = []
    result = fit(config, data, run_dir, Callbacks(on_start=starts.append), weights)
    return {"data": data, "config": config, "run_dir": run_dir, "result": result, "start": starts[0]}


@pytest.mark.slow
def test_frozen_layers_stay_bit_identical_after_an_epoch_from_coco(published, coco_run):
    tv_state = read_state_dict(published.path(COCO_WEIGHTS))
    trained = load_checkpoint(coco_run["run_dir"] / "last.pt")["model"]
    frozen_keys = [k for k in trained if k.startswith("features.") and int(k.split(".")[1]) < 10]
    assert len(frozen_keys) == 8  # weight and bias of conv1_1, conv1_2, conv2_1, conv2_2
    for key in frozen_keys:
        assert torch.equal(trained[key], tv_state[f"backbone.{key}"]), key
    assert not torch.equal(trained["features.10.weight"], tv_state["backbone.features.10.weight"])  # conv3_1 learnt
    assert coco_run["result"].init.used == "coco" and coco_run["start"].config.backbone == "vgg16"


@pytest.mark.slow
def test_a_resumed_run_keeps_how_it_started_without_the_weights(coco_run, tmp_path):
    resumed = fit(
        TrainConfig(**{**coco_run["config"].to_dict(), "epochs": 2}),
        coco_run["data"],
        coco_run["run_dir"],
        weights=UntouchableWeights(),
    )
    assert resumed.status == "completed" and resumed.epochs_completed == 2
    assert resumed.init == coco_run["result"].init and resumed.init.used == "coco"
    checkpoint = load_checkpoint(coco_run["run_dir"] / "last.pt")
    assert checkpoint["init"] == {"init": "auto", "init_used": "coco", "init_note": None}
    assert tuple(checkpoint["model_config"]["steps"]) == TORCHVISION_STEPS


def history(*scores):
    return [{"epoch": i, "val_map50": s} for i, s in enumerate(scores, start=1)]


def test_patience_counts_epochs_without_a_better_validation_map():
    assert _out_of_patience(history(0.1, 0.2, 0.2), 2) is None  # a tie is no better, but only one epoch since
    note = _out_of_patience(history(0.1, 0.3, 0.2, 0.3), 2)
    assert note.startswith("stopped early after epoch 4") and "epoch 2's 0.3000" in note and "patience 2" in note
    assert _out_of_patience(history(0.1, 0.3, 0.2, 0.3), None) is None
    assert _out_of_patience(history(None, None), 1) is not None  # nothing measurable is no improvement


def test_patience_ends_a_run_early_as_completed_with_a_note(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", num_images=6, seed=0, image_size=(120, 160))
    # A learning rate this small changes nothing the validation mAP@0.5 can see.
    config = TrainConfig(
        epochs=6, patience=1, learning_rate=1e-9, val_fraction=0.5, width_multiplier=0.125, num_workers=0, batch_size=3
    )
    result = fit(config, data, tmp_path / "run")
    assert result.status == "completed" and result.epochs_completed == 2
    assert result.note.startswith("stopped early after epoch 2")
