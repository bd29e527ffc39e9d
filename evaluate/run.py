"""Score a run: encode nothing twice, one pass over the generated images, one result object.

Shared by the CLI (files) and the ComfyUI node (tensors): both build ``Request``s.
"""
from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..models.faces.base import FaceEncoder
from ..models.faces.types import Faces
from .errors import EvaluationInputError
from .identity import detect_faces
from .matching import DEFAULT_MIN_OVERLAP
from .score import ImageScore, aggregate, score_image
from .textsim import TextSimStatus


@dataclass
class Request:
    """One generated image to score."""

    name: str
    image: np.ndarray | Callable[[], np.ndarray]   # HxWx3 uint8 RGB, or a loader (files stay on disk)
    ids: list[int]
    prompt: str | None = None
    regions: list[np.ndarray] | Callable[[tuple[int, int]], list[np.ndarray] | None] | None = None


@dataclass
class Result:
    scores: list[ImageScore]
    summary: dict
    meta: dict
    id_names: list[str]
    ref_crops: list[np.ndarray] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "summary": self.summary,
                "images": [s.to_dict(self.id_names) for s in self.scores]}


def versions() -> dict[str, str]:
    """Versions of everything that can move the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("instantfamily-nodes", "numpy", "torch", "dlib-bin", "dlib", "insightface", "onnxruntime",
                 "facenet-pytorch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def check_references(encoder: FaceEncoder, refs: Faces) -> None:
    if len(refs) == 0:
        raise EvaluationInputError("references: no faces; encode one face per ID first")
    if refs.encoder and refs.encoder != encoder.name:
        raise EvaluationInputError(
            f"references were encoded with '{refs.encoder}' but the images are scored with '{encoder.name}': "
            "identity embeddings of different backends cannot be compared; use the same face encoder for both")


def evaluate(encoder: FaceEncoder, refs: Faces, id_names: Sequence[str], requests: Iterable[Request],
             match: str = "auto", min_overlap: float = DEFAULT_MIN_OVERLAP, textsim: TextSimStatus | None = None,
             progress: Callable[[int], None] | None = None) -> Result:
    """Detect, match and score every requested image; ``progress(done)`` after each."""
    check_references(encoder, refs)
    if len(id_names) != len(refs):
        raise EvaluationInputError(f"{len(id_names)} ID names for {len(refs)} references")
    ref_embs = [f.embedding for f in refs]
    scorer = textsim.scorer if textsim is not None else None
    scores: list[ImageScore] = []
    for k, req in enumerate(requests):
        img = req.image() if callable(req.image) else req.image
        size = (int(img.shape[0]), int(img.shape[1]))
        regions = req.regions(size) if callable(req.regions) else req.regions
        for i in req.ids:
            if not 0 <= i < len(refs):
                raise EvaluationInputError(f"{req.name}: ID {i} is out of range; there are {len(refs)} references")
        faces = detect_faces(encoder, img, want=len(req.ids))
        sc = score_image(req.name, ref_embs, req.ids, faces, regions, match, min_overlap, size)
        sc.prompt = req.prompt
        if scorer is not None and req.prompt:
            sc.text_sim = scorer([img], [req.prompt])[0]
        scores.append(sc)
        if progress is not None:
            progress(k + 1)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "face_backend": encoder.name,
        "similarity": "cosine of L2-normalised identity embeddings; scales differ between backends "
                      "(dlib: same person ~0.95-1, different people ~0.6-0.9), compare only within one backend",
        "match": match, "min_overlap": min_overlap,
        "text_sim": textsim.message if textsim is not None else "TextSim off",
        "references": list(id_names),
        "conventions": "a missing face scores SingleSim 0 and contributes 0 (not 1) to the MultiSim mixing term; "
                       "FastComposer score = min similarity after greedy matching among the N largest faces, "
                       "0 when fewer faces than IDs",
        "versions": versions(),
    }
    return Result(scores=scores, summary=aggregate(scores, list(id_names)), meta=meta, id_names=list(id_names),
                  ref_crops=[f.crop for f in refs])
