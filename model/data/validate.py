"""Checking one annotated box against its image, the same way for every dataset format."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Annotation tools often round or pad a box a pixel or two past the border; that much is
# clipped to the image, anything further is treated as a wrong annotation.
CLIP_TOLERANCE_PX = 2.0


def check_box(
    box: Sequence[float], width: int, height: int, tolerance: float = CLIP_TOLERANCE_PX
) -> tuple[list[float] | None, str | None]:
    """Clip an absolute ``[x1, y1, x2, y2]`` box to a ``width`` x ``height`` image, or say what is wrong.

    Returns:
        ``(clipped_box, None)`` for a usable box (at most ``tolerance`` pixels outside the
        image, and x2 > x1, y2 > y1 after clipping), else ``(None, problem)`` where
        ``problem`` describes the box without naming its file (the caller adds that).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    shown = "[" + ", ".join(f"{v:g}" for v in (x1, y1, x2, y2)) + "]"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"box {shown} has a non-finite coordinate"
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return None, f"box {shown} lies more than {tolerance:g} px outside the {width}x{height} image"
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, f"box {shown} is empty (needs x2 > x1 and y2 > y1 inside the image)"
    return clipped, None
