"""The multimodal embedding stack (InstantFamily sec. 3.3, eq. 4-5).

Each face gives L*L + 1 tokens of the text width d_K: its global embedding through a global
projection, then its L x L local feature map through a local projection plus a learned 2-D position
embedding (the map loses its geometry when flattened; the position embedding gives it back), each
layer-normalised so ID tokens sit on the scale of CLIP's text tokens. All IDs follow the text tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..attention.layout import TokenLayout


@dataclass(frozen=True)
class ProjectionConfig:
    """Shapes of the face features in and of the tokens out."""

    d_gf: int = 512    # global embedding width
    d_lf: int = 512    # local feature map channels
    side: int = 7      # L: the local map is L x L
    d_k: int = 768     # text width of the UNet's cross-attention (768 for SD1.5)

    @property
    def tokens_per_id(self) -> int:
        return self.side * self.side + 1


class IDProjection(nn.Module):
    """Face features -> (L*L + 1, d_K) tokens per identity."""

    def __init__(self, config: ProjectionConfig = ProjectionConfig()):
        super().__init__()
        self.config = config
        c = config
        self.global_proj = nn.Linear(c.d_gf, c.d_k)
        self.global_norm = nn.LayerNorm(c.d_k)
        self.local_proj = nn.Linear(c.d_lf, c.d_k)
        # Factorised row + column embedding: 2*L*d_K parameters instead of L*L*d_K, same expressiveness
        # for a grid, and it stays meaningful if a model with another L is fine-tuned from it.
        self.pos_row = nn.Parameter(torch.randn(c.side, 1, c.d_k) * 0.02)
        self.pos_col = nn.Parameter(torch.randn(1, c.side, c.d_k) * 0.02)
        self.local_norm = nn.LayerNorm(c.d_k)

    def forward(self, global_feat: torch.Tensor, local_feat: torch.Tensor) -> torch.Tensor:
        """global_feat (..., d_gf), local_feat (..., L, L, d_lf) -> (..., L*L + 1, d_K).

        The local map is channels-last (as face encoders export it after transposing NCHW).
        """
        c = self.config
        if global_feat.shape[-1] != c.d_gf:
            raise ValueError(f"global feature width {global_feat.shape[-1]} != d_gf={c.d_gf} of the "
                             "projection; the face encoder does not match these weights")
        if tuple(local_feat.shape[-3:]) != (c.side, c.side, c.d_lf):
            raise ValueError(f"local feature map {tuple(local_feat.shape[-3:])} != (L, L, d_lf)="
                             f"{(c.side, c.side, c.d_lf)} of the projection; the face encoder does "
                             "not match these weights")
        if global_feat.shape[:-1] != local_feat.shape[:-3]:
            raise ValueError(f"global features {tuple(global_feat.shape)} and local maps "
                             f"{tuple(local_feat.shape)} disagree on the number of faces")
        g = self.global_norm(self.global_proj(global_feat)).unsqueeze(-2)
        loc = self.local_proj(local_feat) + self.pos_row + self.pos_col
        loc = self.local_norm(loc).flatten(-3, -2)
        return torch.cat([g, loc], dim=-2)

    def null_tokens(self, n_ids: int, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """The null identity for the classifier-free-guidance branch: the projection of all-zero
        features, the same input the trainer substitutes when it drops an identity. Same layout as
        the conditional stack: (*batch_shape, n_ids, L*L + 1, d_K)."""
        c = self.config
        p = self.global_proj.weight
        g = torch.zeros(*batch_shape, n_ids, c.d_gf, dtype=p.dtype, device=p.device)
        loc = torch.zeros(*batch_shape, n_ids, c.side, c.side, c.d_lf, dtype=p.dtype, device=p.device)
        return self.forward(g, loc)


def stack_context(text: torch.Tensor, id_tokens: torch.Tensor,
                  prompts: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, TokenLayout]:
    """Eq. 4-5: K = [text ; ID 0 ; ... ; ID N-1 ; prompt 0 ; ... ; prompt P-1] and its layout.

    text: (B, T, d_K); id_tokens: (N, tokens, d_K) shared by the batch or (B, N, tokens, d_K).
    prompts: optional per-person prompt encodings in person order (ID order, then persons without an
    identity), each (T_p, d_K) or (1 | B, T_p, d_K), or None for a person without a prompt.
    """
    if text.ndim != 3:
        raise ValueError(f"text embedding must be (batch, tokens, width), got {tuple(text.shape)}")
    if id_tokens.ndim == 3:
        id_tokens = id_tokens.unsqueeze(0).expand(text.shape[0], -1, -1, -1)
    if id_tokens.ndim != 4:
        raise ValueError(f"ID tokens must be (N, tokens, width) or (B, N, tokens, width), got {tuple(id_tokens.shape)}")
    if id_tokens.shape[-1] != text.shape[-1]:
        raise ValueError(f"ID token width {id_tokens.shape[-1]} != text width {text.shape[-1]}: the "
                         "projection was built for another text encoder (SD1.5 uses 768)")
    if id_tokens.shape[0] != text.shape[0]:
        raise ValueError(f"ID tokens for a batch of {id_tokens.shape[0]} but text for {text.shape[0]}")
    b, n, tokens, _ = id_tokens.shape
    ids = id_tokens.to(text.dtype).reshape(b, n * tokens, text.shape[-1])
    parts, lens = [text, ids], []
    for p, prompt in enumerate(prompts or ()):
        if prompt is None:
            lens.append(0)
            continue
        if prompt.ndim == 2:
            prompt = prompt.unsqueeze(0)
        if prompt.ndim != 3 or prompt.shape[-1] != text.shape[-1] or prompt.shape[0] not in (1, b):
            raise ValueError(f"person prompt {p}: expected (tokens, {text.shape[-1]}) or (1 or {b}, tokens, "
                             f"{text.shape[-1]}), got {tuple(prompt.shape)}; encode it with the same CLIP")
        parts.append(prompt.to(text).expand(b, -1, -1))
        lens.append(prompt.shape[1])
    layout = TokenLayout(text.shape[1], n, tokens, prompt_lens=tuple(lens))
    return torch.cat(parts, dim=1), layout
