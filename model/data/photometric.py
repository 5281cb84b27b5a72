"""SSD's photometric distortion, on a whole batch at once where the training step runs.

The same distortion as torchvision's ``v2.RandomPhotometricDistort`` (its ranges, its
probabilities, its order: brightness, contrast before or after saturation and hue, then a
channel permutation), with each image's factors drawn separately, applied as a few tensor
operations on the batch. On a GPU that takes well under a millisecond for a batch, where the
per-image transform cost a loader worker about half of its time (bench/loader_profile.py).

It runs after the geometric steps (``model.data.transforms.train_transforms``), on the
resized batch, so two things differ from the per-image transform placed first: the
zoom-out canvas is distorted along with the image, and contrast blends with the mean grey
of the crop rather than of the whole photo. Both are still the same kind of colour noise. And it
works in float throughout, where the per-image transform on uint8 images rounds after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# RandomPhotometricDistort's defaults: factor ranges and the chance of each distortion.
BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.875, 1.125), (0.5, 1.5), (0.5, 1.5), (-0.05, 0.05)
PROBABILITY = 0.5
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass
class PhotometricParams:
    """Each image's draws; a distortion not drawn for an image has its identity value.

    brightness, contrast, saturation: float32 Tensor[B] multiplicative factors (1: unchanged).
    hue: float32 Tensor[B], a shift of the hue as a fraction of the colour wheel (0: unchanged).
    contrast_first: bool Tensor[B], contrast before saturation and hue (else after them).
    permutation: int64 Tensor[B, 3], the channel order (``[0, 1, 2]``: unchanged).
    """

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    contrast_first: torch.Tensor
    permutation: torch.Tensor

    def to(self, device: torch.device | str) -> PhotometricParams:
        return PhotometricParams(**{name: value.to(device) for name, value in vars(self).items()})


def draw_params(batch_size: int, generator: torch.Generator, p: float = PROBABILITY) -> PhotometricParams:
    """Each of ``batch_size`` images gets each distortion with probability ``p``, its factor uniform in
    torchvision's range, and a uniformly random channel order with probability ``p``. Drawn on the
    CPU from ``generator`` (the same draws whatever device the batch is on)."""

    def factor(bounds: tuple[float, float], identity: float) -> torch.Tensor:
        applied = torch.rand(batch_size, generator=generator) < p
        value = torch.empty(batch_size).uniform_(*bounds, generator=generator)
        return torch.where(applied, value, torch.full_like(value, identity))

    brightness, contrast = factor(BRIGHTNESS, 1.0), factor(CONTRAST, 1.0)
    saturation, hue = factor(SATURATION, 1.0), factor(HUE, 0.0)
    contrast_first = torch.rand(batch_size, generator=generator) < 0.5
    permuted = torch.rand(batch_size, generator=generator) < p
    random_order = torch.rand(batch_size, 3, generator=generator).argsort(dim=1)
    permutation = torch.where(permuted[:, None], random_order, torch.arange(3).expand(batch_size, 3))
    return PhotometricParams(brightness, contrast, saturation, hue, contrast_first, permutation)


def distort(images: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """Apply each image's draws.

    Args:
        images: uint8 (0-255) or float (0-1) RGB Tensor[B, 3, H, W].
        params: on the same device as ``images``.

    Returns:
        float32 RGB Tensor[B, 3, H, W] in [0, 1].
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = (x * _per_image(params.brightness)).clamp_(0, 1)
    identity = torch.ones_like(params.contrast)
    x = _adjust_contrast(x, torch.where(params.contrast_first, params.contrast, identity))
    x = _blend(x, _grey(x), params.saturation)
    x = torch.where(_per_image(params.hue != 0), _shift_hue(x, params.hue), x)
    x = _adjust_contrast(x, torch.where(params.contrast_first, identity, params.contrast))
    order = params.permutation[:, :, None, None].expand_as(x)
    return x.gather(1, order)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """Tensor[B] -> Tensor[B, 1, 1, 1], to broadcast over an image batch."""
    return values[:, None, None, None]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Float Tensor[B, 3, H, W] -> its luma, Tensor[B, 1, H, W]."""
    weights = torch.tensor(_GREY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio * x + (1 - ratio) * other``, per image, clamped to [0, 1] (torchvision's _blend)."""
    ratio = _per_image(ratio)
    return (x * ratio + other * (1 - ratio)).clamp_(0, 1)


def _adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level."""
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` turns, through HSV (as torchvision's adjust_hue)."""
    value, _ = x.max(dim=1)
    minimum, _ = x.min(dim=1)
    chroma = value - minimum
    grey = chroma == 0
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    # Each channel's distance below the maximum, relative to the chroma (0/0 cannot happen: grey pixels are masked).
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    red, green, blue = ((value[:, None] - x) / safe_chroma[:, None]).unbind(dim=1)
    r, g, _ = x.unbind(dim=1)
    hue = torch.where(value == r, blue - green, torch.where(value == g, 2.0 + red - blue, 4.0 + green - red))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = ((hue / 6.0 + 1.0) + shift[:, None, None]).remainder(1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Tensors[B, H, W] with hue in [0, 1) -> RGB Tensor[B, 3, H, W]."""
    sector = hue * 6.0
    index = sector.floor()
    fraction = sector - index
    p = (value * (1.0 - saturation)).clamp(0, 1)
    q = (value * (1.0 - saturation * fraction)).clamp(0, 1)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0, 1)
    # For each of the six sectors of the wheel, which of (v, p, q, t) each of r, g, b takes.
    choices = torch.stack((value, p, q, t), dim=1)
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hue.device)
    select = table[:, index.long().remainder(6)].movedim(0, 1)
    return choices.gather(1, select)
