import pytest
import torch
from torchvision.models import vgg16

from model.config import ModelConfig
from model.network import SSD300


def test_uint8_and_float_inputs_give_the_same_outputs():
    model = SSD300(ModelConfig(num_classes=3, width_multiplier=0.125)).eval()
    images = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8)
    with torch.no_grad():
        a = model(images)
        b = model(images.float() / 255)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn"])
def test_output_shapes_at_300_and_other_sizes(backbone):
    for size, boxes in ((300, 8732), (268, None), (384, None)):
        model = SSD300(ModelConfig(num_classes=4, backbone=backbone, image_size=size, width_multiplier=0.125))
        loc, logits = model(torch.rand(1, 3, size, size))
        assert loc.shape == (1, model.defaults.shape[0], 4)
        assert logits.shape == (1, model.defaults.shape[0], 4)
        if boxes:
            assert model.defaults.shape[0] == boxes


def test_vgg_layers_are_numbered_as_in_torchvisions_vgg16_for_both_backbones():
    plain = SSD300(ModelConfig(num_classes=2, backbone="vgg16", width_multiplier=0.125))
    with_bn = SSD300(ModelConfig(num_classes=2, backbone="vgg16_bn", width_multiplier=0.125))
    plain_kinds = [(i, type(m).__name__) for i, m in plain.vgg_layers()]
    bn_kinds = [(i, type(m).__name__) for i, m in with_bn.vgg_layers() if type(m).__name__ != "BatchNorm2d"]
    assert plain_kinds == bn_kinds
    assert [type(m).__name__ for m in vgg16().features[:30]] == [kind for _, kind in plain_kinds]


@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn"])
def test_freezing_ten_layers_freezes_conv_blocks_one_and_two_only(backbone):
    model = SSD300(ModelConfig(num_classes=2, backbone=backbone, width_multiplier=0.125))
    model.freeze_vgg_layers(10)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == {id(p) for p in model.early_block_parameters()}
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.requires_grad for c in convs] == [False] * 4 + [True] * 6
    model.train()
    frozen_norms = [m for i, m in model.vgg_layers() if i < 10 and isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in frozen_norms)
    assert backbone == "vgg16" or len(frozen_norms) == 4


def test_torchvision_vgg_weights_load_into_the_backbone():
    source = vgg16(weights=None)
    model = SSD300(ModelConfig(num_classes=2, backbone="vgg16"))
    model.load_vgg_weights(source.state_dict())
    torch.testing.assert_close(model.features[0].weight, source.features[0].weight)
    torch.testing.assert_close(model.extra[0][1].weight, source.features[24].weight)  # conv5_1
    with pytest.raises(ValueError, match="do not fit vgg16_bn"):
        SSD300(ModelConfig(num_classes=2, backbone="vgg16_bn")).load_vgg_weights(source.state_dict())
