"""Preview: each face boxed and numbered in its ID colour (the palette pose circles and masks use)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...palette import id_color
from .types import Faces


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_faces(images: list[np.ndarray], faces: Faces) -> list[np.ndarray]:
    """One annotated copy of each source image (HxWx3 uint8 RGB): box, 5 keypoints and ID number."""
    out = [Image.fromarray(np.asarray(im, np.uint8)).convert("RGB") for im in images]
    draws = [ImageDraw.Draw(im) for im in out]
    for n, f in enumerate(faces):
        im, d = out[f.image_index], draws[f.image_index]
        color = id_color(n)
        width = max(2, round(min(im.size) / 200))
        x0, y0, x1, y1 = (float(v) for v in f.box)
        d.rectangle([x0, y0, x1, y1], outline=color, width=width)
        r = max(1.5, width * 0.8)
        for x, y in np.asarray(f.kps, float):
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
        size = max(12, round((y1 - y0) * 0.25))
        label = str(n)
        font = _font(size)
        tx, ty = x0, max(0.0, y0 - size - 2 * width)
        bbox = d.textbbox((tx, ty), label, font=font)
        d.rectangle([bbox[0] - width, bbox[1] - width, bbox[2] + width, bbox[3] + width], fill=color)
        # dark text on light ID colours, white on dark ones
        text_color = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
        d.text((tx, ty), label, fill=text_color, font=font)
    return [np.asarray(im) for im in out]
