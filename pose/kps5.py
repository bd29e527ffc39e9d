"""InstantID-style five-keypoint control image (eyes, nose, mouth corners), an alternative to the
OpenPose control for IdentityNet-like ControlNets.

Drawn the way InstantID draws it: the four nose-centred sticks (stick half-width 4) in the colour of
their outer point at 60% intensity, then filled circles (radius 10) at the five points in the
per-point colours red, green, blue, yellow, magenta.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

KPS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
)
STICKS = ((0, 2), (1, 2), (3, 2), (4, 2))   # every point to the nose
STICK_WIDTH = 4
POINT_RADIUS = 10


class HasKps(Protocol):
    box: np.ndarray
    kps: np.ndarray
    image_size: tuple[int, int]


def kps_in_canvas(face: HasKps, canvas_hw: tuple[int, int]) -> np.ndarray:
    """A face's (5, 2) keypoints scaled from its source image to the canvas."""
    sy = canvas_hw[0] / float(face.image_size[0])
    sx = canvas_hw[1] / float(face.image_size[1])
    k = np.asarray(face.kps, np.float64).reshape(5, 2)
    return np.stack([k[:, 0] * sx, k[:, 1] * sy], axis=1)


def kps_into_box(face: HasKps, target_box: np.ndarray) -> np.ndarray:
    """Move a face's keypoints into another face box: the face box maps onto ``target_box`` with
    one uniform scale (the mean of the width and height ratios, so the face keeps its shape) and the
    box centres coincide."""
    src = np.asarray(face.box, np.float64).reshape(4)
    dst = np.asarray(target_box, np.float64).reshape(4)
    sw, sh = src[2] - src[0], src[3] - src[1]
    if not (sw > 0 and sh > 0):
        raise ValueError(f"face box {src.tolist()} has no area")
    s = ((dst[2] - dst[0]) / sw + (dst[3] - dst[1]) / sh) / 2.0
    sc = np.array([(src[0] + src[2]) / 2, (src[1] + src[3]) / 2])
    dc = np.array([(dst[0] + dst[2]) / 2, (dst[1] + dst[3]) / 2])
    return (np.asarray(face.kps, np.float64).reshape(5, 2) - sc) * s + dc


def render_kps5(kps_list: Sequence[np.ndarray], canvas_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB image with the five keypoints of each face (pixel coordinates)."""
    import cv2

    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"canvas size must be positive, got {canvas_hw}")
    sticks = np.zeros((h, w, 3), np.float64)
    for kps in kps_list:
        k = np.asarray(kps, np.float64).reshape(5, 2)
        for a, b in STICKS:
            (xa, ya), (xb, yb) = k[a], k[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), STICK_WIDTH),
                                    int(angle), 0, 360, 1)
            cv2.fillConvexPoly(sticks, poly, KPS_COLORS[a])
    out = (sticks * 0.6).astype(np.uint8)
    for kps in kps_list:
        for i, (x, y) in enumerate(np.asarray(kps, np.float64).reshape(5, 2)):
            cv2.circle(out, (int(x), int(y)), POINT_RADIUS, KPS_COLORS[i], thickness=-1)
    return out


def kps5_for_faces(
    faces: Sequence[HasKps],
    canvas_hw: tuple[int, int],
    target_boxes: Sequence[np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """Canvas keypoints of each face: moved into ``target_boxes[n]`` when given (e.g. the face box of
    the person that ID n is assigned to), else where the face was detected, scaled to the canvas."""
    out = []
    for n, f in enumerate(faces):
        if target_boxes is not None:
            if target_boxes[n] is None:
                raise ValueError(f"ID {n} has no target face box")
            out.append(kps_into_box(f, target_boxes[n]))
        else:
            out.append(kps_in_canvas(f, canvas_hw))
    return out


__all__ = ["render_kps5", "kps5_for_faces", "kps_in_canvas", "kps_into_box", "KPS_COLORS"]
