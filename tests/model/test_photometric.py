"""The batched photometric distortion against torchvision's per-image kernels, and its draws."""

from __future__ import annotations

import itertools

import torch
from torchvision.transforms.v2 import functional as F

from model.data.photometric import BRIGHTNESS, CONTRAST, HUE, SATURATION, PhotometricParams, distort, draw_params


def _torchvision_one(image: torch.Tensor, params: PhotometricParams, i: int) -> torch.Tensor:
    """One float image through torchvision's kernels in RandomPhotometricDistort's order (its ``transform``)."""
    contrast = float(params.contrast[i])
    image = F.adjust_brightness(image, float(params.brightness[i]))
    if params.contrast_first[i]:
        image = F.adjust_contrast(image, contrast)
    image = F.adjust_saturation(image, float(params.saturation[i]))
    if params.hue[i] != 0:
        image = F.adjust_hue(image, float(params.hue[i]))
    if not params.contrast_first[i]:
        image = F.adjust_contrast(image, contrast)
    return F.permute_channels(image, params.permutation[i].tolist())


def _every_combination() -> PhotometricParams:
    """32 images: each distortion on or off, contrast first or last, in every combination, with
    factors from the far ends of torchvision's ranges and every channel order."""
    rows = list(itertools.product([False, True], repeat=5))
    generator = torch.Generator().manual_seed(0)

    def factor(column: int, bounds: tuple[float, float], identity: float) -> torch.Tensor:
        value = torch.empty(len(rows)).uniform_(*bounds, generator=generator)
        return torch.tensor([float(v) if row[column] else identity for row, v in zip(rows, value, strict=True)])

    orders = list(itertools.permutations(range(3)))
    return PhotometricParams(
        brightness=factor(0, BRIGHTNESS, 1.0),
        contrast=factor(1, CONTRAST, 1.0),
        saturation=factor(2, SATURATION, 1.0),
        hue=factor(3, HUE, 0.0),
        contrast_first=torch.tensor([row[4] for row in rows]),
        permutation=torch.tensor([orders[i % len(orders)] for i in range(len(rows))]),
    )


def _photos(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 Tensor[count, 3, 24, 32]: noise, flat grey patches and saturated corners (the HSV edge cases)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 24, 32), dtype=torch.uint8, generator=generator)
    images[:, :, :6, :6] = 128  # grey: no hue
    images[:, :, -4:, -4:] = 0  # black: no saturation either
    images[:, 0, :4, -4:], images[:, 1:, :4, -4:] = 255, 0  # pure red, at the hue wheel's seam
    return images


def test_the_batch_distortion_equals_torchvision_image_by_image():
    params = _every_combination()
    images = _photos(len(params.hue))
    batched = distort(images, params)
    assert batched.dtype == torch.float32 and batched.shape == images.shape
    for i, image in enumerate(images.float() / 255):
        torch.testing.assert_close(batched[i], _torchvision_one(image, params, i), atol=2e-6, rtol=0)


def test_uint8_and_float_inputs_give_the_same_result():
    params = draw_params(4, torch.Generator().manual_seed(1))
    images = _photos(4, seed=1)
    torch.testing.assert_close(distort(images, params), distort(images.float() / 255, params))


def test_draws_follow_torchvision_probabilities_and_ranges():
    count = 20_000
    params = draw_params(count, torch.Generator().manual_seed(2))
    for values, identity, (low, high) in [
        (params.brightness, 1.0, BRIGHTNESS),
        (params.contrast, 1.0, CONTRAST),
        (params.saturation, 1.0, SATURATION),
        (params.hue, 0.0, HUE),
    ]:
        applied = values != identity
        assert abs(applied.float().mean() - 0.5) < 0.02
        assert low <= values[applied].min() and values[applied].max() <= high
        assert abs(values[applied].mean() - (low + high) / 2) < 0.02 * (high - low)
    assert abs(params.contrast_first.float().mean() - 0.5) < 0.02
    orders = {tuple(row) for row in params.permutation.tolist()}
    assert orders == set(itertools.permutations(range(3)))
    unchanged = (params.permutation == torch.arange(3)).all(dim=1).float().mean()
    assert abs(unchanged - (0.5 + 0.5 / 6)) < 0.02  # not drawn, or drawn as the identity


def test_the_same_generator_seed_draws_the_same_distortion():
    images = _photos(3)
    first = distort(images, draw_params(3, torch.Generator().manual_seed(7)))
    again = distort(images, draw_params(3, torch.Generator().manual_seed(7)))
    other = distort(images, draw_params(3, torch.Generator().manual_seed(8)))
    assert torch.equal(first, again) and not torch.equal(first, other)
