"""Training end to end on CPU: overfitting a tiny set, checkpoints, resume, cancel, divergence."""

import json
import re

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from model.checkpoint import CheckpointError, load_checkpoint
from model.config import TrainConfig
from model.detector import Detector, load_model
from model.initialisation import LocalWeights, plan_start
from model.pretrained import IMAGENET_WEIGHTS
from model.training import Callbacks, NonFiniteLossError, build_model, build_optimizer, fit
from tests.support.tiny import TINY


def test_overfitting_a_tiny_set_drives_the_loss_down(overfitted):
    result, _ = overfitted
    losses = [r["train_loss"] for r in result.history]
    assert result.status == "completed" and result.epochs_completed == 40
    assert [r["epoch"] for r in result.history] == list(range(1, 41))
    assert min(losses[-5:]) < 0.15 * losses[0]


def test_the_overfitted_detector_finds_the_drawn_objects(overfitted, shapes):
    result, _ = overfitted
    detector = Detector.from_checkpoint(result.best_checkpoint, device="cpu")
    assert detector.classes == ["circle", "square", "triangle"]
    images = [Image.open(image.path) for image in shapes.images]
    found = detector.predict(images, score_threshold=0.3)
    hits = 0
    for truth, detections in zip(shapes.images, found, strict=True):
        iou = box_iou(truth.boxes, detections["boxes"])
        same_class = truth.labels[:, None] == detections["labels"][None, :]
        hits += int(((iou >= 0.5) & same_class).any(dim=1).sum())
    assert hits >= 0.8 * shapes.num_boxes


def test_detect_gives_json_ready_boxes_inside_each_image_sorted_by_score(overfitted, shapes):
    result, _ = overfitted
    detector = Detector.from_checkpoint(result.best_checkpoint, device="cpu")
    images = [Image.open(image.path) for image in shapes.images[:3]]
    for image, detections in zip(images, detector.detect(images, score_threshold=0.2), strict=True):
        assert detections, "the trained detector should find something in a training image"
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            assert d["label"] == detector.classes[d["class_id"] - 1]


def test_run_folder_holds_config_metrics_plot_and_checkpoints(overfitted):
    _, run_dir = overfitted
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 41))
    assert json.loads((run_dir / "config.json").read_text())["classes"] == ["circle", "square", "triangle"]
    assert (run_dir / "losses.png").read_bytes().startswith(b"\x89PNG")
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 40 and state["optimizer"]["state"]


def test_checkpoint_round_trip_gives_identical_outputs(overfitted):
    result, _ = overfitted
    state = load_checkpoint(result.last_checkpoint)
    loaded, classes = load_model(result.last_checkpoint)
    model = build_model(loaded.config, TrainConfig(**TINY))
    model.load_state_dict(state["model"])
    model.eval()
    images = torch.rand(2, 3, 300, 300)
    with torch.no_grad():
        torch.testing.assert_close(model(images), loaded(images), rtol=0, atol=0)
    assert classes == ["circle", "square", "triangle"]


def test_truncated_and_foreign_checkpoints_give_clear_errors(overfitted, tmp_path):
    result, _ = overfitted
    data = result.last_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Detector.from_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an SSD checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
