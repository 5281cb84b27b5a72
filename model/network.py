"""The SSD300 network on a VGG16 backbone (Liu et al., 2016, figure 2)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg

from .config import ModelConfig
from .default_boxes import boxes_per_location, default_boxes, feature_map_sizes

# torchvision's VGG16 layer configuration ("D"): conv widths, "M" = 2x2 max pool.
# fmt: off
_VGG16_LAYOUT: list[int | str] = [  # one conv block a line
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
]
# fmt: on
# Layers of torchvision's vgg16().features (conv, ReLU and pool each count one) in conv
# blocks 1 and 2: the layers frozen with a pretrained backbone and trained at a lower rate.
EARLY_BLOCK_LAYERS = 10


def _width(channels: int, multiplier: float) -> int:
    return max(8, round(channels * multiplier))


def _conv(in_ch: int, out_ch: int, batch_norm: bool, **conv_args) -> list[nn.Module]:
    """Conv (+ BatchNorm) + ReLU, the unit every SSD layer beyond VGG16 is made of."""
    conv = nn.Conv2d(in_ch, out_ch, bias=not batch_norm, **conv_args)
    norm = [nn.BatchNorm2d(out_ch)] if batch_norm else []
    return [conv, *norm, nn.ReLU(inplace=True)]


def _extra_blocks(in_ch: int, width: float, batch_norm: bool) -> list[nn.Sequential]:
    """conv8_2 .. conv11_2 (SSD figure 2): a 1x1 squeeze, then a 3x3 conv that shrinks the map."""
    specs = [  # (squeeze, out, stride, padding)
        (256, 512, 2, 1),  # conv8_2: 19 -> 10
        (128, 256, 2, 1),  # conv9_2: 10 -> 5
        (128, 256, 1, 0),  # conv10_2: 5 -> 3
        (128, 256, 1, 0),  # conv11_2: 3 -> 1
    ]
    blocks = []
    for k, (squeeze, out, stride, padding) in enumerate(specs):
        squeeze, out = _width(squeeze, width), _width(out, width)
        # conv11_2's output is a single cell per image: batch statistics over it would be
        # noise (and undefined for a batch of one), so it has no batch norm.
        last_norm = batch_norm and k < len(specs) - 1
        layers = _conv(in_ch, squeeze, batch_norm, kernel_size=1)
        layers += _conv(squeeze, out, last_norm, kernel_size=3, stride=stride, padding=padding)
        blocks.append(nn.Sequential(*layers))
        in_ch = out
    return blocks


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet; SSD section 3.1).

    conv4_3's activations are much larger than those of later layers; normalising them and
    learning the scale (initialised to 20) keeps the heads' inputs comparable.
    """

    def __init__(self, channels: int, initial_scale: float = 20.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), initial_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


