"""Which faces become IDs, and in what order (ID n = the n-th face)."""
from __future__ import annotations

import re
from collections.abc import Sequence

from .types import Face

ORDERS: tuple[str, ...] = ("left_to_right", "size", "index_list")


def parse_index_list(text: str | Sequence[int]) -> list[int]:
    """'2, 0, 1' or '2 0 1' -> [2, 0, 1]."""
    if not isinstance(text, str):
        return [int(v) for v in text]
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"index_list: expected whole numbers like '2, 0, 1', got {text!r}") from None


def parse_faces_per_image(text: str | Sequence, n_images: int) -> list[int | None]:
    """How many faces to take from each image: None = all, k = the k largest.

    'auto': one image -> all faces (a group photo); several -> the largest face of each (one photo
    per person). Or one value for every image ('1', 'all'), or one per image ('1, all, 1').
    """
    if isinstance(text, str):
        parts = [p.strip().lower() for p in re.split(r"[,;]+", text.strip()) if p.strip()] or ["auto"]
    else:
        parts = [str(p).strip().lower() for p in text]
    if parts == ["auto"]:
        return [None] if n_images == 1 else [1] * n_images
    if len(parts) == 1:
        parts = parts * n_images
    if len(parts) != n_images:
        raise ValueError(
            f"faces_per_image: got {len(parts)} values for {n_images} images; give one value, "
            "one per image (e.g. '1, all'), or 'auto'"
        )
    out: list[int | None] = []
    for i, p in enumerate(parts):
        if p in ("all", "*"):
            out.append(None)
            continue
        try:
            k = int(p)
        except ValueError:
            raise ValueError(f"faces_per_image: value {i + 1} is {p!r}; use a number, 'all' or 'auto'") from None
        if k < 1:
            raise ValueError(f"faces_per_image: value {i + 1} must be >= 1 or 'all', got {k}")
        out.append(k)
    return out


def left_to_right_key(f: Face) -> tuple:
    # Image order first (one photo per person keeps the order the user wired), then x of the box
    # centre; y and then area break exact ties so equal x never depends on detector output order.
    cx, cy = f.center
    return (f.image_index, round(cx, 3), round(cy, 3), -f.area)


def size_key(f: Face) -> tuple:
    cx, cy = f.center
    return (f.image_index, -round(f.area, 3), round(cx, 3), round(cy, 3))


def order_faces(faces: Sequence[Face], order: str = "left_to_right",
                index_list: str | Sequence[int] = "") -> list[Face]:
    """``left_to_right`` (default), ``size`` (largest first), or ``index_list``: indices into the
    left-to-right order, e.g. '2, 0' = the third face as ID 0, the first as ID 1 (others dropped)."""
    if order == "left_to_right":
        return sorted(faces, key=left_to_right_key)
    if order == "size":
        return sorted(faces, key=size_key)
    if order == "index_list":
        base = sorted(faces, key=left_to_right_key)
        idx = parse_index_list(index_list)
        if not idx:
            raise ValueError("index_list: empty; give indices into the left-to-right order, e.g. '1, 0'")
        bad = [i for i in idx if not 0 <= i < len(base)]
        if bad:
            raise ValueError(
                f"index_list: {bad} out of range; {len(base)} faces were found (valid: 0..{len(base) - 1}, "
                "numbered left to right, see the preview)"
            )
        if len(set(idx)) != len(idx):
            raise ValueError(f"index_list: {idx} repeats a face; each face can be one ID only")
        return [base[i] for i in idx]
    raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
