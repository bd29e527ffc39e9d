"""dlib backend (dlib-bin + face_recognition_models): fully offline detection, landmarks and the
128-d ResNet identity embedding. It has no 2-D feature map, so ``has_local`` is False."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Detection, Encoded, aligned_crop, l2_normalize
from .errors import ModelFolderError

_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


def default_model_dir() -> Path:
    """face_recognition_models' data folder, found without importing it (its __init__ needs
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError(
            "dlib backend: the face_recognition_models package is not installed; "
            "pip install dlib-bin face_recognition_models"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _kps_from_68(pts: np.ndarray) -> np.ndarray:
    """insightface's 5 points from dlib's 68: eye centres, nose tip, mouth corners (image left first)."""
    return np.stack([
        pts[36:42].mean(0),   # image-left eye
        pts[42:48].mean(0),   # image-right eye
        pts[30],              # nose tip
        pts[48],              # image-left mouth corner
        pts[54],              # image-right mouth corner
    ]).astype(np.float32)


class DlibEncoder:
    """HOG detector; the ladder is HOG's upsampling count (0, then 1 to find smaller faces).

    dlib's HOG scores are SVM margins, not probabilities; 0 is dlib's own default threshold.
    """

    has_local = False
    ladder_label = "dlib upsample"
    name = "dlib"
    device = "CPU"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        upsample: Sequence[int] = (0, 1),
        threshold: float = 0.0,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise ModelFolderError("dlib backend: dlib is not installed; pip install dlib-bin") from exc
        root = Path(model_dir) if model_dir is not None else default_model_dir()
        missing = [f for f in _FILES.values() if not (root / f).is_file()]
        if missing:
            raise ModelFolderError(
                f"dlib backend: missing {', '.join(missing)} in {root}; "
                "pip install face_recognition_models (it ships them)"
            )
        self.model_dir = root
        self.ladder = tuple(int(u) for u in upsample)
        self.threshold = float(threshold)
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(root / _FILES["landmarks"]))
        self._recognizer = dlib.face_recognition_model_v1(str(root / _FILES["recognition"]))
        self._dlib = dlib

    def detect(self, image: np.ndarray, rung: int) -> list[Detection]:
        rects, scores, _ = self._detector.run(image, int(rung), self.threshold)
        out: list[Detection] = []
        h, w = image.shape[:2]
        for r, s in zip(rects, scores):
            shape = self._landmarks(image, r)
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            box = np.array([max(r.left(), 0), max(r.top(), 0), min(r.right() + 1, w), min(r.bottom() + 1, h)],
                           dtype=np.float32)
            det = Detection(box=box, kps=_kps_from_68(pts), score=float(s))
            det._shape = shape  # type: ignore[attr-defined]  # reused by encode(): same landmarks
            out.append(det)
        return out

    def encode(self, image: np.ndarray, detections: list[Detection]) -> list[Encoded]:
        out: list[Encoded] = []
        for d in detections:
            shape = getattr(d, "_shape", None)
            if shape is None:
                x0, y0, x1, y1 = (int(round(v)) for v in d.box)
                shape = self._landmarks(image, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
            emb = np.asarray(self._recognizer.compute_face_descriptor(image, shape), dtype=np.float32)
            out.append(Encoded(embedding=l2_normalize(emb), local=None, crop=aligned_crop(image, d.kps)))
        return out
