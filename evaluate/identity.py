"""Face backends for scoring: detect every face in a generated image and embed it; embed references.

- ``dlib`` (default, offline): HOG detector + 128-d ResNet embedding (models/faces' DlibEncoder).
- ``insightface``: SCRFD + ArcFace from an antelopev2/buffalo_l folder (models/faces' InsightFaceEncoder).
- ``facenet`` (the paper's and FastComposer's): MTCNN (weights ship in facenet-pytorch) + the
  InceptionResnetV1 vggface2 weights, found locally (never downloaded here).

All three follow models/faces' FaceEncoder protocol, so references go through the same
``encode_faces`` the generation nodes use. Similarity scales differ between backends: always report
which one produced a number.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.faces.base import Detection, Encoded, FaceEncoder, aligned_crop, l2_normalize
from ..models.faces.encode import encode_faces, search_faces
from ..models.faces.errors import ModelFileError, ModelFolderError, NoFaceError
from ..models.faces.image import MIN_SIDE
from ..models.faces.types import Faces
from .errors import EvaluationInputError

BACKENDS: tuple[str, ...] = ("dlib", "insightface", "facenet")

FACENET_FILE = "20180402-114759-vggface2.pt"
FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/" + FACENET_FILE
# FaceNet crops as FastComposer feeds them: MTCNN box, 160 px, no margin.
FACENET_SIZE = 160


@dataclass
class GenFace:
    """A face found in a generated image: pixel box (x0, y0, x1, y1), keypoints, embedding, 112 px crop."""

    box: np.ndarray
    kps: np.ndarray
    embedding: np.ndarray
    crop: np.ndarray
    score: float


def facenet_weight_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Where the FaceNet vggface2 weights are looked for: the given path (file or folder), then
    $INSTANTFAMILY_FACENET, then facenet-pytorch's own cache ($TORCH_HOME/checkpoints)."""
    out: list[Path] = []
    for p in (path, os.environ.get("INSTANTFAMILY_FACENET")):
        if p:
            p = Path(p).expanduser()
            out.append(p / FACENET_FILE if p.is_dir() else p)
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                           "torch")))
    out.append(Path(torch_home) / "checkpoints" / FACENET_FILE)
    return out


def find_facenet_weights(path: str | os.PathLike | None = None) -> Path:
    cands = facenet_weight_candidates(path)
    if path and not cands[0].is_file():
        raise ModelFolderError(f"facenet weights: {cands[0]} does not exist")
    for c in cands:
        if c.is_file():
            return c
    looked = "\n  ".join(str(c) for c in cands)
    raise ModelFolderError(
        f"facenet backend: the InceptionResnetV1 vggface2 weights ({FACENET_FILE}) were not found. Looked in:\n"
        f"  {looked}\nDownload {FACENET_URL} into one of these (or pass --facenet-weights FILE), and install "
        "facenet-pytorch with `pip install --no-deps facenet-pytorch` (its pins would replace torch). "
        "Offline, use --backend dlib."
    )


def _facenet_pytorch():
    try:
        import facenet_pytorch  # noqa: F401
        from facenet_pytorch import MTCNN, InceptionResnetV1
        from facenet_pytorch.models.mtcnn import extract_face, fixed_image_standardization
    except ImportError as exc:
        raise ModelFolderError("facenet backend: facenet-pytorch is not installed; "
                               "pip install --no-deps facenet-pytorch (without --no-deps it replaces torch)") from exc
    return MTCNN, InceptionResnetV1, extract_face, fixed_image_standardization


