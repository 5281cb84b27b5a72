"""Detections drawn onto an image, for people to look at."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

# Distinct, readable colours; class id i uses PALETTE[(i - 1) % len(PALETTE)].
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
]


def draw_detections(image: Image.Image, detections: list[dict]) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box and ``label score`` drawn on it.

    Args:
        detections: ``[{"box": [x1, y1, x2, y2], "label": str, "class_id": int, "score": float}]``
            in the image's pixels, as returned by ``Detector.detect``.
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 200))
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 30)))
    for found in sorted(detections, key=lambda d: d["score"]):  # best drawn last, on top
        colour = PALETTE[(found["class_id"] - 1) % len(PALETTE)]
        x1, y1, x2, y2 = found["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        caption = f"{found['label']} {found['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), caption, font=font)
        lift = bottom - top + 2 * line
        text_y = y1 - lift if y1 - lift >= 0 else y1
        draw.rectangle([x1, text_y, x1 + right - left + 2 * line, text_y + lift], fill=colour)
        draw.text((x1 + line, text_y + line - (top - y1)), caption, fill=(255, 255, 255), font=font)
    return canvas
