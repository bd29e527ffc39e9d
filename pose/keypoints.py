"""Pose values: people as OpenPose-18 keypoints in normalised canvas coordinates.

The interchange format is comfyui_controlnet_aux's ``POSE_KEYPOINT``: a list (one entry per frame)
of ``{"people": [{"pose_keypoints_2d": [x, y, c, ...], "face_keypoints_2d": ..., "hand_left_keypoints_2d":
..., "hand_right_keypoints_2d": ...}], "canvas_width": W, "canvas_height": H}``. Producers write either
normalised (0-1) or pixel coordinates; a joint with confidence 0 is missing. Internally every
coordinate is normalised (x / W, y / H), so one pose renders on any canvas size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

# OpenPose-18 (COCO) joint indices, as used by controlnet-aux and comfyui_controlnet_aux.
NOSE, NECK = 0, 1
R_SHOULDER, R_ELBOW, R_WRIST = 2, 3, 4
L_SHOULDER, L_ELBOW, L_WRIST = 5, 6, 7
R_HIP, R_KNEE, R_ANKLE = 8, 9, 10
L_HIP, L_KNEE, L_ANKLE = 11, 12, 13
R_EYE, L_EYE, R_EAR, L_EAR = 14, 15, 16, 17
N_BODY = 18
N_FACE = 70
N_HAND = 21

# OpenPose BODY_25 -> OpenPose-18: BODY_25 adds MidHip (8) and six foot points (19-24).
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# A confident coordinate above this means the frame is in pixels. Normalised poses may stick out
# of the canvas a little (a hand raised past the top edge), pixel poses never fit in 2x2 pixels.
_PIXEL_THRESHOLD = 2.0

COORDS = ("auto", "normalized", "pixel")


class PoseFormatError(ValueError):
    """A pose value or file that cannot be read; the message says which part and how to fix it."""


@dataclass
class Person:
    """One person. Arrays are (K, 3) float32 rows of (x, y, confidence), x and y normalised to the
    canvas (0 = left/top, 1 = right/bottom); confidence <= 0 marks a missing joint."""

    body: np.ndarray                                 # (18, 3)
    face: np.ndarray | None = None                   # (70, 3) or None
    hand_left: np.ndarray | None = None              # (21, 3) or None
    hand_right: np.ndarray | None = None             # (21, 3) or None

    def has(self, joint: int) -> bool:
        return bool(self.body[joint, 2] > 0)

    def joint(self, joint: int) -> tuple[float, float] | None:
        """Normalised (x, y) of a body joint, or None when missing."""
        if not self.has(joint):
            return None
        return float(self.body[joint, 0]), float(self.body[joint, 1])

    def joint_px(self, joint: int, canvas_hw: tuple[int, int]) -> tuple[float, float] | None:
        """Pixel (x, y) of a body joint on a canvas of (H, W), or None when missing."""
        p = self.joint(joint)
        if p is None:
            return None
        h, w = canvas_hw
        return p[0] * w, p[1] * h


@dataclass
class PoseFrame:
    """All people of one picture and the canvas size (H, W) the pose was made for."""

    people: list[Person] = field(default_factory=list)
    canvas_hw: tuple[int, int] = (512, 512)


def _as_points(values: Any, n: int, what: str, allow_body25: bool = False) -> np.ndarray | None:
    """A flat [x, y, c, ...] list -> (n, 3) float32, or None for an absent/empty part."""
    if values is None:
        return None
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise PoseFormatError(f"{what} must be a flat list of numbers [x, y, confidence, ...]: {e}") from e
    if arr.size == 0:
        return None
    if arr.size % 3 != 0:
        raise PoseFormatError(
            f"{what} has {arr.size} numbers; expected x, y, confidence triples ({n * 3} numbers for {n} points)"
        )
    pts = arr.reshape(-1, 3)
    if allow_body25 and pts.shape[0] == 25:
        pts = pts[list(_BODY25_TO_18)]
    if pts.shape[0] != n:
        extra = " or 25 (BODY_25)" if allow_body25 else ""
        raise PoseFormatError(f"{what} has {pts.shape[0]} points; expected {n}{extra}")
    if not np.isfinite(pts).all():
        raise PoseFormatError(f"{what} contains NaN or infinite values")
    pts = pts.astype(np.float32)
    return pts


def _points_of(person: Person) -> Iterable[np.ndarray]:
    for part in (person.body, person.face, person.hand_left, person.hand_right):
        if part is not None:
            yield part


def _max_coord(people: Sequence[Person]) -> float:
    m = 0.0
    for p in people:
        for part in _points_of(p):
            present = part[part[:, 2] > 0]
            if present.size:
                m = max(m, float(np.abs(present[:, :2]).max()))
    return m


def _int_or_none(v: Any, what: str) -> int | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise PoseFormatError(f"{what} must be a number, got {v!r}") from e
    if not math.isfinite(f) or f < 1:
        raise PoseFormatError(f"{what} must be a positive size in pixels, got {v!r}")
    return int(round(f))


def frame_from_dict(
    frame: dict, coords: str = "auto", canvas_hw: tuple[int, int] | None = None, where: str = "pose"
) -> PoseFrame:
    """One POSE_KEYPOINT frame dict -> PoseFrame with normalised coordinates.

    ``coords``: "normalized", "pixel" or "auto" (pixel when any confident coordinate exceeds 2.0).
    ``canvas_hw``: (H, W) to use when the frame has no ``canvas_width``/``canvas_height``; pixel
    coordinates need one of the two.
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
    if not isinstance(frame, dict):
        raise PoseFormatError(f"{where} must be a dict with a 'people' list, got {type(frame).__name__}")
    if "people" not in frame:
        raise PoseFormatError(f"{where} has no 'people' list (keys: {sorted(frame)[:8]})")
    people_raw = frame["people"]
    if not isinstance(people_raw, list):
        raise PoseFormatError(f"{where}['people'] must be a list, got {type(people_raw).__name__}")
    w = _int_or_none(frame.get("canvas_width"), f"{where}['canvas_width']")
    h = _int_or_none(frame.get("canvas_height"), f"{where}['canvas_height']")
    if (w is None) != (h is None):
        raise PoseFormatError(f"{where} has only one of canvas_width / canvas_height; give both or neither")
    declared = (h, w) if w is not None else None

    people: list[Person] = []
    for i, raw in enumerate(people_raw):
        pw = f"{where}['people'][{i}]"
        if not isinstance(raw, dict):
            raise PoseFormatError(f"{pw} must be a dict with 'pose_keypoints_2d', got {type(raw).__name__}")
        body = _as_points(raw.get("pose_keypoints_2d"), N_BODY, f"{pw}['pose_keypoints_2d']", allow_body25=True)
        if body is None:
            # A person without body keypoints cannot be drawn or placed; skip like OpenPose does.
            continue
        people.append(Person(
            body=body,
            face=_as_points(raw.get("face_keypoints_2d"), N_FACE, f"{pw}['face_keypoints_2d']"),
            hand_left=_as_points(raw.get("hand_left_keypoints_2d"), N_HAND, f"{pw}['hand_left_keypoints_2d']"),
            hand_right=_as_points(raw.get("hand_right_keypoints_2d"), N_HAND, f"{pw}['hand_right_keypoints_2d']"),
        ))

    is_pixel = coords == "pixel" or (coords == "auto" and _max_coord(people) > _PIXEL_THRESHOLD)
    size = declared or canvas_hw
    if is_pixel:
        if size is None:
            raise PoseFormatError(
                f"{where} uses pixel coordinates but has no canvas_width/canvas_height; "
                "give the size of the image the pose was taken from"
            )
        hh, ww = size
        for p in people:
            for part in _points_of(p):
                part[:, 0] /= ww
                part[:, 1] /= hh
    if size is None:
        size = (512, 512)  # normalised pose without a canvas: ControlNet's usual size
    for p in people:
        for part in _points_of(p):
            part[part[:, 2] <= 0, :2] = 0.0  # missing joints carry no position
    return PoseFrame(people=people, canvas_hw=(int(size[0]), int(size[1])))


