"""Which generated face belongs to which ID.

Two ways:
- ``match_by_regions``: by where each ID was generated (its mask, box or point). A face goes to the ID
  whose region it overlaps most, one face per ID (Hungarian assignment on the overlap). This judges
  the method the way it was asked to work: ID n's face must appear in ID n's place.
- ``match_greedy``: by similarity only (FastComposer's greedy matching), among the N largest faces.
  Used when positions are unknown; it can only flatter a method (a swapped pair still scores well).

Overlap of a face box with a region = |box ∩ region| / min(|box|, |region|): 1 when either contains
the other, so a tight face mask, a whole-body mask and a single point all work.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import EvaluationInputError
from .metrics import cosine_matrix, greedy_match

# Below this overlap a face is not in the ID's region (a neighbour's face touching a wide mask).
DEFAULT_MIN_OVERLAP = 0.3


COORDS = ("auto", "pixels", "normalized")


def region_from_spec(spec, size: tuple[int, int], where: str, coords: str = "auto") -> np.ndarray:
    """A boolean HxW region from a box [x0, y0, x1, y1], a point [x, y] or a mask array (any size:
    resized, > 0.5 is inside). ``coords``: 'pixels', 'normalized' (0-1) or 'auto' (normalized when
    every value is <= 1)."""
    if coords not in COORDS:
        raise EvaluationInputError(f"coords: expected one of {', '.join(COORDS)}, got {coords!r}")
    h, w = size
    if isinstance(spec, np.ndarray) and spec.ndim == 2:
        return mask_to_region(spec, size)
    try:
        vals = [float(v) for v in spec]
    except (TypeError, ValueError):
        raise EvaluationInputError(f"{where}: expected a box [x0, y0, x1, y1], a point [x, y] or a mask, "
                                   f"got {spec!r}") from None
    if len(vals) not in (2, 4):
        raise EvaluationInputError(f"{where}: expected 4 numbers (box) or 2 (point), got {len(vals)}: {spec!r}")
    if coords == "normalized" or (coords == "auto" and all(0.0 <= v <= 1.0 for v in vals)):
        vals = [v * (w if k % 2 == 0 else h) for k, v in enumerate(vals)]
    region = np.zeros((h, w), dtype=bool)
    if len(vals) == 2:
        x, y = int(min(max(vals[0], 0), w - 1)), int(min(max(vals[1], 0), h - 1))
        region[y, x] = True
        return region
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise EvaluationInputError(f"{where}: box {spec!r} is empty; expected x0 < x1 and y0 < y1")
    x0, x1 = int(np.floor(max(x0, 0))), int(np.ceil(min(x1, w)))
    y0, y1 = int(np.floor(max(y0, 0))), int(np.ceil(min(y1, h)))
    if x1 <= x0 or y1 <= y0:
        raise EvaluationInputError(f"{where}: box {spec!r} lies outside the {w}x{h} image")
    region[y0:y1, x0:x1] = True
    return region


def mask_to_region(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask (HxW, values 0-1 or 0-255) as a boolean region of ``size`` (nearest-neighbour resize:
    masks were usually drawn at the canvas size, possibly a latent-grid multiple of it)."""
    m = np.asarray(mask, dtype=np.float32)
    if m.max(initial=0) > 1.0:
        m = m / 255.0
    h, w = size
    if m.shape != (h, w):
        ys = (np.arange(h) * m.shape[0] / h).astype(int)
        xs = (np.arange(w) * m.shape[1] / w).astype(int)
        m = m[ys][:, xs]
    return m > 0.5


def box_overlap(box: Sequence[float], region: np.ndarray) -> float:
    """|box ∩ region| / min(|box|, |region|) in pixels; 0 for an empty region."""
    h, w = region.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    xa, xb = int(np.floor(max(x0, 0))), int(np.ceil(min(x1, w)))
    ya, yb = int(np.floor(max(y0, 0))), int(np.ceil(min(y1, h)))
    area_r = int(region.sum())
    if area_r == 0 or xb <= xa or yb <= ya:
        return 0.0
    inter = int(region[ya:yb, xa:xb].sum())
    return inter / min((xb - xa) * (yb - ya), area_r)


def match_by_regions(boxes: Sequence[Sequence[float]], regions: Sequence[np.ndarray],
                     min_overlap: float = DEFAULT_MIN_OVERLAP) -> list[int | None]:
    """For each ID (region), the index of its face in ``boxes`` or None; one face per ID."""
    n, m = len(regions), len(boxes)
    out: list[int | None] = [None] * n
    if n == 0 or m == 0:
        return out
    ov = np.array([[box_overlap(b, r) for b in boxes] for r in regions])
    # Ties (a point inside two boxes, two faces inside one wide mask): prefer the face whose centre is
    # nearest the region's centre. The tiny weight never overrides a real overlap difference.
    dist = np.zeros_like(ov)
    for i, r in enumerate(regions):
        ys, xs = np.nonzero(r)
        if len(xs):
            cx, cy = xs.mean(), ys.mean()
            diag = float(np.hypot(*r.shape))
            for j, b in enumerate(boxes):
                dist[i, j] = np.hypot((b[0] + b[2]) / 2 - cx, (b[1] + b[3]) / 2 - cy) / diag
    rows, cols = linear_sum_assignment(-(ov - 1e-3 * dist))
    for i, j in zip(rows, cols):
        if ov[i, j] >= min_overlap:
            out[int(i)] = int(j)
    return out


def largest(boxes: Sequence[Sequence[float]], k: int, scores: Sequence[float] | None = None) -> list[int]:
    """Indices of the k largest boxes, largest first (FastComposer's candidate faces). Equal areas are
    common (dlib's HOG boxes come in a few fixed sizes): the more confident detection goes first."""
    areas = [max(0.0, float(b[2] - b[0])) * max(0.0, float(b[3] - b[1])) for b in boxes]
    conf = list(scores) if scores is not None else [0.0] * len(boxes)
    return sorted(range(len(boxes)), key=lambda j: (-areas[j], -conf[j], j))[:k]


def match_greedy(refs: Sequence[np.ndarray], embeddings: Sequence[np.ndarray],
                 boxes: Sequence[Sequence[float]], scores: Sequence[float] | None = None) -> list[int | None]:
    """For each reference, its face index by greedy similarity matching among the N largest faces."""
    out: list[int | None] = [None] * len(refs)
    cand = largest(boxes, len(refs), scores)
    if not cand or not len(refs):
        return out
    sim = cosine_matrix(refs, [embeddings[j] for j in cand])
    for i, j in greedy_match(sim):
        out[i] = cand[j]
    return out
