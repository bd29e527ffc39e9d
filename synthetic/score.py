"""Identity by position: did each identity land where it was asked to go?

For a generated (or rendered) picture, the face region each identity was assigned to (its box) is
cropped exactly as the pack aligns faces (the box-height square onto 112 x 112, see
:func:`.world.face_kps`), embedded by the world's recognition net through the pack's face encoder, and
classified by the largest cosine to the class weights, either among the N identities of the picture (did
the right one of the stacked IDs land here?) or among all K identities of the world.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .recognizer import _fast_crop, classify

if TYPE_CHECKING:
    from ..evaluate.score import ImageScore


@dataclass
class PositionScores:
    """Per picture and position: the identity asked for, the one found among N, the one found among K."""

    asked: list[list[int]] = field(default_factory=list)
    found_among_n: list[list[int]] = field(default_factory=list)
    found_among_k: list[list[int]] = field(default_factory=list)

    def accuracy(self, among: str = "n") -> float:
        found = self.found_among_n if among == "n" else self.found_among_k
        pairs = [(a, f) for asked, fnd in zip(self.asked, found) for a, f in zip(asked, fnd)]
        return float(np.mean([a == f for a, f in pairs])) if pairs else float("nan")


def score_positions(encoder, classes: np.ndarray, images: Sequence[np.ndarray],
                    boxes: Sequence[np.ndarray], identities: Sequence[Sequence[int]],
                    scores: PositionScores | None = None) -> PositionScores:
    """Add ``images`` to ``scores``: ``boxes[i]`` (N, 4) pixel boxes where ``identities[i]`` (N world
    identity indices) were placed. ``encoder`` is an ``InsightFaceEncoder`` on the world's pack."""
    scores = scores or PositionScores()
    for image, bxs, ids in zip(images, boxes, identities):
        ids = [int(i) for i in ids]
        bxs = np.asarray(bxs, np.float32).reshape(-1, 4)
        if len(bxs) != len(ids):
            raise ValueError(f"{len(bxs)} boxes for {len(ids)} identities")
        crops = np.stack([_fast_crop(np.asarray(image), b, None) for b in bxs])
        emb, _ = encoder.recognizer.run(crops, with_local=False)     # the pack's edited-ONNX session
        scores.asked.append(ids)
        scores.found_among_n.append([int(c) for c in classify(emb, classes, among=ids)])
        scores.found_among_k.append([int(c) for c in classify(emb, classes)])
    return scores


def reference_embeddings(encoder, portraits: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The world net's embedding of each reference portrait (one person each, in ID order), through
    evaluate/'s reference path (the same ``encode_faces`` the nodes use)."""
    from ..evaluate.identity import encode_references

    faces = encode_references(encoder, list(portraits), [f"portrait {i}" for i in range(len(portraits))])
    return [f.embedding for f in faces]


def picture_scores(encoder, refs: Sequence[np.ndarray], image: np.ndarray, boxes: np.ndarray,
                   name: str = "") -> "ImageScore":
    """evaluate/'s scores of one picture (SingleSim, MultiSim, FastComposer's greedy-min), with the world's
    detector and net: every face the detector finds in ``image``, matched to the IDs by the places they were
    asked for (``boxes``, (N, 4) pixels, ID order) as the evaluation matches them by ID masks. Unlike
    :func:`score_positions`, which classifies the asked crop whatever is drawn there, a face the detector
    misses scores 0 here."""
    from ..evaluate.identity import detect_faces
    from ..evaluate.matching import region_from_spec
    from ..evaluate.score import score_image

    hw = image.shape[:2]
    regions = [region_from_spec(b, hw, f"{name} box {i}", coords="pixels") for i, b in enumerate(np.asarray(boxes))]
    faces = detect_faces(encoder, np.asarray(image), want=len(refs))
    return score_image(name, list(refs), list(range(len(refs))), faces, regions, match="regions", size=hw)