class FacenetEncoder:
    """MTCNN detection + InceptionResnetV1 (vggface2) embeddings, FastComposer's settings."""

    has_local = False
    ladder_label = "MTCNN min_face_size"
    ladder = (20,)
    device = "CPU"

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", min_prob: float = 0.0) -> None:
        import torch

        path = find_facenet_weights(weights)
        MTCNN, InceptionResnetV1, self._extract, self._standardize = _facenet_pytorch()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ModelFileError(f"facenet weights {path}: cannot be read ({exc}); download {FACENET_URL} again") from exc
        if not isinstance(state, dict):
            raise ModelFileError(f"facenet weights {path}: expected a state dict, got {type(state).__name__}")
        # The classifier head (logits.*, 8631 vggface2 identities) is not part of the embedding.
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        model = InceptionResnetV1(pretrained=None, classify=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"facenet weights {path}: not InceptionResnetV1 weights ({str(exc)[:300]})") from exc
        self.torch = torch
        self.weights = path
        self.name = "facenet/vggface2" if path.name == FACENET_FILE else f"facenet/{path.stem}"
        self.model = model.eval().to(device)
        self.device_name = device
        self.min_prob = float(min_prob)
        self.mtcnn = MTCNN(image_size=FACENET_SIZE, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
                           factor=0.709, post_process=True, keep_all=True, device=device)

    def detect(self, image: np.ndarray, rung: int) -> list[Detection]:
        self.mtcnn.min_face_size = int(rung)
        boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        h, w = image.shape[:2]
        return [Detection(box=np.clip(np.asarray(b, np.float32), 0, [w, h, w, h]).astype(np.float32),
                          kps=np.asarray(p, np.float32), score=float(s))
                for b, s, p in zip(boxes, probs, points) if float(s) >= self.min_prob]

    def encode(self, image: np.ndarray, detections: list[Detection]) -> list[Encoded]:
        from PIL import Image

        if not detections:
            return []
        pil = Image.fromarray(image)
        crops = [self._standardize(self._extract(pil, d.box, FACENET_SIZE, 0)) for d in detections]
        with self.torch.no_grad():
            emb = self.model(self.torch.stack(crops).to(self.device_name)).cpu().numpy()
        return [Encoded(embedding=l2_normalize(e), local=None, crop=aligned_crop(image, d.kps))
                for e, d in zip(emb, detections)]


# Detection thresholds for scoring. A false face costs more here than in the generation nodes: it can
# be matched to an ID and, with dlib's compressed similarity scale (strangers at cos ~0.8-0.9), look
# like a decent likeness. dlib's HOG score is an SVM margin: on the test photos false hits scored
# 0.005-0.05 and the weakest real face (t1.jpg) 0.21, hence 0.1. insightface: its own 0.5. MTCNN:
# FastComposer used its stage thresholds and no extra cut.
DEFAULT_DET_THRESHOLD = {"dlib": 0.1, "insightface": 0.5, "facenet": 0.0}


def make_encoder(backend: str = "dlib", *, insightface_root: str | os.PathLike | None = None,
                 insightface_model: str = "antelopev2", facenet_weights: str | os.PathLike | None = None,
                 provider: str = "auto", device: str = "cpu", det_threshold: float | None = None) -> FaceEncoder:
    """A face encoder for scoring; errors say what to install or where to put the weights."""
    if backend not in BACKENDS:
        raise EvaluationInputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    thr = DEFAULT_DET_THRESHOLD[backend] if det_threshold is None else float(det_threshold)
    if backend == "dlib":
        from ..models.faces.dlib_backend import DlibEncoder

        return DlibEncoder(threshold=thr)
    if backend == "insightface":
        from ..models.faces.insightface_backend import InsightFaceEncoder, find_model_dir

        roots = [insightface_root] if insightface_root else []
        return InsightFaceEncoder(find_model_dir(insightface_model, roots), provider=provider, det_thresh=thr,
                                  name=insightface_model)
    if backend == "facenet":
        return FacenetEncoder(facenet_weights, device=device, min_prob=thr)
    raise EvaluationInputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def detect_faces(encoder: FaceEncoder, image: np.ndarray, want: int = 1) -> list[GenFace]:
    """Every face in a generated image (HxWx3 uint8 RGB), embedded. Unlike reference encoding, no face
    is not an error here: it is a result (counted as missing).

    The ladder is climbed until at least ``want`` faces are found (HOG at upsample 0 often sees only
    the larger of two faces); the rung with the most faces wins; with none, a padded retry (the same
    search as the face nodes: models/faces/encode.search_faces)."""
    if min(image.shape[:2]) < MIN_SIDE:
        return []
    return [GenFace(box=d.box.astype(np.float32), kps=d.kps.astype(np.float32), embedding=e.embedding,
                    crop=e.crop, score=float(d.score))
            for d, e in search_faces(encoder, image, want).encode(encoder)]


def encode_references(encoder: FaceEncoder, images: Sequence[np.ndarray], names: Sequence[str],
                      progress: Callable[[int, int], None] | None = None) -> Faces:
    """One identity per reference image (its most prominent face), in the given order."""
    if len(images) == 0:
        raise EvaluationInputError("references: none given; put one photo per ID in refs/ (ID order = file name order)")
    try:
        return encode_faces(encoder, list(images), faces_per_image=[1] * len(images), order="left_to_right",
                            progress=progress)
    except NoFaceError as exc:
        name = names[exc.image_index] if 0 <= exc.image_index < len(names) else "?"
        raise EvaluationInputError(f"reference {name}: {exc}. Every reference must show its person's face") from exc
