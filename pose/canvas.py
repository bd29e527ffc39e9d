"""The one aspect rule: a mask, pose or face layout is never stretched onto another aspect ratio.

Scaling uniformly is fine (a 512x768 mask on a 64x96 latent); a different aspect is an error naming
both sizes, so a face region can never silently drift off the face it was drawn for. Sizes match
when the source, scaled to the target's height, is within one step (or 1%) of the target's width. A
step is 8 image pixels, because ComfyUI image sizes go in steps of 8 (one latent pixel): a 768x512
pose at 256 px wide is 256x168, not 256x170.7. Between latent grids the step is 1.
"""
from __future__ import annotations

ASPECT_TOLERANCE = 0.01
SIZE_STEP = 8        # image pixels per latent pixel: the step of ComfyUI's image sizes


def same_aspect(src_hw: tuple[int, int], dst_hw: tuple[int, int], step: float = SIZE_STEP) -> bool:
    """Whether ``src_hw`` scales uniformly onto ``dst_hw`` (both (H, W)) within ``step`` pixels of
    ``dst`` (8 for image sizes, 1 for latent grids) or 1%."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if min(sh, sw, dh, dw) <= 0:
        return False
    fitted_w = sw * dh / sh
    return abs(fitted_w - dw) <= max(float(step), ASPECT_TOLERANCE * dw)


def check_same_aspect(src_hw: tuple[int, int], dst_hw: tuple[int, int], src: str, dst: str, fix: str,
                      step: float = SIZE_STEP) -> None:
    """Raise a ValueError naming both sizes (W x H) when ``src`` would be stretched onto ``dst``."""
    if not same_aspect(src_hw, dst_hw, step):
        (sh, sw), (dh, dw) = src_hw, dst_hw
        raise ValueError(
            f"{src} is {sw}x{sh} (WxH) but {dst} is {dw}x{dh}: aspect ratios {sw / sh:.3f} and {dw / dh:.3f} "
            f"differ, and InstantFamily does not stretch one onto the other. {fix}"
        )


def fit_canvas(source_hw: tuple[int, int], width: int, height: int, source: str) -> tuple[int, int]:
    """The canvas (H, W) for a layout drawn on ``source_hw``: its own size when width and height are 0,
    the other side following its aspect when only one is set, and both (same aspect only) when both are."""
    h, w = int(source_hw[0]), int(source_hw[1])
    width, height = int(width), int(height)
    if width <= 0 and height <= 0:
        return h, w
    if height <= 0:
        return max(1, round(h * width / w)), width
    if width <= 0:
        return height, max(1, round(w * height / h))
    check_same_aspect((h, w), (height, width), source, "the requested canvas",
                      "Set width and height to the same aspect, set only one of them (the other follows), "
                      "or use a pose/photo of the target's aspect")
    return height, width
