"""ID regions drawn by the user (the region editor's JSON) -> one mask per identity. ComfyUI-free.

The browser's region editor (``web/instantfamily.js``) stores the regions in a string widget, so the
same text is in the saved workflow and in the API prompt, and the same text always gives the same
masks. Format (version 1)::

    {"version": 1,
     "regions": [
        {"id": 0, "shape": "rect",    "x": 0.10, "y": 0.05, "w": 0.30, "h": 0.40},
        {"id": 1, "shape": "ellipse", "x": 0.55, "y": 0.10, "w": 0.30, "h": 0.35, "prompt": "smiling"}
     ]}

- ``x, y, w, h``: the region's bounding box as fractions of the picture width/height (left, top, width,
  height), so the regions follow the picture when its size changes; values are clipped to [0, 1] when
  masks are made, and a region must keep some area inside the picture.
- ``id``: the identity (0-based, stack order) the region belongs to. One region per ID, IDs 0..N-1 with
  none missing: mask n is ID n's region.
- ``shape``: ``rect`` or ``ellipse`` (the ellipse inscribed in the box).
- ``prompt`` (optional, default ""): a per-person prompt. It is accepted and carried (``Region.prompt``)
  for per-person prompting; the masks do not use it.
- Unknown keys are refused, so a typo ("widht") is an error rather than a silently ignored value.

Pixels follow :mod:`pose.masks`: a pixel is in a rectangle when its centre is inside the half-open box
[x0, x1) x [y0, y1) in pixels (x0 = x * W, ...), in an ellipse when its centre is inside or on it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .masks import SHAPES, box_mask, feather_mask

FORMAT_VERSION = 1
REGION_KEYS = {"id", "shape", "x", "y", "w", "h", "prompt"}
EMPTY = json.dumps({"version": FORMAT_VERSION, "regions": []})


class RegionError(ValueError):
    """The regions text is not valid; the message names the region and the field."""


@dataclass(frozen=True)
class Region:
    id: int
    shape: str
    x: float
    y: float
    w: float
    h: float
    prompt: str = ""

    def box_px(self, canvas_hw: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels of a (H, W) canvas, clipped to it."""
        hgt, wid = canvas_hw
        x0, y0 = max(0.0, self.x), max(0.0, self.y)
        x1, y1 = min(1.0, self.x + self.w), min(1.0, self.y + self.h)
        return x0 * wid, y0 * hgt, x1 * wid, y1 * hgt

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "shape": self.shape, "x": self.x, "y": self.y, "w": self.w, "h": self.h}
        if self.prompt:
            d["prompt"] = self.prompt
        return d


def _number(value: Any, where: str) -> float:
    # bool is an int in Python; true/false for a coordinate is a mistake, not 1/0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{where}: expected a finite number (a fraction of the picture size), got {value!r}")
    return float(value)


def parse_regions(text: str) -> list[Region]:
    """Parse and validate the editor's JSON; regions come back sorted by ID (0..N-1, none missing).
    An empty string means no regions."""
    if not isinstance(text, str):
        raise RegionError(f"regions: expected JSON text, got {type(text).__name__}")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegionError(f"regions: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); draw the "
                          "regions in the editor or give {\"version\": 1, \"regions\": [...]}") from None
    if isinstance(data, list):  # a bare list of regions is accepted
        data = {"version": FORMAT_VERSION, "regions": data}
    if not isinstance(data, dict) or not isinstance(data.get("regions"), list):
        raise RegionError("regions: expected an object {\"version\": 1, \"regions\": [...]}")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise RegionError(f"regions: format version {version!r} is not supported (this pack reads version "
                          f"{FORMAT_VERSION}); update the pack")
    extra = set(data) - {"version", "regions"}
    if extra:
        raise RegionError(f"regions: unknown top-level key(s) {sorted(extra)}; expected 'version' and 'regions'")
    out: list[Region] = []
    for i, r in enumerate(data["regions"]):
        where = f"regions[{i}]"
        if not isinstance(r, dict):
            raise RegionError(f"{where}: expected an object with id, shape, x, y, w, h, got {r!r}")
        unknown = set(r) - REGION_KEYS
        if unknown:
            raise RegionError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(REGION_KEYS)}")
        missing = [k for k in ("id", "x", "y", "w", "h") if k not in r]
        if missing:
            raise RegionError(f"{where}: missing {', '.join(missing)}")
        rid = r["id"]
        if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0:
            raise RegionError(f"{where}.id: expected an identity number >= 0, got {rid!r}")
        shape = r.get("shape", "rect")
        if shape not in SHAPES:
            raise RegionError(f"{where}.shape: expected one of {SHAPES}, got {shape!r}")
        x, y, w, h = (_number(r[k], f"{where}.{k}") for k in ("x", "y", "w", "h"))
        if w <= 0 or h <= 0:
            raise RegionError(f"{where} (ID {rid}): width and height must be > 0, got w={w}, h={h}")
        if min(1.0, x + w) <= max(0.0, x) or min(1.0, y + h) <= max(0.0, y):
            raise RegionError(f"{where} (ID {rid}): the region lies outside the picture (x={x}, y={y}, w={w}, "
                              f"h={h}; the picture is 0..1 in both directions)")
        prompt = r.get("prompt", "")
        if not isinstance(prompt, str):
            raise RegionError(f"{where}.prompt: expected text, got {prompt!r}")
        out.append(Region(rid, shape, x, y, w, h, prompt))
    out.sort(key=lambda reg: reg.id)
    ids = [reg.id for reg in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RegionError(f"regions: ID(s) {dup} have more than one region; give each identity one region")
    if ids != list(range(len(ids))):
        missing_ids = sorted(set(range(max(ids) + 1)) - set(ids))
        raise RegionError(f"regions: ID(s) {missing_ids} have no region; IDs must be 0..N-1 with none missing")
    return out


def dump_regions(regions: list[Region]) -> str:
    """The editor's JSON for ``regions`` (parse_regions(dump_regions(r)) == r)."""
    return json.dumps({"version": FORMAT_VERSION, "regions": [r.to_dict() for r in regions]})


def region_masks(regions: list[Region], canvas_hw: tuple[int, int], feather: float = 0) -> np.ndarray:
    """float32 (N, H, W): mask n is ID n's region on a (H, W) canvas (pixel-centre rule of pose.masks)."""
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    if h < 1 or w < 1:
        raise RegionError(f"picture size must be positive, got {w} x {h}")
    out = np.zeros((len(regions), h, w), np.float32)
    for n, r in enumerate(regions):
        m = box_mask(r.box_px((h, w)), (h, w), r.shape)
        if not m.any():
            raise RegionError(f"region of ID {r.id} covers no pixel centre of the {w} x {h} picture; make it larger")
        out[n] = feather_mask(m, feather) if feather else m
    return out


def face_regions(boxes: list, image_hw: tuple[int, int]) -> list[dict[str, float]]:
    """Face boxes (pixels of an (H, W) image) as normalised {x, y, w, h}: what the editor snaps boxes to."""
    h, w = image_hw
    out = []
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b)
        out.append({"x": x0 / w, "y": y0 / h, "w": (x1 - x0) / w, "h": (y1 - y0) / h})
    return out
