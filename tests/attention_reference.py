"""An independent float64 reference for masked cross-attention, written from the paper (eq. 6-7,
sec. 4.2) with numpy loops and einsum. It shares no code with the package on purpose.

Mask resizing follows the documented rule: the latent pixel (i, j) of an h x w grid averages the
image pixels of rows floor(i*H/h) .. ceil((i+1)*H/h)-1 and columns floor(j*W/w) .. ceil((j+1)*W/w)-1
(for integer ratios: the exact block mean).
"""
from __future__ import annotations

import math

import numpy as np


def resize_area(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = mask.shape
    out = np.zeros((h, w), dtype=np.float64)
    for i in range(h):
        r0, r1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
        for j in range(w):
            c0, c1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
            out[i, j] = mask[r0:r1, c0:c1].astype(np.float64).mean()
    return out


def reference_attention(q, k, v, heads, text_len, tokens_per_id, masks, grid, mode, strength=None):
    """q (B, Q, H*d), k/v (B, T + N*tokens, H*d), masks (N, Hi, Wi) or (B, N, Hi, Wi) -> (B, Q, H*d)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    B, Q, width = q.shape
    K = k.shape[1]
    d = width // heads
    h, w = grid
    n_ids = (K - text_len) // tokens_per_id
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim == 3:
        masks = np.broadcast_to(masks[None], (B,) + masks.shape)
    s = np.ones((B, n_ids)) if strength is None else np.broadcast_to(np.asarray(strength, np.float64), (B, n_ids))

    # M[b, i, j]: the mask value of key token j at pixel i (1 for text), eq. 7.
    M = np.ones((B, Q, K))
    S = np.zeros((B, K))  # strength per key token
    for b in range(B):
        for n in range(n_ids):
            lat = resize_area(masks[b, n], h, w).reshape(Q) if n_ids else None
            cols = slice(text_len + n * tokens_per_id, text_len + (n + 1) * tokens_per_id)
            M[b, :, cols] = lat[:, None]
            S[b, cols] = s[b, n]
    S[:, :text_len] = 1.0

    qh = q.reshape(B, Q, heads, d)
    kh = k.reshape(B, K, heads, d)
    vh = v.reshape(B, K, heads, d)
    logits = np.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(d)
    with np.errstate(divide="ignore"):
        if mode == "paper":
            logits = logits * M[:, None] + np.log(S)[:, None, None, :]
        elif mode == "hard":
            logits = logits + np.log(M * S[:, None, :])[:, None]
        else:
            raise ValueError(mode)
    logits = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p = p / p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, vh)
    return out.reshape(B, Q, width), p


def reference_attention_torch(q, k, v, heads, text_len, tokens_per_id, masks, grid, mode, strength=None):
    """The same eq. 6-7 reference in torch float64 with autograd, for gradient checks: mask resizing
    and the M / S matrices come from the numpy code above, the attention itself is recorded by autograd.
    q, k, v: float64 tensors (requires_grad as the caller wants)."""
    import torch

    B, Q, width = q.shape
    K = k.shape[1]
    d = width // heads
    h, w = grid
    n_ids = (K - text_len) // tokens_per_id
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim == 3:
        masks = np.broadcast_to(masks[None], (B,) + masks.shape)
    s = np.ones((B, n_ids)) if strength is None else np.broadcast_to(np.asarray(strength, np.float64), (B, n_ids))
    M = np.ones((B, Q, K))
    S = np.ones((B, K))
    for b in range(B):
        for n in range(n_ids):
            cols = slice(text_len + n * tokens_per_id, text_len + (n + 1) * tokens_per_id)
            M[b, :, cols] = resize_area(masks[b, n], h, w).reshape(Q)[:, None]
            S[b, cols] = s[b, n]
    M_t = torch.from_numpy(M)[:, None]                  # (B, 1, Q, K)
    with np.errstate(divide="ignore"):
        logS = torch.from_numpy(np.log(S))[:, None, None, :]
        logMS = torch.from_numpy(np.log(M * S[:, None, :]))[:, None]
    qh = q.reshape(B, Q, heads, d).transpose(1, 2)
    kh = k.reshape(B, K, heads, d).transpose(1, 2)
    vh = v.reshape(B, K, heads, d).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if mode == "paper":
        logits = logits * M_t + logS
    elif mode == "hard":
        logits = logits + logMS                          # -inf where masked: exactly zero weight
    else:
        raise ValueError(mode)
    out = logits.softmax(-1) @ vh
    return out.transpose(1, 2).reshape(B, Q, width)
