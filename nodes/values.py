"""What the pack's nodes exchange with ComfyUI: the custom value types and IMAGE conversions.

One place, so every node file declares a type the same way and converts pixels the same way
(the core's ``models/faces/image.to_rgb_uint8`` rules: gray, RGBA over white, float 0-1, NaN refused).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from comfy_api.latest import io

from ..models.faces.image import to_rgb_uint8

FACES = io.Custom("INSTANTFAMILY_FACES")
FACE_ENCODER = io.Custom("INSTANTFAMILY_FACE_ENCODER")
POSE_KEYPOINT = io.Custom("POSE_KEYPOINT")   # the type comfyui_controlnet_aux's OpenPose nodes use


def image_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B, H, W, C] float 0-1 -> list of HxWxC float32 arrays, unconverted (the core converts
    and names the image in its errors)."""
    t = images.detach().cpu().float()
    return list((t.unsqueeze(0) if t.ndim == 3 else t).numpy())


def images_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B, H, W, C] -> list of HxWx3 uint8 RGB arrays."""
    return [to_rgb_uint8(a, f"image {i + 1}") for i, a in enumerate(image_arrays(images))]


def image_out(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> IMAGE [1, H, W, 3] float32."""
    # torch.tensor copies, so read-only arrays (e.g. from PIL) need no special care
    return torch.tensor(np.asarray(arr), dtype=torch.float32).div(255.0).unsqueeze(0)


def images_out(arrays: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images of any sizes -> one IMAGE batch, smaller ones padded (black) to the largest."""
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    out = torch.zeros((len(arrays), h, w, 3), dtype=torch.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0], : a.shape[1]] = image_out(a)[0]
    return out


def file_fingerprint(path: str | os.PathLike, hash_below: int = 1 << 20) -> str:
    """What a node's ``fingerprint_inputs`` returns for a file it reads, so ComfyUI reruns the node
    when the file changes under the same name: the content hash for small files, size and
    modification time for large ones (weights), where hashing every queued prompt would cost."""
    try:
        st = os.stat(path)
        if st.st_size <= hash_below:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"unreadable:{path}"   # the node's execute() reports what is wrong