def frames_from_pose_keypoint(
    value: Any, coords: str = "auto", canvas_hw: tuple[int, int] | None = None
) -> list[PoseFrame]:
    """A POSE_KEYPOINT value (list of frame dicts, or one frame dict) -> list of PoseFrame."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise PoseFormatError(
            f"pose must be a POSE_KEYPOINT list of frames (dicts with 'people'), got {type(value).__name__}"
        )
    if len(value) == 0:
        raise PoseFormatError("pose is an empty list: it holds no frames")
    return [frame_from_dict(f, coords, canvas_hw, where=f"pose[{i}]") for i, f in enumerate(value)]


def load_pose_json(
    source: str | Path, coords: str = "auto", canvas_hw: tuple[int, int] | None = None
) -> list[PoseFrame]:
    """Read a keypoint JSON file: a POSE_KEYPOINT dump (list of frames), one frame dict, or an
    OpenPose ``*_keypoints.json`` (pixel coordinates, no canvas: pass ``canvas_hw``)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pose JSON file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PoseFormatError(
            f"{path.name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    try:
        return frames_from_pose_keypoint(data, coords, canvas_hw)
    except PoseFormatError as e:
        raise PoseFormatError(f"{path.name}: {e}") from e


def _flat(points: np.ndarray | None, scale: tuple[float, float]) -> list[float]:
    if points is None:
        return []
    out = points.astype(np.float64).copy()
    out[:, 0] *= scale[0]
    out[:, 1] *= scale[1]
    return [round(float(v), 6) for v in out.reshape(-1)]


def to_pose_keypoint(frames: Sequence[PoseFrame], coords: str = "normalized") -> list[dict]:
    """PoseFrames -> POSE_KEYPOINT (list of frame dicts) in normalised or pixel coordinates."""
    if coords not in ("normalized", "pixel"):
        raise ValueError(f"coords must be 'normalized' or 'pixel', got {coords!r}")
    out = []
    for f in frames:
        h, w = f.canvas_hw
        scale = (float(w), float(h)) if coords == "pixel" else (1.0, 1.0)
        out.append({
            "people": [
                {
                    "pose_keypoints_2d": _flat(p.body, scale),
                    "face_keypoints_2d": _flat(p.face, scale) or None,
                    "hand_left_keypoints_2d": _flat(p.hand_left, scale) or None,
                    "hand_right_keypoints_2d": _flat(p.hand_right, scale) or None,
                }
                for p in f.people
            ],
            "canvas_width": int(w),
            "canvas_height": int(h),
        })
    return out


def person_from_points(body: Sequence[Sequence[float] | None]) -> Person:
    """Build a Person from 18 normalised (x, y) pairs, None for a missing joint."""
    if len(body) != N_BODY:
        raise ValueError(f"expected {N_BODY} joints, got {len(body)}")
    arr = np.zeros((N_BODY, 3), np.float32)
    for i, p in enumerate(body):
        if p is not None:
            arr[i] = (p[0], p[1], 1.0)
    return Person(body=arr)
