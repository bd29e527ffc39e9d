"""The FACES value: what face encoding hands to pose, masks, the embedding stack and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Face:
    """One detected identity.

    Coordinates are pixels of the source image (x right, y down). ``local`` is the recognition
    network's last 2-D feature map, (L, L, d_lf), or None when the backend has none (dlib).
    """

    box: np.ndarray                  # (4,) float32: x0, y0, x1, y1
    kps: np.ndarray                  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth
    embedding: np.ndarray            # (d_gf,) float32, L2-normalised
    local: np.ndarray | None         # (L, L, d_lf) float32 or None
    crop: np.ndarray                 # (112, 112, 3) uint8 RGB aligned crop
    score: float                     # detection score
    image_index: int                 # index of the source image in the input batch
    image_size: tuple[int, int]      # (H, W) of the source image

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class Faces:
    """An ordered list of identities (ID n = faces[n]) and the encoder that produced them."""

    faces: list[Face] = field(default_factory=list)
    encoder: str = ""                # e.g. "insightface/antelopev2" or "dlib"

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self):
        return iter(self.faces)

    def __getitem__(self, i: int) -> Face:
        return self.faces[i]

    @property
    def has_local(self) -> bool:
        return bool(self.faces) and all(f.local is not None for f in self.faces)


def merge_faces(groups: list[Faces]) -> Faces:
    """Concatenate identities in order: the IDs of ``groups[0]`` first, then ``groups[1]``'s, ...

    Source image indices are renumbered so they stay distinct (group k's images come after group
    k-1's). All groups must come from the same encoder: their embeddings are not comparable otherwise.
    """
    encoders = {g.encoder for g in groups if len(g)}
    if len(encoders) > 1:
        raise ValueError(f"faces come from different encoders {sorted(encoders)}; encode all photos with one encoder")
    merged: list[Face] = []
    offset = 0
    for g in groups:
        for f in g:
            merged.append(replace(f, image_index=f.image_index + offset))
        offset += max((f.image_index for f in g), default=-1) + 1
    return Faces(merged, encoder=encoders.pop() if encoders else "")
