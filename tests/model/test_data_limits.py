"""Crafted dataset files that would exhaust memory or slip past checks give DatasetErrors."""

import json
import re
import warnings

import pytest
from PIL import Image

from model.data import DatasetError, read_coco, read_voc
from model.data.images import find_by_stem, read_image_size


def test_deeply_nested_json_is_a_dataset_error_not_a_crash(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=r"nested too deeply|malformed JSON"):
        read_coco(path)


def test_an_annotation_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}) + " " * 100)
    monkeypatch.setattr("model.data.coco.MAX_ANNOTATION_BYTES", 50)
    with pytest.raises(DatasetError, match="over the limit"):
        read_coco(path)


def test_a_voc_xml_over_the_size_limit_is_a_problem(tmp_path, monkeypatch):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation>" + " " * 200 + "</annotation>")
    monkeypatch.setattr("model.data.voc.MAX_XML_BYTES", 100)
    with pytest.raises(DatasetError, match=re.escape("a.xml: annotation file is over the limit")):
        read_voc(tmp_path)


def test_too_many_pixels_is_refused_even_when_warnings_are_ignored(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # As if another thread restored the filters while this one reads: PIL's warning is lost.
        monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)
        with pytest.raises(Image.DecompressionBombError, match="over the limit"):
            read_image_size(path)


def test_image_stems_with_glob_characters_match_only_themselves(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "img1.jpg")
    assert find_by_stem(tmp_path, "img[1]") is None
    Image.new("RGB", (4, 4)).save(tmp_path / "img[1].jpg")
    assert find_by_stem(tmp_path, "img[1]").name == "img[1].jpg"
