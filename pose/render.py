"""The InstantFamily control image: every person's OpenPose skeleton, drawn by controlnet-aux's own
drawing code (the images OpenPose ControlNets were trained on), then a filled circle in the ID's
palette colour at the face centre of each person that carries a stacked identity (paper sec. 4.2,
Fig. 5). People without an ID keep their skeleton and get no circle.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..palette import id_color
from .faceboxes import box_center, face_boxes_from_pose
from .keypoints import Person

DEFAULT_CIRCLE_SCALE = 0.2   # circle radius as a fraction of the face box width
MIN_CIRCLE_RADIUS = 4        # never smaller than an OpenPose joint dot (radius 4), or it vanishes


@lru_cache(maxsize=1)
def _openpose_drawing():
    """controlnet-aux's drawing functions and Keypoint type, imported once.

    Importing controlnet_aux loads every detector module (~5 s) and, without HF_HUB_OFFLINE, lets
    huggingface_hub retry the network; the drawing itself needs no weights.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # other detectors' import-time warnings are not ours
            from controlnet_aux.open_pose import util
            from controlnet_aux.open_pose.body import Keypoint
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError(
            "drawing poses needs controlnet-aux (pip install controlnet-aux==0.0.10 matplotlib): " + str(e)
        ) from e
    return util, Keypoint


def _keypoints(points: np.ndarray | None, body: bool) -> list | None:
    """(K, 3) normalised rows -> controlnet-aux Keypoint list (None for missing joints)."""
    if points is None:
        return None
    _, Keypoint = _openpose_drawing()
    out = []
    for x, y, c in points:
        if c > 0:
            out.append(Keypoint(float(x), float(y)))
        elif body:
            out.append(None)
        else:
            # hand/face drawers skip points at <= 0.01; send missing ones there
            out.append(Keypoint(-1.0, -1.0))
    return out


def _check_canvas(canvas_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    if h < 8 or w < 8:
        raise ValueError(f"canvas must be at least 8x8 pixels, got {w}x{h} (WxH)")
    return h, w


def render_skeletons(
    people: Sequence[Person], canvas_hw: tuple[int, int], hands: bool = False, face: bool = False
) -> np.ndarray:
    """All people's OpenPose skeletons on a black (H, W, 3) uint8 RGB canvas, exactly as
    controlnet-aux draws them (limbs at 60% colour, joints radius 4; optional hands and face)."""
    util, _ = _openpose_drawing()
    h, w = _check_canvas(canvas_hw)
    canvas = np.zeros((h, w, 3), np.uint8)
    for p in people:
        canvas = util.draw_bodypose(canvas, _keypoints(p.body, body=True))
        if hands:
            canvas = util.draw_handpose(canvas, _keypoints(p.hand_left, body=False))
            canvas = util.draw_handpose(canvas, _keypoints(p.hand_right, body=False))
        if face:
            canvas = util.draw_facepose(canvas, _keypoints(p.face, body=False))
    return canvas


def circle_radius(box: np.ndarray, circle_scale: float = DEFAULT_CIRCLE_SCALE) -> int:
    """Radius in pixels of an ID circle for a face box: ``circle_scale`` x box width, >= 4."""
    width = float(box[2]) - float(box[0])
    return max(MIN_CIRCLE_RADIUS, int(round(circle_scale * width)))


def draw_id_circles(
    canvas: np.ndarray,
    boxes: Sequence[np.ndarray | None],
    assignment: Sequence[int | None],
    circle_scale: float = DEFAULT_CIRCLE_SCALE,
) -> np.ndarray:
    """Filled ID-colour circles at the centre of ``boxes[i]`` for each person i with an ID (in place)."""
    import cv2

    if len(boxes) != len(assignment):
        raise ValueError(f"{len(boxes)} face boxes but {len(assignment)} assignment entries")
    for box, id_ in zip(boxes, assignment):
        if id_ is None:
            continue
        if box is None:
            raise ValueError(f"ID {id_} is assigned to a person without a face (no head keypoints)")
        cx, cy = box_center(box)
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), circle_radius(box, circle_scale),
                   tuple(int(c) for c in id_color(id_)), thickness=-1)
    return canvas


def render_control(
    people: Sequence[Person],
    assignment: Sequence[int | None],
    canvas_hw: tuple[int, int],
    face_boxes: Sequence[np.ndarray | None] | None = None,
    circle_scale: float = DEFAULT_CIRCLE_SCALE,
    hands: bool = False,
    face: bool = False,
) -> np.ndarray:
    """The control image (H, W, 3) uint8 RGB: all skeletons, then ID circles.

    ``assignment[i]``: ID of person i or None (see :func:`assign.assign_ids`). ``face_boxes[i]``:
    pixel face box of person i on this canvas (default: estimated from the head keypoints, see
    :func:`faceboxes.face_boxes_from_pose`); the circle sits at its centre, radius
    ``circle_scale`` x its width.
    """
    if len(assignment) != len(people):
        raise ValueError(f"assignment has {len(assignment)} entries for {len(people)} people")
    if face_boxes is None:
        face_boxes = face_boxes_from_pose(people, canvas_hw)
    canvas = render_skeletons(people, canvas_hw, hands=hands, face=face)
    return draw_id_circles(canvas, face_boxes, assignment, circle_scale)
