"""Face centre and face box of each person: estimated from head keypoints, or taken from detected
faces matched to people by position.

Boxes are pixel (x0, y0, x1, y1) float32 arrays on the target canvas, like ``Face.box``.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from .keypoints import L_EAR, L_EYE, L_SHOULDER, NECK, NOSE, R_EAR, R_EYE, R_SHOULDER, Person

# Anthropometric ratios for turning keypoint distances into a face width (the width of a detector's
# face box, cheek to cheek). Each is a typical adult value; the largest estimate wins because head
# turns only ever shorten projected distances.
EAR_TO_FACE_WIDTH = 1.0       # ear-to-ear ~ face box width
EYES_TO_FACE_WIDTH = 2.2      # inter-pupil distance ~ 0.45 face width
NECK_TO_FACE_WIDTH = 0.8      # face centre -> OpenPose neck (shoulder midpoint) ~ 1.25 face widths
SHOULDERS_TO_FACE_WIDTH = 0.4  # fallback: shoulder width ~ 2.5 face widths
FACE_ASPECT = 1.25            # detector face boxes are taller than wide (forehead to chin)
FALLBACK_FRACTION = 0.08      # last resort: face width = 8% of the shorter canvas side


class HasBox(Protocol):
    box: np.ndarray
    image_size: tuple[int, int]


def _dist(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float | None:
    if a is None or b is None:
        return None
    return math.hypot(a[0] - b[0], a[1] - b[1])


def face_center_from_pose(person: Person, canvas_hw: tuple[int, int]) -> tuple[float, float] | None:
    """Pixel face centre: the mean of the visible nose and eyes (the middle of a detector's face box
    lies between the eyes and the nose tip), else the mean of the visible ears; None without any
    head joint."""
    core = [person.joint_px(j, canvas_hw) for j in (NOSE, R_EYE, L_EYE)]
    core = [p for p in core if p is not None]
    if not core:
        core = [p for p in (person.joint_px(j, canvas_hw) for j in (R_EAR, L_EAR)) if p is not None]
    if not core:
        return None
    return float(np.mean([p[0] for p in core])), float(np.mean([p[1] for p in core]))


def face_box_from_pose(person: Person, canvas_hw: tuple[int, int]) -> np.ndarray | None:
    """Estimated pixel face box (x0, y0, x1, y1) of one person, centred on
    :func:`face_center_from_pose`; width = the largest of the keypoint-based estimates (see the
    module constants), height = 1.25 x width. None when the person has no head joint."""
    centre = face_center_from_pose(person, canvas_hw)
    if centre is None:
        return None
    j = lambda k: person.joint_px(k, canvas_hw)  # noqa: E731 - local shorthand
    estimates = []
    for d, ratio in (
        (_dist(j(R_EAR), j(L_EAR)), EAR_TO_FACE_WIDTH),
        (_dist(j(R_EYE), j(L_EYE)), EYES_TO_FACE_WIDTH),
        (_dist(j(NECK), centre), NECK_TO_FACE_WIDTH),
    ):
        if d is not None and d > 0:
            estimates.append(d * ratio)
    if not estimates:
        d = _dist(j(R_SHOULDER), j(L_SHOULDER))
        if d is not None and d > 0:
            estimates.append(d * SHOULDERS_TO_FACE_WIDTH)
    width = max(estimates) if estimates else FALLBACK_FRACTION * min(canvas_hw)
    height = width * FACE_ASPECT
    cx, cy = centre
    return np.array([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], np.float32)


def box_center(box: np.ndarray) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2.0, (float(box[1]) + float(box[3])) / 2.0


def box_in_canvas(box: np.ndarray, image_size: tuple[int, int], canvas_hw: tuple[int, int]) -> np.ndarray:
    """Scale a pixel box from the image it was detected in (H, W) to the canvas (H, W)."""
    sy = canvas_hw[0] / float(image_size[0])
    sx = canvas_hw[1] / float(image_size[1])
    b = np.asarray(box, np.float32).reshape(4)
    return np.array([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], np.float32)


def match_faces(
    pose_boxes: Sequence[np.ndarray | None], face_boxes: Sequence[np.ndarray]
) -> list[int | None]:
    """For each person, the index of the detected face box that belongs to them, or None.

    Minimum total centre distance (Hungarian); a pair only counts when the centres are closer than
    the larger of the two box widths, so a face far from every head stays unmatched.
    """
    from scipy.optimize import linear_sum_assignment

    result: list[int | None] = [None] * len(pose_boxes)
    rows = [i for i, b in enumerate(pose_boxes) if b is not None]
    if not rows or not face_boxes:
        return result
    big = 1e9
    cost = np.full((len(rows), len(face_boxes)), big)
    for r, i in enumerate(rows):
        pb = pose_boxes[i]
        pc = box_center(pb)
        for k, fb in enumerate(face_boxes):
            fc = box_center(fb)
            d = math.hypot(pc[0] - fc[0], pc[1] - fc[1])
            gate = max(float(pb[2] - pb[0]), float(fb[2] - fb[0]))
            if d < gate:
                cost[r, k] = d
    rr, cc = linear_sum_assignment(cost)
    for r, k in zip(rr, cc):
        if cost[r, k] < big:
            result[rows[r]] = int(k)
    return result


def face_boxes_from_pose(
    people: Sequence[Person],
    canvas_hw: tuple[int, int],
    faces: Sequence[HasBox] | None = None,
) -> list[np.ndarray | None]:
    """Pixel face box of each person on the canvas (None for a person without a head).

    With ``faces`` (detected in the image the pose came from; each with ``box`` and ``image_size``),
    a person matched to a detected face (:func:`match_faces`) takes that face's box, scaled to the
    canvas; unmatched people keep the keypoint estimate of :func:`face_box_from_pose`.
    """
    boxes = [face_box_from_pose(p, canvas_hw) for p in people]
    if faces:
        detected = [box_in_canvas(f.box, f.image_size, canvas_hw) for f in faces]
        for i, k in enumerate(match_faces(boxes, detected)):
            if k is not None:
                boxes[i] = detected[k]
    return boxes
