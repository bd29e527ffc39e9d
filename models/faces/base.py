"""What every backend provides: detect at one rung of its ladder, then embed the chosen faces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Detection:
    box: np.ndarray      # (4,) float32 x0, y0, x1, y1 in source pixels
    kps: np.ndarray      # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth (image left/right)
    score: float


@dataclass
class Encoded:
    embedding: np.ndarray        # (d_gf,) float32, L2-normalised
    local: np.ndarray | None     # (L, L, d_lf) float32, or None when the backend has no feature map
    crop: np.ndarray             # (112, 112, 3) uint8 RGB, ArcFace-aligned


@runtime_checkable
class FaceEncoder(Protocol):
    name: str                     # "insightface/antelopev2", "dlib"
    has_local: bool               # whether ``Encoded.local`` is filled
    ladder: tuple                 # detection attempts, tried in order until a face is found
    ladder_label: str             # how the ladder is named in messages, e.g. "det_size"

    def detect(self, image: np.ndarray, rung) -> list[Detection]:
        """Faces in one HxWx3 uint8 RGB image at one ladder rung (any order)."""
        ...

    def encode(self, image: np.ndarray, detections: list[Detection]) -> list[Encoded]:
        """Aligned crop, embedding and (if any) local map for each detection."""
        ...


def l2_normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def aligned_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """ArcFace-template crop by insightface's own similarity alignment (works on RGB as on BGR)."""
    from insightface.utils import face_align

    return face_align.norm_crop(image, landmark=np.asarray(kps, dtype=np.float32), image_size=size)
