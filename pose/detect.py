"""OpenPose detection from an image with controlnet-aux's detector, when its annotator weights are
on disk. The weights (lllyasviel/Annotators) are never downloaded here: the caller passes the
folders to search (the ComfyUI node passes ComfyUI's model folders) and gets a message naming the
three files and the folder to put them in when they are absent.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .keypoints import N_BODY, N_FACE, N_HAND, Person, PoseFrame

OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
# comfyui_controlnet_aux keeps its downloads in <ckpts>/lllyasviel/Annotators; look there too.
ANNOTATOR_SUBDIR = os.path.join("lllyasviel", "Annotators")
WEIGHTS_URL = "https://huggingface.co/lllyasviel/Annotators"


class OpenPoseWeightsMissing(FileNotFoundError):
    """The three annotator files are not in any searched folder; the message says what to do."""


def find_openpose_dir(folders: Sequence[str | os.PathLike]) -> Path:
    """The first folder (or its lllyasviel/Annotators subfolder) holding all three OpenPose files."""
    searched: list[Path] = []
    for f in folders:
        for cand in (Path(f), Path(f) / ANNOTATOR_SUBDIR):
            if cand in searched:
                continue
            searched.append(cand)
            if all((cand / name).is_file() for name in OPENPOSE_FILES):
                return cand
    target = Path(folders[0]) if folders else Path("models/controlnet_aux")
    partial = ""
    for cand in searched:
        have = [n for n in OPENPOSE_FILES if (cand / n).is_file()]
        if have:
            missing = [n for n in OPENPOSE_FILES if n not in have]
            partial = f" {cand} has {', '.join(have)} but lacks {', '.join(missing)}."
            break
    looked = "; ".join(str(s) for s in searched) or "(no folders given)"
    raise OpenPoseWeightsMissing(
        "OpenPose annotator weights not found. Put the three files "
        f"{', '.join(OPENPOSE_FILES)} (from {WEIGHTS_URL}) into {target}.{partial} "
        f"Searched: {looked}. Alternatively load a pose from a template, a POSE_KEYPOINT value or a JSON file."
    )


_DETECTORS: dict[str, object] = {}


def load_detector(model_dir: str | os.PathLike):
    """controlnet-aux's OpenposeDetector from a local folder, cached per folder."""
    key = str(Path(model_dir).resolve())
    if key not in _DETECTORS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from controlnet_aux.open_pose import OpenposeDetector
        _DETECTORS[key] = OpenposeDetector.from_pretrained(key)
    return _DETECTORS[key]


def _rows(keypoints, n: int) -> np.ndarray | None:
    """controlnet-aux Keypoint list (normalised, None or negative = missing) -> (n, 3) rows."""
    if keypoints is None:
        return None
    arr = np.zeros((n, 3), np.float32)
    for i, k in enumerate(list(keypoints)[:n]):
        if k is not None and k.x >= 0 and k.y >= 0:
            arr[i] = (k.x, k.y, float(getattr(k, "score", 1.0)) or 1.0)
    return arr


def people_from_pose_results(results: Sequence) -> list[Person]:
    """controlnet-aux PoseResult list (normalised keypoints) -> Person list."""
    people = []
    for r in results:
        body = _rows(r.body.keypoints, N_BODY)
        people.append(Person(
            body=body,
            face=_rows(r.face, N_FACE),
            hand_left=_rows(r.left_hand, N_HAND),
            hand_right=_rows(r.right_hand, N_HAND),
        ))
    return people


def detect_pose(
    image: np.ndarray,
    model_dir: str | os.PathLike,
    hands: bool = False,
    face: bool = False,
    detect_resolution: int = 512,
) -> PoseFrame:
    """Detect everyone in an (H, W, 3) uint8 RGB image. The image is resized so its shorter side is
    ``detect_resolution`` (as controlnet-aux does); the pose comes back normalised with the
    ORIGINAL image size as canvas."""
    import cv2

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    detector = load_detector(model_dir)
    h, w = img.shape[:2]
    k = float(detect_resolution) / min(h, w)
    small = cv2.resize(img, (max(1, int(round(w * k))), max(1, int(round(h * k)))),
                       interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4)
    results = detector.detect_poses(small, include_hand=hands, include_face=face)
    return PoseFrame(people=people_from_pose_results(results), canvas_hw=(h, w))
