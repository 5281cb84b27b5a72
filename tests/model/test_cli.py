"""The ``ssd`` command line, run in-process: synth (COCO, VOC, YOLO) -> train -> detect -> evaluate."""

import json

from PIL import Image

from model.cli import main


def test_cli_walk_from_synthetic_data_to_detections(tmp_path, capsys):
    data, run = tmp_path / "shapes", tmp_path / "run"
    assert main(["synth", str(data), "--num-images", "6", "--voc", "--yolo"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["num_images"] == 6 and made["classes"] == ["circle", "square", "triangle"]
    assert (data / "voc" / "Annotations").is_dir() and (data / "yolo" / "data.yaml").is_file()

    train = ["train", str(data / "voc"), str(run), "--epochs", "1", "--batch-size", "3", "--val-fraction", "0.3"]
    assert main([*train, "--width-multiplier", "0.125", "--num-workers", "0", "--no-augment"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["status"] == "completed" and trained["epochs"] == 1

    image = data / "images" / "000000.jpg"
    out = tmp_path / "annotated"
    args = ["detect", str(run / "best.pt"), str(image), "--score-threshold", "0", "--max-detections", "3"]
    assert main([*args, "--annotated-dir", str(out), "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out)[str(image)]
    width, height = Image.open(image).size
    assert found["image"] == {"width": width, "height": height}
    assert len(found["detections"]) == 3
    assert Image.open(out / "000000.png").size == (width, height)

    assert main(["evaluate", str(run / "best.pt"), str(data / "yolo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    scores = json.loads(printed.out)
    assert scores["num_images"] == 6 and 0 <= scores["map50"] <= 1
    assert [c["label"] for c in scores["per_class"]] == ["circle", "square", "triangle"]
    assert sum(c["num_boxes"] for c in scores["per_class"]) == made["num_boxes"]
    # After the figures, a table for people: one line per class.
    table = printed.err.strip().splitlines()[-4:]
    assert table[0].split() == ["label", "AP@0.5", "AP", "boxes"]
    for line, figures in zip(table[1:], scores["per_class"], strict=True):
        label, ap50, _ap, boxes = line.split()
        assert label == figures["label"] and int(boxes) == figures["num_boxes"]
        assert ap50 == ("-" if figures["ap50"] is None else f"{figures['ap50']:.3f}")


def test_cli_evaluate_names_the_classes_a_dataset_lacks(tmp_path, capsys):
    data, run = tmp_path / "shapes", tmp_path / "run"
    main(["synth", str(data), "--num-images", "2"])
    train = ["train", str(data), str(run), "--epochs", "1", "--batch-size", "2", "--val-fraction", "0"]
    assert main([*train, "--width-multiplier", "0.125", "--num-workers", "0"]) == 0
    document = json.loads((data / "annotations.json").read_text())
    document["categories"][0]["name"] = "disc"
    (data / "annotations.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["evaluate", str(run / "last.pt"), str(data), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "missing from the dataset: circle" in error and "not classes of the model: disc" in error


def test_cli_reports_a_bad_dataset_as_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_refuses_invalid_training_settings(tmp_path, capsys):
    main(["synth", str(tmp_path / "d"), "--num-images", "2"])
    assert main(["train", str(tmp_path / "d"), str(tmp_path / "r"), "--epochs", "0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err


def test_cli_trains_on_from_an_earlier_run_with_init_job(tmp_path, capsys):
    data, first, second = tmp_path / "shapes", tmp_path / "first", tmp_path / "second"
    main(["synth", str(data), "--num-images", "2"])
    tiny = ["--epochs", "1", "--batch-size", "2", "--val-fraction", "0", "--num-workers", "0"]
    assert main(["train", str(data), str(first), *tiny, "--width-multiplier", "0.125"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1])["init_used"] == "scratch"
    assert "weights: scratch, backbone vgg16_bn (pretrained weights need width_multiplier 1.0" in printed.err

    # The earlier run's width and backbone follow; asking for weights that are not there is an error.
    assert main(["train", str(data), str(second), *tiny, "--width-multiplier", "0.125", "--init", f"job:{first}"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["status"] == "completed" and trained["init_used"] == f"job:{first}"
    missing = ["--init", "coco", "--weights-dir", str(tmp_path / "none")]
    assert main(["train", str(data), str(tmp_path / "third"), *tiny, *missing]) == 2
    assert "ssd300_vgg16_coco-b556d3b4.pth is not in" in capsys.readouterr().err
