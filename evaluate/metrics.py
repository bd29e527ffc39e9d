"""The numbers, on embeddings only (no images, no models): easy to check by hand.

- SingleSim (InstantFamily eq. 10): cos(E_f(A), E_f(A')) for reference A and its generated face A'.
- MultiSim (eq. 11), generalised to N IDs:
      mean_n SingleSim(ref_n, gen_n)  +  mean_{i<j} (1 - cos(gen_i, gen_j))
  For N = 2 this is exactly (SingleSim(A,A') + SingleSim(B,B'))/2 + (1 - SingleSim(A',B')).
  Range: identity term in [-1, 1], mixing term in [0, 2]; a perfect, unmixed pair scores ~2 with a
  backend whose different people are orthogonal, but backends differ (dlib puts different people at
  cos ~0.6-0.8, FaceNet lower), so MultiSim is only comparable within one backend.
- FastComposer's multi-subject score: greedy matching of generated faces to references by similarity,
  then the LOWEST matched similarity, clipped at 0; a reference without a face scores 0.

A missing generated face (None) counts 0 in SingleSim (FastComposer's convention), and a pair with a
missing face contributes 0 to the mixing term, not 1: a missing face must never look better than a
present one (with 1, dropping a face would score like perfect separation).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rows(x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"embeddings: expected (n, d), got shape {a.shape}")
    return a


def cosine_matrix(a: np.ndarray | Sequence[np.ndarray], b: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(n, m) cosine similarities between the rows of a (n, d) and b (m, d); float64."""
    a, b = _rows(a), _rows(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings of different sizes ({a.shape[1]} vs {b.shape[1]}): were they made by "
                         "different face backends? Encode references and generated images with the same one")
    an = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
    bn = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12)
    return an @ bn.T


def single_sims(refs: Sequence[np.ndarray], gens: Sequence[np.ndarray | None]) -> list[float]:
    """SingleSim per ID (eq. 10); ``gens[n]`` is ID n's generated face embedding or None (-> 0)."""
    if len(refs) != len(gens):
        raise ValueError(f"got {len(refs)} references but {len(gens)} generated faces (one per ID, None if missing)")
    return [0.0 if g is None else float(cosine_matrix(r, g)[0, 0]) for r, g in zip(refs, gens)]


def mixing_term(gens: Sequence[np.ndarray | None]) -> float | None:
    """Mean of (1 - cos) over all pairs of the IDs' generated faces; None for fewer than 2 IDs."""
    n = len(gens)
    if n < 2:
        return None
    vals = []
    for i in range(n):
        for j in range(i + 1, n):
            gi, gj = gens[i], gens[j]
            vals.append(0.0 if gi is None or gj is None else 1.0 - float(cosine_matrix(gi, gj)[0, 0]))
    return float(np.mean(vals))


def multi_sim(refs: Sequence[np.ndarray], gens: Sequence[np.ndarray | None]) -> tuple[float, float | None, float | None]:
    """(identity term, mixing term, MultiSim) for one image; MultiSim is None for a single ID."""
    s = single_sims(refs, gens)
    identity = float(np.mean(s)) if s else 0.0
    mix = mixing_term(gens)
    return identity, mix, (None if mix is None else identity + mix)


def greedy_match(sim: np.ndarray) -> list[tuple[int, int]]:
    """FastComposer's greedy matching on a (refs x faces) similarity matrix: take the most similar
    remaining (ref, face) pair, remove both, repeat. Rectangular matrices are fine: it stops when refs
    or faces run out. Returns (ref, face) pairs in the order they were taken."""
    s = np.array(sim, dtype=np.float64, copy=True)
    if s.ndim != 2:
        raise ValueError(f"similarity matrix: expected 2-D, got shape {s.shape}")
    pairs: list[tuple[int, int]] = []
    for _ in range(min(s.shape)):
        i, j = np.unravel_index(int(np.argmax(s)), s.shape)
        pairs.append((int(i), int(j)))
        s[i, :] = -np.inf
        s[:, j] = -np.inf
    return pairs


def fastcomposer_score(refs: Sequence[np.ndarray], faces: Sequence[np.ndarray]) -> float:
    """Lowest similarity after greedy matching, clipped at 0; 0 when any reference has no face.

    ``faces``: the candidate generated faces (FastComposer takes the N largest detections)."""
    if len(refs) == 0:
        raise ValueError("fastcomposer_score: no references")
    if len(faces) < len(refs):
        return 0.0
    sim = cosine_matrix(refs, faces)
    return max(0.0, min(sim[i, j] for i, j in greedy_match(sim)))
