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


def _broadcast_masks(masks, B):
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim == 3:
        masks = np.broadcast_to(masks[None], (B,) + masks.shape)
    return masks


def mask_matrices(B, Q, K, text_len, tokens_per_id, masks, grid, strength=None,
                  prompt_lens=(), regions=None, region_strength=None):
    """M[b, i, j]: the mask value of key token j at pixel i (1 for text), eq. 7; S[b, j]: the strength
    of key token j (1 for text). Key columns, in order: text_len text tokens, N blocks of tokens_per_id
    ID tokens (face mask n), then one block of prompt_lens[p] tokens per person p (region mask p)."""
    h, w = grid
    n_ids = (K - text_len - sum(prompt_lens)) // tokens_per_id if tokens_per_id else 0
    M = np.ones((B, Q, K))
    S = np.ones((B, K))
    if n_ids:
        masks = _broadcast_masks(masks, B)
        s = np.ones((B, n_ids)) if strength is None else np.broadcast_to(np.asarray(strength, np.float64), (B, n_ids))
        for b in range(B):
            for n in range(n_ids):
                cols = slice(text_len + n * tokens_per_id, text_len + (n + 1) * tokens_per_id)
                M[b, :, cols] = resize_area(masks[b, n], h, w).reshape(Q)[:, None]
                S[b, cols] = s[b, n]
    if len(prompt_lens):
        regions = _broadcast_masks(regions, B)
        P = len(prompt_lens)
        rs = np.ones((B, P)) if region_strength is None else np.broadcast_to(np.asarray(region_strength, np.float64), (B, P))
        for b in range(B):
            start = text_len + n_ids * tokens_per_id
            for p in range(P):
                cols = slice(start, start + prompt_lens[p])
                M[b, :, cols] = resize_area(regions[b, p], h, w).reshape(Q)[:, None]
                S[b, cols] = rs[b, p]
                start += prompt_lens[p]
    return M, S


def reference_attention(q, k, v, heads, text_len, tokens_per_id, masks, grid, mode, strength=None,
                        prompt_lens=(), regions=None, region_strength=None):
    """q (B, Q, H*d), k/v (B, T + N*tokens + sum(prompt_lens), H*d), masks (N, Hi, Wi) or (B, N, Hi, Wi),
    regions (P, Hr, Wr) or (B, P, Hr, Wr) -> (B, Q, H*d)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    B, Q, width = q.shape
    K = k.shape[1]
    d = width // heads
    M, S = mask_matrices(B, Q, K, text_len, tokens_per_id, masks, grid, strength,
                         prompt_lens, regions, region_strength)

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


def reference_attention_torch(q, k, v, heads, text_len, tokens_per_id, masks, grid, mode, strength=None,
                              prompt_lens=(), regions=None, region_strength=None):
    """The same eq. 6-7 reference in torch float64 with autograd, for gradient checks: mask resizing
    and the M / S matrices come from the numpy code above, the attention itself is recorded by autograd.
    q, k, v: float64 tensors (requires_grad as the caller wants)."""
    import torch

    B, Q, width = q.shape
    K = k.shape[1]
    d = width // heads
    M, S = mask_matrices(B, Q, K, text_len, tokens_per_id, masks, grid, strength,
                         prompt_lens, regions, region_strength)
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
