"""Folding batch norms for inference keeps the network's outputs."""

import copy

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.detector import Detector
from model.fusion import fold_batch_norms
from model.network import SSD300
from model.postprocess import postprocess


def model_with_trained_looking_batch_norms(width: float = 0.25) -> SSD300:
    """A vgg16_bn SSD whose batch norms hold non-trivial statistics and affine parameters."""
    torch.manual_seed(0)
    model = SSD300(ModelConfig(num_classes=4, backbone="vgg16_bn", width_multiplier=width))
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        channels = norm.num_features
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.2, 0.2)
        assert norm.running_mean.shape == (channels,)
    return model.eval()


def test_folding_removes_every_batch_norm_and_keeps_the_outputs():
    model = model_with_trained_looking_batch_norms()
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == norms > 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = torch.rand(2, 3, 300, 300)
    with torch.no_grad():
        (loc, logits), (folded_loc, folded_logits) = model(images), folded(images)
    torch.testing.assert_close(folded_loc, loc, rtol=1e-4, atol=1e-4 * loc.abs().max().item())
    torch.testing.assert_close(folded_logits, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())


def test_folding_a_training_model_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(SSD300(ModelConfig(num_classes=2, width_multiplier=0.125)).train())


def test_the_detector_folds_its_own_copy_and_leaves_the_callers_model_alone():
    model = model_with_trained_looking_batch_norms(width=0.125)
    detector = Detector(model, ["a", "b", "c"], amp=False)  # compared with the float32 network
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in detector.model.modules())

    images = [torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8)]
    found = detector.predict(images, score_threshold=0.0, max_detections=20)[0]
    batch, sizes = detector._prepare(images)
    with torch.no_grad():
        loc, logits = model(batch)
    unfolded = postprocess(
        loc, logits, model.defaults, sizes, score_threshold=0.0, topk_candidates=200, max_detections=20
    )
    torch.testing.assert_close(found["scores"], unfolded[0]["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found["boxes"], unfolded[0]["boxes"], rtol=1e-4, atol=1e-2)
    assert torch.equal(found["labels"], unfolded[0]["labels"])
