"""Per-identity masks for the masked cross-attention, in ID order, and their colour preview.

Margin (the paper's "25% margin added to the face detector's box"): the box grows by ``margin``
times its own width and height IN TOTAL, half on each side. With the default 0.25 an 80 x 96 box
becomes 100 x 120, 10 px wider on the left and right and 12 px taller at top and bottom.

Pixel rule: pixel (row r, column c) covers the square [c, c+1) x [r, r+1); it is inside a rectangle
when its centre (c + 0.5, r + 0.5) is inside the half-open box [x0, x1) x [y0, y1), and inside an
ellipse (the one inscribed in the grown box) when its centre is inside or on the ellipse. So a box
with integer corners covers exactly columns x0..x1-1 and rows y0..y1-1.

Feather: ``feather`` pixels of linear fall-off OUTSIDE the hard mask (the margin region stays 1):
a pixel at Euclidean distance d (pixel centres) from the nearest mask pixel gets
max(0, 1 - d / (feather + 1)).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..palette import id_color

SHAPES = ("rect", "ellipse")
DEFAULT_MARGIN = 0.25


def expand_box(box: np.ndarray | Sequence[float], margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Grow a pixel box (x0, y0, x1, y1) by ``margin`` x its size in total, margin/2 on each side."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (0.25 = 25% larger), got {margin}")
    b = np.asarray(box, np.float64).reshape(4)
    w, h = b[2] - b[0], b[3] - b[1]
    if not (w > 0 and h > 0):
        raise ValueError(f"face box {b.tolist()} has no area; expected x0 < x1 and y0 < y1")
    dx, dy = w * margin / 2.0, h * margin / 2.0
    return np.array([b[0] - dx, b[1] - dy, b[2] + dx, b[3] + dy], np.float64)


def box_mask(box: np.ndarray | Sequence[float], canvas_hw: tuple[int, int], shape: str = "rect") -> np.ndarray:
    """Binary (H, W) float32 mask of a pixel box, by the pixel-centre rule of this module."""
    if shape not in SHAPES:
        raise ValueError(f"mask shape must be one of {SHAPES}, got {shape!r}")
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"canvas size must be positive, got {canvas_hw}")
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    xs = np.arange(w, dtype=np.float64) + 0.5
    ys = np.arange(h, dtype=np.float64) + 0.5
    if shape == "rect":
        inside = ((ys[:, None] >= y0) & (ys[:, None] < y1)) & ((xs[None, :] >= x0) & (xs[None, :] < x1))
    else:
        cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        inside = ((xs[None, :] - cx) / a) ** 2 + ((ys[:, None] - cy) / b) ** 2 <= 1.0
    return inside.astype(np.float32)


def feather_mask(mask: np.ndarray, feather: float) -> np.ndarray:
    """Linear fall-off over ``feather`` pixels outside the mask's full-strength (==1) pixels."""
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    m = np.asarray(mask, np.float32)
    if feather == 0:
        return m.copy()
    core = m >= 1.0
    if not core.any():
        return m.copy()
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~core)
    ramp = np.clip(1.0 - d / (float(feather) + 1.0), 0.0, 1.0).astype(np.float32)
    return np.maximum(m, ramp)


def id_masks(
    boxes: Sequence[np.ndarray | Sequence[float] | None],
    canvas_hw: tuple[int, int],
    margin: float = DEFAULT_MARGIN,
    shape: str = "rect",
    feather: float = 0,
) -> np.ndarray:
    """One mask per identity from its face box, in ID order: (N, H, W) float32 in [0, 1].

    ``boxes[n]`` is the pixel face box (x0, y0, x1, y1) of ID n on the canvas; each grows by
    ``margin`` (see the module docstring), is drawn as a rectangle or inscribed ellipse, clipped to
    the canvas and feathered by ``feather`` pixels.
    """
    out = np.zeros((len(boxes), int(canvas_hw[0]), int(canvas_hw[1])), np.float32)
    for n, box in enumerate(boxes):
        if box is None:
            raise ValueError(f"ID {n} has no face box; every stacked identity needs a face region")
        m = box_mask(expand_box(box, margin), canvas_hw, shape)
        if not m.any():
            raise ValueError(
                f"the mask of ID {n} (box {np.round(np.asarray(box, float), 1).tolist()}) lies outside "
                f"the {canvas_hw[1]}x{canvas_hw[0]} canvas"
            )
        out[n] = feather_mask(m, feather)
    return out


def check_user_masks(
    masks: np.ndarray, n_ids: int | None, canvas_hw: tuple[int, int] | None, feather: float = 0
) -> np.ndarray:
    """Validate user-drawn masks (N, H, W) or (H, W) in ID order and return them as float32 in
    [0, 1], feathered. Wrong count or size raise, saying what was expected."""
    m = np.asarray(masks, np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be a batch [N, H, W], got shape {tuple(m.shape)}")
    if n_ids is not None and m.shape[0] != n_ids:
        raise ValueError(
            f"got {m.shape[0]} masks for {n_ids} identities; give one mask per identity, in ID order"
        )
    if canvas_hw is not None and tuple(m.shape[1:]) != tuple(canvas_hw):
        raise ValueError(
            f"masks are {m.shape[2]}x{m.shape[1]} (WxH) but the canvas is {canvas_hw[1]}x{canvas_hw[0]}; "
            "resize the masks or set the canvas to the mask size"
        )
    if not np.isfinite(m).all():
        raise ValueError("masks contain NaN or infinite values")
    m = np.clip(m, 0.0, 1.0)
    for n in range(m.shape[0]):
        if not (m[n] > 0).any():
            raise ValueError(f"mask {n} is empty; every identity needs a region")
        m[n] = feather_mask(m[n], feather)
    return m


def mask_overlay(masks: np.ndarray, base: np.ndarray | None = None, alpha: float = 0.55) -> np.ndarray:
    """HxWx3 uint8 preview: each ID's mask tinted in its palette colour over ``base`` (black if None)."""
    m = np.asarray(masks, np.float32)
    if m.ndim == 2:
        m = m[None]
    h, w = m.shape[1:]
    out = np.zeros((h, w, 3), np.float32) if base is None else np.asarray(base, np.float32).copy()
    if out.shape != (h, w, 3):
        raise ValueError(f"preview base image is {out.shape}, masks are {h}x{w}")
    for n in range(m.shape[0]):
        a = (alpha * m[n])[..., None]
        out = out * (1 - a) + np.asarray(id_color(n), np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
