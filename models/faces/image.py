"""Turn what users hand us (gray, RGBA, float, batches) into a list of HxWx3 uint8 RGB arrays."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Below this the detectors cannot see a face at all (SCRFD's smallest anchor is 16 px, dlib's HOG
# window is 80 px before upsampling); refusing early gives a clearer message than "no face".
MIN_SIDE = 32


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """One image as a contiguous HxWx3 uint8 RGB array.

    Accepts HxW (gray), HxWx1, HxWx3, HxWx4 (RGBA, composited over white so transparent
    backgrounds do not turn into black frames around the face), uint8 or float in 0-1.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected HxW or HxWxC pixels, got shape {tuple(a.shape)}")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or infinite pixel values")
        a = np.clip(a.astype(np.float32), 0.0, 1.0)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.integer):
        # 16-bit PNGs arrive as uint16.
        a = np.clip(a.astype(np.float32) / float(np.iinfo(a.dtype).max), 0.0, 1.0)
    else:
        raise ValueError(f"{name}: unsupported pixel type {a.dtype}")
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 4:
        alpha = a[:, :, 3:4]
        a = a[:, :, :3] * alpha + (1.0 - alpha)
    elif c != 3:
        raise ValueError(f"{name}: expected 1, 3 or 4 channels, got {c} (shape {tuple(a.shape)})")
    return np.ascontiguousarray(np.round(a * 255.0).astype(np.uint8))


def as_image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """A single image, a BxHxWxC batch, or a list of images (sizes may differ) -> list of RGB uint8."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            items = list(images)
        elif images.ndim in (2, 3):
            items = [images]
        else:
            raise ValueError(f"images: expected an image or a BxHxWxC batch, got shape {images.shape}")
    else:
        items = []
        for im in images:
            im = np.asarray(im)
            items.extend(list(im) if im.ndim == 4 else [im])
    if not items:
        raise ValueError("images: got no images; connect at least one photo")
    n = len(items)
    return [to_rgb_uint8(im, name=f"image {i + 1} of {n}") for i, im in enumerate(items)]
