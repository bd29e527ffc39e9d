"""Subject morphing (MoA sec. 5.2): one identity between two people, with a slider.

Two feature spaces:
- ``morph_tokens``: the projected ID tokens, interpolated linearly (what the attention layers see).
- ``morph_faces``: the face features before projection: the global embedding by spherical
  interpolation (ArcFace embeddings live on the unit sphere, a straight line would pass through
  short, weak embeddings), the local map linearly. Project the result as usual.
alpha = 0 gives the first person exactly, 1 the second.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from .faces.types import Faces
from .id_stack import IDStack


def _check(alpha: float, index: int, n: int, name: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0 <= index < n:
        raise ValueError(f"{name}: ID {index} does not exist; the input holds IDs 0..{n - 1}")


def morph_tokens(ids_a: IDStack, index_a: int, ids_b: IDStack, index_b: int, alpha: float) -> IDStack:
    """A copy of ``ids_a`` whose ID ``index_a`` is (1 - alpha) * it + alpha * ``ids_b[index_b]``."""
    _check(alpha, index_a, len(ids_a), "index_a")
    _check(alpha, index_b, len(ids_b), "index_b")
    if ids_a.tokens.shape[1:] != ids_b.tokens.shape[1:]:
        raise ValueError(f"ids_a tokens {tuple(ids_a.tokens.shape[1:])} and ids_b tokens "
                         f"{tuple(ids_b.tokens.shape[1:])} differ: project both with the same weights")
    if ids_a.face_encoder and ids_b.face_encoder and ids_a.face_encoder != ids_b.face_encoder:
        raise ValueError(f"ids_a ({ids_a.face_encoder}) and ids_b ({ids_b.face_encoder}) come from different encoders")
    tokens = ids_a.tokens.clone()
    a, b = ids_a.tokens[index_a], ids_b.tokens[index_b].to(tokens)
    tokens[index_a] = a if alpha == 0 else b if alpha == 1 else torch.lerp(a, b, alpha)
    return IDStack(tokens, ids_a.face_encoder)


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation of two unit vectors (linear when they are (anti)parallel)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)
    omega = float(np.arccos(np.clip(np.dot(na, nb), -1.0, 1.0)))
    if omega < 1e-6 or np.pi - omega < 1e-6:
        out = (1 - alpha) * na + alpha * nb
    else:
        out = (np.sin((1 - alpha) * omega) * na + np.sin(alpha * omega) * nb) / np.sin(omega)
    return out.astype(a.dtype)


def morph_faces(faces_a: Faces, index_a: int, faces_b: Faces, index_b: int, alpha: float) -> Faces:
    """A copy of ``faces_a`` whose face ``index_a`` is morphed towards ``faces_b[index_b]``."""
    _check(alpha, index_a, len(faces_a), "index_a")
    _check(alpha, index_b, len(faces_b), "index_b")
    if faces_a.encoder != faces_b.encoder:
        raise ValueError(f"faces_a ({faces_a.encoder}) and faces_b ({faces_b.encoder}) come from different "
                         "encoders; encode both with one encoder")
    fa, fb = faces_a[index_a], faces_b[index_b]
    if fa.embedding.shape != fb.embedding.shape:
        raise ValueError(f"embeddings differ in shape {fa.embedding.shape} vs {fb.embedding.shape}")
    out = copy.copy(faces_a)
    out.faces = list(faces_a.faces)
    face = copy.copy(fa)
    if alpha == 1:
        face.embedding = fb.embedding.copy()
    elif alpha > 0:
        face.embedding = slerp(fa.embedding, fb.embedding, alpha)
    if fa.local is not None and fb.local is not None:
        if fa.local.shape != fb.local.shape:
            raise ValueError(f"local maps differ in shape {fa.local.shape} vs {fb.local.shape}")
        face.local = fa.local if alpha == 0 else ((1 - alpha) * fa.local + alpha * fb.local).astype(fa.local.dtype)
    elif (fa.local is None) != (fb.local is None):
        raise ValueError("one face has a local feature map and the other not; encode both with one encoder")
    out.faces[index_a] = face
    return out