def test_resume_continues_the_epoch_count_and_matches_an_uninterrupted_run(shapes, tmp_path):
    config = TrainConfig(epochs=3, val_fraction=0.25, **TINY)
    straight = fit(config, shapes, tmp_path / "straight")

    stop_after_two = Callbacks(should_stop=lambda: len(seen) >= 2, on_epoch=lambda r: seen.append(r["epoch"]))
    seen: list[int] = []
    interrupted = fit(config, shapes, tmp_path / "resumed", stop_after_two)
    assert interrupted.status == "cancelled" and interrupted.epochs_completed == 2
    resumed = fit(config, shapes, tmp_path / "resumed", Callbacks(on_epoch=lambda r: seen.append(r["epoch"])))
    assert seen == [1, 2, 3]
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)
    a, b = load_checkpoint(straight.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_validation_records_loss_and_map_every_epoch(shapes, tmp_path):
    records = fit(TrainConfig(epochs=1, val_fraction=0.25, **TINY), shapes, tmp_path).history
    (record,) = records
    assert set(record) >= {"epoch", "train_loss", "train_loc_loss", "train_conf_loss", "val_loss", "val_map50", "lr"}
    assert record["val_loss"] > 0 and 0 <= record["val_map50"] <= 1
    assert record["train_loss"] == pytest.approx(record["train_loc_loss"] + record["train_conf_loss"])
    # Per-class AP@0.5 from the same evaluation: COCO's mAP@0.5 is their mean over the classes in the split.
    per_class = record["val_ap50_per_class"]
    assert list(per_class) == shapes.classes
    scored = [ap for ap in per_class.values() if ap is not None]
    assert scored and all(0 <= ap <= 1 for ap in scored)
    assert record["val_map50"] == pytest.approx(sum(scored) / len(scored))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["val_ap50_per_class"] == per_class


def test_without_a_validation_split_there_are_no_per_class_figures(shapes, tmp_path):
    (record,) = fit(TrainConfig(epochs=1, val_fraction=0, **TINY), shapes, tmp_path).history
    assert record["val_map50"] is None and record["val_ap50_per_class"] is None


def test_cancel_between_batches_stops_within_one_batch(shapes, tmp_path):
    steps = []
    callbacks = Callbacks(on_step=lambda p: steps.append(p.step), should_stop=lambda: True)
    result = fit(TrainConfig(epochs=2, val_fraction=0, **TINY), shapes, tmp_path, callbacks)
    assert result.status == "cancelled" and result.epochs_completed == 0 and steps == []
    assert result.last_checkpoint is None


def test_progress_reports_step_eta_and_throughput(shapes, tmp_path):
    progress = []
    fit(TrainConfig(epochs=1, val_fraction=0, **TINY), shapes, tmp_path, Callbacks(on_step=progress.append))
    last = progress[-1]
    assert (last.epoch, last.step, last.steps_per_epoch, last.epochs) == (1, 2, 2, 1)
    assert last.eta_seconds == 0 and last.images_per_second > 0 and last.loss > 0


def test_a_diverging_run_raises_naming_epoch_and_step(shapes, tmp_path):
    config = TrainConfig(epochs=1, val_fraction=0, learning_rate=1e30, warmup_steps=0, **TINY)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+"):
        fit(config, shapes, tmp_path)


def test_optimizer_gives_conv_blocks_one_and_two_a_lower_learning_rate():
    config = TrainConfig(learning_rate=1e-3, early_block_lr_factor=0.1, **TINY)
    model = build_model(config.model_config(num_classes=4), config)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    rest, early = optimizer.param_groups
    assert (rest["lr"], early["lr"]) == (1e-3, pytest.approx(1e-4))
    assert {id(p) for p in early["params"]} == {id(p) for p in model.early_block_parameters()}
    assert len(rest["params"]) + len(early["params"]) == len(list(model.parameters()))


def test_imagenet_weights_freeze_ten_layers_and_scratch_freezes_none(published, tmp_path):
    weights = LocalWeights(published.folder_with(tmp_path, IMAGENET_WEIGHTS["vgg16_bn"]))
    start = plan_start(TrainConfig(pretrained_backbone="imagenet", num_workers=0), ["a", "b"], weights)
    model = build_model(start.model_config(num_classes=3), start.config, start.load)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {id(p) for p in frozen} == {id(p) for p in model.early_block_parameters()}
    optimizer = build_optimizer(model, start.config, torch.device("cpu"))
    assert len(optimizer.param_groups) == 1  # the early blocks are frozen, so no low-rate group

    scratch = TrainConfig(**TINY)
    assert all(p.requires_grad for p in build_model(scratch.model_config(num_classes=3), scratch).parameters())
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_model(scratch.model_config(num_classes=3), TrainConfig(frozen_layers=10, **TINY))


@pytest.mark.slow
def test_a_resumed_run_may_add_epochs_and_then_follows_the_longer_schedule(shapes, tmp_path):
    config = TrainConfig(epochs=1, val_fraction=0, warmup_steps=0, **TINY)
    fit(config, shapes, tmp_path)
    resumed_history = []
    longer = fit(
        TrainConfig(epochs=3, val_fraction=0, warmup_steps=0, **TINY),
        shapes,
        tmp_path,
        Callbacks(on_resume=resumed_history.extend),
    )
    assert [r["epoch"] for r in resumed_history] == [1]
    assert [r["epoch"] for r in longer.history] == [1, 2, 3]
    # Cosine over 3 epochs: after epoch 2 the rate is still well above the 1% floor.
    assert longer.history[1]["lr"] > 0.2 * config.learning_rate


def test_resuming_with_different_training_settings_is_refused(shapes, tmp_path):
    fit(TrainConfig(epochs=1, val_fraction=0, **TINY), shapes, tmp_path)
    changed = {**TINY, "batch_size": 2}
    with pytest.raises(ValueError, match="different settings \\(batch_size\\)"):
        fit(TrainConfig(epochs=2, val_fraction=0, **changed), shapes, tmp_path)


def test_cancel_during_validation_stops_before_the_epoch_is_recorded(shapes, tmp_path):
    checks = []

    def stop_after_the_training_batches() -> bool:
        checks.append(1)
        return len(checks) > 2  # 6 training images in batches of 4: 2 batches, then validation

    callbacks = Callbacks(should_stop=stop_after_the_training_batches)
    result = fit(TrainConfig(epochs=1, val_fraction=0.25, **TINY), shapes, tmp_path, callbacks)
    assert len(checks) == 3
    assert result.status == "cancelled" and result.history == [] and result.last_checkpoint is None


def test_without_validation_there_is_no_best_val_loss_but_a_best_checkpoint(shapes, tmp_path):
    result = fit(TrainConfig(epochs=1, val_fraction=0, **TINY), shapes, tmp_path)
    assert result.best_val_loss is None and result.best_checkpoint is not None


def test_pretrained_weights_need_the_full_width():
    with pytest.raises(ValueError, match=re.escape("width_multiplier 1.0")):
        TrainConfig(pretrained_backbone="imagenet", width_multiplier=0.5)


def pause_after(checks_before_pause: int) -> Callbacks:
    """Callbacks whose should_pause turns True at its n-th check, and stays False after one pause."""
    calls = []

    def should_pause() -> bool:
        calls.append(1)
        return len(calls) == checks_before_pause

    return Callbacks(should_pause=should_pause)


@pytest.mark.parametrize(
    "checks_before_pause, where, paused_at",
    [(3, "after two of three training batches", (1, 2)), (4, "before the first validation batch", (1, 3))],
)
@pytest.mark.slow
def test_a_paused_run_carries_on_to_the_same_result_as_an_uninterrupted_one(
    shapes, tmp_path, checks_before_pause, where, paused_at
):
    # 8 images, 2 for validation, batches of 2: three training batches, augmentation on.
    config = TrainConfig(epochs=2, val_fraction=0.25, **{**TINY, "batch_size": 2})
    straight = fit(config, shapes, tmp_path / "straight")

    paused = fit(config, shapes, tmp_path / "paused", pause_after(checks_before_pause))
    assert paused.status == "paused" and paused.history == [] and paused.paused_at == paused_at, where
    assert load_checkpoint(tmp_path / "paused" / "last.pt")["paused_epoch"] is not None
    resumed = fit(config, shapes, tmp_path / "paused")
    assert resumed.status == "completed"
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "train_loc_loss", "train_conf_loss", "val_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (where, key)
    a, b = load_checkpoint(straight.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_failed_run_stops_its_loader_workers_while_the_error_is_still_held(shapes, tmp_path):
    import multiprocessing

    def fail(record):
        raise RuntimeError("the caller gave up")

    config = TrainConfig(epochs=2, val_fraction=0.25, **{**TINY, "num_workers": 2})
    with pytest.raises(RuntimeError, match="the caller gave up") as raised:
        fit(config, shapes, tmp_path, Callbacks(on_epoch=fail))
    # The traceback (held by `raised`) references fit's frames and so its loaders: their persistent
    # workers (two per loader) must be gone all the same.
    assert raised.traceback and multiprocessing.active_children() == []


def test_the_training_step_distorts_colours_by_its_seed_only_when_augmenting():
    from model.training import build_training_run, train_step

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8, generator=generator)
    batch = (images, torch.tensor([[[0.1, 0.1, 0.6, 0.7]]] * 2), torch.ones(2, 1, dtype=torch.int64))

    def first_loss(augment: bool, seed: int | None) -> float:
        torch.manual_seed(0)
        config = TrainConfig(augment=augment, warmup_steps=0, **TINY)
        model = build_model(config.model_config(num_classes=2), config)
        run = build_training_run(model, config, torch.device("cpu"), total_steps=10)
        return float(train_step(run, batch, seed).total.detach())

    plain = first_loss(True, None)
    assert first_loss(True, 5) == first_loss(True, 5) != plain
    assert first_loss(True, 5) != first_loss(True, 6)
    assert first_loss(False, 5) == plain
