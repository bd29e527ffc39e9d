"""An SCRFD-shaped face detector for the synthetic world, written as fixed (not learned) tensor operations
and exported to ONNX, so insightface's own ``SCRFD`` class decodes it exactly like a real SCRFD model.

It relies on the world's brightness contract (:mod:`.world`): a pixel is "face" when its brightest
channel is above 127.5 (the zero point of SCRFD's input normalisation, ``(pixel - 127.5) / 128``).
Faces are separated rectangles, so a face's exact extent is the bounding box of its connected region:

1. per 4 x 4 cell, the exact min/max x and y of its face pixels (max-pools of coordinates);
2. geodesic max-propagation inside the face cells (``T`` rounds of a 3 x 3 max-pool restricted to face
   cells) gives every cell of a face the extent of the whole face;
3. on the stride-8 grid, the one cell that holds the box centre fires (score 1), with SCRFD's box
   distances and 5 keypoints (:func:`.world.face_kps`: ArcFace's template on the box-height square);
   strides 16 and 32 never fire. Two anchors per cell give identical boxes; insightface's NMS keeps one.

Regions smaller than ``MIN_FACE`` detector pixels or with a height/width ratio outside 0.9-1.7 are
ignored (noise specks, cut-off faces). Boxes are exact to a fraction of a pixel on world renders.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .world import ARCFACE_DST

PROPAGATION_ROUNDS = 64      # a face up to 4 * 2 * 64 = 512 detector pixels tall is measured exactly
MIN_FACE = 12.0              # detector pixels
EDGE_BIAS = 0.35             # detector pixels taken off each side (see forward)
_BIG = 1.0e6


def _module():
    import torch
    from torch import nn
    from torch.nn import functional as F

    tmpl = torch.tensor((ARCFACE_DST / 112.0 - 0.5).reshape(1, 10), dtype=torch.float32)

    class WorldScrfd(nn.Module):
        """(1, 3, H, W) normalised RGB -> SCRFD's 9 outputs (scores, boxes, keypoints for strides 8/16/32)."""

        def forward(self, x):
            face = (x.amax(1, keepdim=True) > 0).float()                  # (1, 1, H, W)
            ones = torch.ones_like(face)
            xs = torch.cumsum(ones, 3) - 1.0                                # pixel column index
            ys = torch.cumsum(ones, 2) - 1.0
            neg = (face - 1.0) * _BIG                                       # 0 on faces, -BIG elsewhere
            per_pixel = torch.cat([xs + 1.0 + neg, -xs + neg, ys + 1.0 + neg, -ys + neg], 1)
            v = F.max_pool2d(per_pixel, 4, 4)                               # (1, 4, H/4, W/4): exact per cell
            has = F.max_pool2d(face, 4, 4)
            blocked = (has - 1.0) * _BIG                                    # 0 in face cells, -BIG elsewhere
            for _ in range(PROPAGATION_ROUNDS):                            # the whole face's extent everywhere
                v = F.max_pool2d(v, 3, 1, 1) * has + blocked
            v8 = F.max_pool2d(v, 2, 2)                                      # (1, 4, H/8, W/8)
            has8 = F.max_pool2d(has, 2, 2)
            # Bilinear upscaling by insightface and the max over channels push the thresholded edge
            # outwards by ~0.1 x the upscale factor (measured: 0.4-0.6 px at 128 -> 640); EDGE_BIAS
            # takes the typical part back.
            x1, x0 = v8[:, 0:1] - EDGE_BIAS, -v8[:, 1:2] + EDGE_BIAS
            y1, y0 = v8[:, 2:3] - EDGE_BIAS, -v8[:, 3:4] + EDGE_BIAS
            cols = torch.cumsum(torch.ones_like(has8), 3) - 1.0
            rows = torch.cumsum(torch.ones_like(has8), 2) - 1.0
            ax, ay = cols * 8.0, rows * 8.0
            cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
            w, h = x1 - x0, y1 - y0
            hit = ((cx >= ax) & (cx < ax + 8.0) & (cy >= ay) & (cy < ay + 8.0) & (has8 > 0)
                   & (w >= MIN_FACE) & (h >= MIN_FACE) & (h >= 0.9 * w) & (h <= 1.7 * w)).float()
            safe = lambda t: t * hit                                        # noqa: E731 - no BIG values out
            dist = torch.cat([safe(ax - x0), safe(ay - y0), safe(x1 - ax), safe(y1 - ay)], 1) / 8.0
            side = safe(h)
            kx = (safe(cx) - ax * hit)[:, :, :, :, None]                    # (1, 1, h8, w8, 1)
            ky = (safe(cy) - ay * hit)[:, :, :, :, None]
            t = tmpl.reshape(1, 1, 1, 1, 10)
            even = torch.tensor([1.0, 0.0] * 5).reshape(1, 1, 1, 1, 10)
            kps = (even * kx + (1 - even) * ky + t * side[:, :, :, :, None]) / 8.0
            kps = kps[:, 0]                                                 # (1, h8, w8, 10)

            def rows_of(t4):  # (1, C, h, w) -> (h * w * 2, C): row-major cells, 2 anchors each, like SCRFD
                cells = t4.permute(0, 2, 3, 1)
                return torch.cat([cells, cells], 3).reshape(-1, t4.shape[1])

            s8 = rows_of(hit)
            b8 = rows_of(dist)
            k8 = torch.cat([kps, kps], 3).reshape(-1, 10)
            outs_s, outs_b, outs_k = [s8], [b8], [k8]
            for s in (16, 32):
                p = F.avg_pool2d(x[:, :1], s, s) * 0.0
                outs_s.append(rows_of(p))
                outs_b.append(rows_of(torch.cat([p] * 4, 1)))
                outs_k.append(rows_of(torch.cat([p] * 10, 1)))
            return (*outs_s, *outs_b, *outs_k)

    return WorldScrfd().eval()


def export_world_detector(path: str | os.PathLike) -> Path:
    """Write the detector ONNX (dynamic H and W, like insightface's SCRFD files) to ``path``."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_module(), torch.zeros(1, 3, 640, 640), str(path), opset_version=17, dynamo=False,
                          input_names=["input.1"], output_names=names,
                          dynamic_axes={"input.1": {2: "H", 3: "W"}})
    return path


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
