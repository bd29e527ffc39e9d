"""insightface backend: SCRFD detection (insightface's own code), ArcFace alignment, and the
recognition network run through :mod:`onnx_local` so one forward gives global + local features."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Detection, Encoded, aligned_crop, l2_normalize
from .errors import ModelFileError, ModelFolderError
from .onnx_local import LocalFeatureModel, load_local_feature_model, load_onnx
from .providers import create_session, resolve_providers

logger = logging.getLogger("instantfamily.faces")

DEFAULT_MODEL = "antelopev2"
KNOWN_MODELS: tuple[str, ...] = ("antelopev2", "buffalo_l")
DEFAULT_DET_SIZES: tuple[int, ...] = (640, 480, 320)

_EXPECTED_FILES = {
    "antelopev2": "scrfd_10g_bnkps.onnx and glintr100.onnx (plus 1k3d68, 2d106det, genderage, unused)",
    "buffalo_l": "det_10g.onnx and w600k_r50.onnx (plus 1k3d68, 2d106det, genderage, unused)",
}


def default_roots(extra_roots: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """insightface roots to search, in order: the given ones (ComfyUI: models/insightface), then
    insightface's own default ~/.insightface."""
    roots = [Path(r).expanduser() for r in extra_roots]
    home = Path("~/.insightface").expanduser()
    if home not in roots:
        roots.append(home)
    return roots


def _candidates(name: str, roots: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        out.append(root / "models" / name)
        # The antelopev2 zip unpacks into antelopev2/antelopev2/: a very common "model not found".
        out.append(root / "models" / name / name)
    return out


def find_model_dir(name: str, roots: Sequence[str | os.PathLike]) -> Path:
    """Folder holding ``name``'s .onnx files under the roots, then ~/.insightface; the error lists
    every place looked at."""
    paths = _candidates(name, default_roots(roots))
    for p in paths:
        if p.is_dir() and any(p.glob("*.onnx")):
            return p
    looked = "\n  ".join(str(p) for p in paths)
    first = paths[0] if paths else Path("models/insightface/models") / name
    what = _EXPECTED_FILES.get(name, "the pack's .onnx files (a detector and a recognition model)")
    raise ModelFolderError(
        f"insightface model '{name}' not found. Looked in:\n  {looked}\n"
        f"Put {what} in {first}/ (ComfyUI: ComfyUI/models/insightface/models/{name}/). "
        "Without insightface models, choose the dlib backend."
    )


def list_model_names(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Model packs present under the roots (folders with .onnx files), known names first."""
    found: set[str] = set()
    for root in default_roots(roots):
        base = root / "models"
        if base.is_dir():
            for d in base.iterdir():
                if d.is_dir() and (any(d.glob("*.onnx")) or any((d / d.name).glob("*.onnx"))):
                    found.add(d.name)
    return [m for m in KNOWN_MODELS if m in found] + sorted(found - set(KNOWN_MODELS))


def classify_onnx(model) -> str | None:
    """Task of an insightface pack file, by the same shape rules as insightface's ModelRouter
    (we mirror it rather than call it: the router opens a session per file, 250 MB for glintr100)."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if not inputs:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    n_out = len(model.graph.output)
    if n_out >= 5:
        return "detection"
    if len(dims) != 4:
        return None
    h, w = dims[2], dims[3]
    if h == 192 and w == 192:
        return "landmark"
    if h == 96 and w == 96:
        return "attribute"
    if len(inputs) == 2 and h == 128 and w == 128:
        return "swapper"
    if h == w and h >= 112 and h % 16 == 0:
        return "recognition"
    return None


class InsightFaceEncoder:
    """Detection + 5 keypoints + aligned crop + global embedding + local feature map."""

    has_local = True
    ladder_label = "det_size"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        provider: str = "auto",
        det_sizes: Sequence[int] = DEFAULT_DET_SIZES,
        det_thresh: float = 0.5,
        cache_dir: str | os.PathLike | None = None,
        name: str | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelFolderError(f"insightface model folder does not exist: {model_dir}")
        self.providers = resolve_providers(provider)
        self.name = f"insightface/{name or model_dir.name}"
        self.ladder = tuple(int(s) for s in det_sizes)
        if not self.ladder or min(self.ladder) < 32:
            raise ValueError(f"det_sizes: need sizes >= 32, got {list(det_sizes)}")
        self.det_thresh = float(det_thresh)
        det_path = rec_path = None
        for f in sorted(model_dir.glob("*.onnx")):
            task = classify_onnx(load_onnx(f))
            if task == "detection" and det_path is None:
                det_path = f
            elif task == "recognition" and rec_path is None:
                rec_path = f
        if det_path is None or rec_path is None:
            missing = " and ".join(t for t, p in (("detection model (SCRFD)", det_path),
                                                  ("recognition model (ArcFace)", rec_path)) if p is None)
            raise ModelFolderError(
                f"{model_dir}: has no {missing}. "
                f"Expected {_EXPECTED_FILES.get(model_dir.name, 'an insightface model pack')}."
            )
        self.det_path, self.rec_path = det_path, rec_path
        self.detector = self._load_detector(det_path)
        self.recognizer: LocalFeatureModel = load_local_feature_model(rec_path, self.providers, cache_dir)

    def _load_detector(self, path: Path):
        # insightface's own SCRFD wrapper: anchor decoding, NMS and keypoints stay its code.
        from insightface.model_zoo.scrfd import SCRFD

        session = create_session(path, self.providers)
        try:
            det = SCRFD(model_file=str(path), session=session)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{path}: insightface cannot use this as a face detector ({exc})") from exc
        if not det.use_kps:
            raise ModelFileError(f"{path}: this detector gives no keypoints; use an SCRFD '_bnkps'/'_kps' model")
        det.prepare(0, det_thresh=self.det_thresh, input_size=(self.ladder[0], self.ladder[0]))
        return det

    @property
    def device(self) -> str:
        from .providers import session_device

        return session_device(self.recognizer.session)

    def detect(self, image: np.ndarray, rung: int) -> list[Detection]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # insightface works on cv2's BGR
        boxes, kpss = self.detector.detect(bgr, input_size=(int(rung), int(rung)))
        out: list[Detection] = []
        for i in range(boxes.shape[0]):
            out.append(Detection(box=boxes[i, :4].astype(np.float32), kps=kpss[i].astype(np.float32),
                                 score=float(boxes[i, 4])))
        return out

    def encode(self, image: np.ndarray, detections: list[Detection]) -> list[Encoded]:
        if not detections:
            return []
        size = self.recognizer.input_size[0]
        crops = np.stack([aligned_crop(image, d.kps, size) for d in detections])
        emb, local = self.recognizer.run(crops)
        assert local is not None
        return [Encoded(embedding=l2_normalize(e), local=l, crop=c) for e, l, c in zip(emb, local, crops)]