class SSD300(nn.Module):
    """SSD300: VGG16 to conv4_3 and conv7, four extra blocks, and a class+box head per map.

    Feature maps at 300x300: 38, 19, 10, 5, 3, 1 cells with 4/6/6/6/4/4 default boxes per
    cell, 8732 in all. Module nesting follows torchvision's SSD300-VGG16 (``features`` up to
    conv4_3, ``extra[0]`` = pool4, conv5 and conv6/conv7, then the four extra blocks), so
    VGG16 weights load by index.

    Buffers: ``defaults``, Tensor[A, 4] default boxes ``(cx, cy, w, h)`` relative to the
    input side, in the order of the heads' outputs.
    """

    mean: torch.Tensor
    std: torch.Tensor
    defaults: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        batch_norm = config.backbone == "vgg16_bn"
        layout = [c if isinstance(c, str) else _width(c, config.width_multiplier) for c in _VGG16_LAYOUT]
        layers = vgg.make_layers(layout, batch_norm=batch_norm)
        self._pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        layers[self._pools[2]].ceil_mode = True  # SSD section 3: conv4_3 is 38x38, not 37x37

        c4, c7 = _width(512, config.width_multiplier), _width(1024, config.width_multiplier)
        self.features = nn.Sequential(*layers[: self._pools[3]])  # conv1_1 .. conv4_3 + ReLU
        self.l2norm = L2Norm(c4)
        fc = nn.Sequential(
            # pool5 becomes 3x3 stride 1; fc6/fc7 become a dilated 3x3 conv6 and a 1x1 conv7.
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            *_conv(c4, c7, batch_norm, kernel_size=3, padding=6, dilation=6),
            *_conv(c7, c7, batch_norm, kernel_size=1),
        )
        vgg_tail = layers[self._pools[3] : self._pools[4]]  # pool4, conv5_1 .. conv5_3 + ReLU
        extras = _extra_blocks(c7, config.width_multiplier, batch_norm)
        self.extra = nn.ModuleList([nn.Sequential(*vgg_tail, fc), *extras])

        self.num_classes = config.num_classes
        self.boxes_per_location = boxes_per_location(config.aspect_ratios)
        out_channels = [c4, c7] + [_width(c, config.width_multiplier) for c in (512, 256, 256, 256)]
        # One conv per map predicts both box offsets and class scores: (4 + C) per default box.
        self.heads = nn.ModuleList(
            nn.Conv2d(channels, boxes * (4 + self.num_classes), kernel_size=3, padding=1)
            for channels, boxes in zip(out_channels, self.boxes_per_location, strict=True)
        )
        self._init_weights()

        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        defaults = default_boxes(
            feature_map_sizes(config.image_size),
            config.scales,
            config.aspect_ratios,
            steps=config.steps,
            image_size=config.image_size,
        )
        self.register_buffer("defaults", defaults, persistent=False)

    def _init_weights(self) -> None:
        # VGG layers as torchvision's VGG initialises them; new layers Xavier as in SSD.
        vgg_convs = {id(m) for _, m in self.vgg_layers() if isinstance(m, nn.Conv2d)}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if id(module) in vgg_convs:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def vgg_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """The VGG16 layers, each with its index in torchvision's ``vgg16().features``.

        Batch-norm layers of ``vgg16_bn`` share the index of the conv they follow, so layer
        counts (frozen layers, early blocks) mean the same thing for both backbones.
        """
        index = -1
        vgg_tail = self.extra[0]
        assert isinstance(vgg_tail, nn.Sequential)  # pool4, conv5 and conv6/conv7, then the extra blocks
        for module in [*self.features, *vgg_tail[:-1]]:
            if not isinstance(module, nn.BatchNorm2d):
                index += 1
            yield index, module

    def early_block_parameters(self) -> list[nn.Parameter]:
        """Parameters of conv blocks 1 and 2 (VGG layers 0-9)."""
        return [p for i, m in self.vgg_layers() if i < EARLY_BLOCK_LAYERS for p in m.parameters()]

    def freeze_vgg_layers(self, count: int) -> None:
        """Stop gradients to the first ``count`` VGG layers (and their batch norms)."""
        self._frozen = [m for i, m in self.vgg_layers() if i < count]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> SSD300:
        super().train(mode)
        # Frozen batch norms keep their pretrained statistics instead of drifting with the batch.
        for module in getattr(self, "_frozen", []):
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def load_vgg_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision VGG16 weights (a full ``VGG`` or its ``features`` state dict).

        Raises:
            ValueError: the weights do not fit this backbone (wrong variant or width).
        """
        split = self._pools[3]
        mapped = {}
        for key, value in state_dict.items():
            key = key.removeprefix("features.")
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= self._pools[4]:
                continue  # classifier layers and pool5 are not part of SSD
            i = int(index)
            mapped[f"features.{i}.{name}" if i < split else f"extra.0.{i - split}.{name}"] = value
        expected = {k for k in self.state_dict() if k.startswith("features.") or k.startswith("extra.0.")}
        expected = {k for k in expected if not k.startswith(f"extra.0.{self._pools[4] - split}.")}
        missing, unexpected = expected - mapped.keys(), mapped.keys() - expected
        if missing or unexpected:
            raise ValueError(
                f"backbone weights do not fit {self.config.backbone} at width {self.config.width_multiplier}: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        try:
            self.load_state_dict(mapped, strict=False)
        except RuntimeError as error:
            raise ValueError(f"backbone weights do not fit {self.config.backbone}: {error}") from None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0-255) or float (0-1) RGB Tensor[B, 3, S, S] -> the backbone's input scale."""
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw predictions for every default box.

        Args:
            images: uint8 (0-255) or float (0-1) RGB Tensor[B, 3, S, S], S = ``config.image_size``.

        Returns:
            loc: Tensor[B, A, 4] offsets against ``self.defaults`` (see ``boxes.decode``).
            logits: Tensor[B, A, C] class scores, class 0 = background.
        """
        x = self.features(self.normalize(images))
        feature_maps = [self.l2norm(x)]
        for block in self.extra:
            x = block(x)
            feature_maps.append(x)
        outputs = [
            self._flatten(head(fmap), boxes)
            for fmap, head, boxes in zip(feature_maps, self.heads, self.boxes_per_location, strict=True)
        ]
        out = torch.cat(outputs, dim=1)
        return out[..., :4], out[..., 4:]

    def _flatten(self, y: torch.Tensor, boxes: int) -> torch.Tensor:
        """[B, boxes * (4 + C), H, W] -> [B, H * W * boxes, 4 + C] (row, column, box order)."""
        batch, _, height, width = y.shape
        y = y.view(batch, boxes, 4 + self.num_classes, height, width).permute(0, 3, 4, 1, 2)
        return y.reshape(batch, height * width * boxes, 4 + self.num_classes)
