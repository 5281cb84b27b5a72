"""SSD's default boxes (the paper's "priors"), section 2.2 of Liu et al., 2016."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def feature_map_sizes(image_size: int) -> list[int]:
    """Side length of each of SSD300's six feature maps for a square input of ``image_size``.

    Follows the network's layers: pools 1-2 floor, pool 3 ceils (``ceil_mode=True``), pool 4
    floors, conv8_2 and conv9_2 are stride-2 3x3 convs with padding 1, conv10_2 and conv11_2
    valid 3x3 convs. 300 gives [38, 19, 10, 5, 3, 1].
    """
    conv4_3 = math.ceil((image_size // 2 // 2) / 2)
    conv7 = conv4_3 // 2
    conv8_2 = (conv7 - 1) // 2 + 1
    conv9_2 = (conv8_2 - 1) // 2 + 1
    return [conv4_3, conv7, conv8_2, conv9_2, conv9_2 - 2, conv9_2 - 4]


def box_shapes(scales: Sequence[float], aspect_ratios: Sequence[Sequence[int]]) -> list[list[tuple[float, float]]]:
    """Relative (width, height) of each default box at one location, per feature map.

    Map k has a box of scale s_k and one of scale sqrt(s_k * s_{k+1}) at aspect ratio 1,
    then for every ratio r the pair (s_k sqrt(r), s_k / sqrt(r)) and its transpose.
    """
    shapes = []
    for k, ratios in enumerate(aspect_ratios):
        s_k, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
        pairs = [(s_k, s_k), (s_prime, s_prime)]
        for r in ratios:
            w, h = s_k * math.sqrt(r), s_k / math.sqrt(r)
            pairs += [(w, h), (h, w)]
        shapes.append(pairs)
    return shapes


def boxes_per_location(aspect_ratios: Sequence[Sequence[int]]) -> list[int]:
    """Default boxes at each location of each feature map: 2 + 2 per extra ratio (4/6/6/6/4/4)."""
    return [2 + 2 * len(ratios) for ratios in aspect_ratios]


def default_boxes(
    map_sizes: Sequence[int],
    scales: Sequence[float],
    aspect_ratios: Sequence[Sequence[int]],
    *,
    steps: Sequence[float] | None = None,
    image_size: int | None = None,
    clip: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """All default boxes of the network, in the order its heads emit predictions.

    Centres sit at ((j + 0.5) / f_k, (i + 0.5) / f_k) for cell (i, j) of an f_k x f_k map, or,
    with ``steps`` (pixels between centres on each map of an ``image_size`` input, as
    torchvision's ``DefaultBoxGenerator(steps=...)``), at ((j + 0.5) * step_k / image_size, ...).
    Order: feature map, then row, then column, then box shape (as torchvision's SSD).

    Returns:
        Tensor[A, 4] of ``(cx, cy, w, h)`` relative to the image side (0-1); with ``clip``
        widths and heights are clipped to at most 1. A = 8732 for SSD300.
    """
    if steps is not None and image_size is None:
        raise ValueError("default boxes spaced by steps need the image_size the steps are in pixels of")
    per_map = []
    for k, (f_k, shapes) in enumerate(zip(map_sizes, box_shapes(scales, aspect_ratios), strict=True)):
        spacing = f_k if steps is None or image_size is None else image_size / steps[k]  # cells per image side
        centres = (torch.arange(f_k, dtype=torch.float64) + 0.5) / spacing
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        xy = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # [f_k^2, 2]
        wh = torch.tensor(shapes, dtype=torch.float64)  # [n_shapes, 2]
        if clip:
            wh = wh.clamp(0, 1)
        n_loc, n_shapes = xy.shape[0], wh.shape[0]
        boxes = torch.cat([xy[:, None, :].expand(n_loc, n_shapes, 2), wh[None, :, :].expand(n_loc, n_shapes, 2)], dim=2)
        per_map.append(boxes.reshape(-1, 4))
    return torch.cat(per_map).to(dtype=dtype, device=device)
