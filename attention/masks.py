"""Per-identity masks: image space in, per-layer attention masks out, each built once and reused.

Masks arrive in image space (any size, any aspect) and are area-resized to the exact latent grid
of the layer that asks, so a latent pixel's value is the fraction of its footprint inside the face
region: 0 outside, 1 well inside, soft along the border. Attention runs 23 times per sampling step
at four grid sizes; everything here is cached per (grid, dtype, device, mode) so a step builds
nothing after its first call.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .layout import TokenLayout

MODES = ("hard", "paper")
DEFAULT_MODE = "hard"


def masked_value(dtype: torch.dtype) -> float:
    """A large finite negative logit bias: exp() of it is exactly 0 in every float type, and adding
    ordinary logits to it can neither overflow to -inf (which would make NaN of an all-masked
    row) nor get it back into range."""
    return -0.25 * torch.finfo(dtype).max


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    return mode


class IDMasks:
    """The masks of N identities (and their strengths) for one generation or one training batch.

    ``masks``: (N, H, W) shared by every batch element, or (B, N, H, W) per sample; values in [0, 1]
    (soft masks allowed). ``strength``: None (all 1), a sequence of N floats, or a (N,) / (B, N)
    tensor; 0 turns an ID off, 1 is neutral, >1 emphasises it. Strength multiplies the attention
    weight an ID's tokens get (a log-strength logit bias), the same in both modes.
    """

    def __init__(self, masks: torch.Tensor, strength: Sequence[float] | torch.Tensor | None = None):
        if not isinstance(masks, torch.Tensor):
            raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
        if masks.ndim == 3:
            masks = masks.unsqueeze(0)
        if masks.ndim != 4:
            raise ValueError(
                f"masks must be (N, H, W) or (B, N, H, W), got rank {masks.ndim} with shape "
                f"{tuple(masks.shape)}; stack one [H, W] mask per identity"
            )
        if masks.shape[-1] == 0 or masks.shape[-2] == 0:
            raise ValueError(f"masks have an empty spatial size {tuple(masks.shape[-2:])}")
        masks = masks.detach().to(torch.float32)
        if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
            raise ValueError("mask values must be finite and in [0, 1]")
        self.masks = masks                      # (B|1, N, H, W) float32, image space
        self.n_ids = masks.shape[1]
        self.strength = self._strength(strength)  # (B|1, N) float32
        # Every ID visible everywhere at strength 1: attention is plain attention, bit for bit.
        self.trivial = bool((masks == 1).all()) and bool((self.strength == 1).all())
        self._cache: dict[tuple, torch.Tensor] = {}

    def _strength(self, strength) -> torch.Tensor:
        if strength is None:
            return torch.ones(1, self.n_ids)
        s = torch.as_tensor(strength, dtype=torch.float32).detach()
        if s.ndim == 1:
            s = s.unsqueeze(0)
        if s.ndim != 2 or s.shape[-1] != self.n_ids:
            raise ValueError(f"strength must give one value per identity ({self.n_ids}), got shape "
                             f"{tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError("strength values must be finite and >= 0")
        return s

    @property
    def batch(self) -> int:
        """1 when the masks are shared by the whole batch."""
        return max(self.masks.shape[0], self.strength.shape[0])

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; masks and caches are read-only data.
        return self

    def check_layout(self, layout: TokenLayout) -> None:
        """Validate once per layout that these masks fit it (count, no live empty mask)."""
        if ("checked", layout) in self._cache:
            return
        if layout.n_ids != self.n_ids:
            raise ValueError(
                f"{self.n_ids} ID masks given for a context with {layout.n_ids} identities; "
                "give exactly one mask per stacked identity, in stack order"
            )
        # An empty mask is only legal for an ID switched off (strength 0), e.g. a padded slot in a
        # training batch with fewer faces than slots.
        empty_mask = self.masks.amax(dim=(-2, -1)) == 0                      # (B|1, N)
        live = self.strength > 0                                              # (B|1, N)
        empty = sorted({int(n) for n in (empty_mask & live).nonzero()[:, 1].tolist()})
        if empty:
            raise ValueError(
                f"ID mask(s) {empty} are empty (all zeros): that identity could never appear. "
                "Check the face boxes or masks, or set its strength to 0 to switch it off"
            )
        self._cache[("checked", layout)] = True

    def grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B|1, N, h*w) float32: the masks area-resized to an h x w latent grid."""
        device = torch.device(device)
        key = ("grid", h, w, device)
        if key not in self._cache:
            m = self.masks
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="area")
            self._cache[key] = m.flatten(2).clamp_(0, 1).to(device)
        return self._cache[key]

    def id_weight(self, h: int, w: int, device) -> torch.Tensor:
        """(B, N, h*w): the visibility weight strength * mask of each ID at each pixel (hard mode)."""
        return self.grid(h, w, device) * self.strength.to(device).unsqueeze(-1)

    def hard_bias(self, layout: TokenLayout, h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """Additive logit bias (B|1, 1, h*w, layout.total) for SDPA, or None when it is all zeros
        (then plain attention runs, bit-identical to an unpatched layer).

        The tokens of ID n get log(strength_n * mask_n(pixel)): 0 where visible and neutral, a
        large finite negative where masked, so the masked tokens receive exactly no attention.
        """
        device = torch.device(device)
        key = ("hard", layout, h, w, dtype, device)
        if key not in self._cache:
            self.check_layout(layout)
            weight = self.id_weight(h, w, device)                     # (B, N, Q)
            if bool((weight == 1).all()):
                self._cache[key] = None
            else:
                # Built in a type that holds masked_value(dtype): float64's bias overflows float32.
                weight = weight.to(torch.promote_types(dtype, torch.float32))
                neg = masked_value(dtype)
                logw = torch.where(weight > 0, weight.clamp_min(1e-30).log(), torch.full_like(weight, neg))
                per_token = logw.transpose(1, 2).repeat_interleave(layout.id_width, dim=-1)  # (B, Q, N*W)
                text = per_token.new_zeros(per_token.shape[0], per_token.shape[1], layout.text_len)
                bias = torch.cat([text, per_token], dim=-1).unsqueeze(1)                     # (B, 1, Q, K)
                self._cache[key] = bias.to(dtype).contiguous()
        return self._cache[key]

    def regions(self, h: int, w: int, device,
                dtype: torch.dtype = torch.float32) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """For masks shared by the batch: per visible ID, (n, pixel indices with weight > 0, log
        weight at those pixels in ``dtype``). The regional kernel attends ID n's tokens from those
        pixels only."""
        device = torch.device(device)
        key = ("regions", h, w, device, dtype)
        if key not in self._cache:
            if self.batch != 1:
                raise ValueError("regions need masks shared by the batch; per-sample masks run dense")
            weight = self.id_weight(h, w, device)[0]                  # (N, Q)
            regions = []
            for n in range(self.n_ids):
                idx = (weight[n] > 0).nonzero()[:, 0]
                if idx.numel():
                    regions.append((n, idx, weight[n, idx].to(dtype).log()))
            self._cache[key] = regions
        return self._cache[key]

    def paper_regions(self, layout: TokenLayout, h: int, w: int, device):
        """For the regional paper kernel (masks shared by the batch):

        - inside: per ID with strength > 0, (n, pixels with mask > 0, their mask values, log strength);
        - outside: (Q, N) weights tokens * strength where a pixel is outside mask n (its ID logits are
          all 0 there, so each of the ID's tokens weighs exp(0)), and the pixels where any is > 0.
        """
        device = torch.device(device)
        key = ("paper_regions", layout, h, w, device)
        if key not in self._cache:
            if self.batch != 1:
                raise ValueError("regions need masks shared by the batch; per-sample masks run dense")
            grid = self.grid(h, w, device)[0]                          # (N, Q)
            strength = self.strength[0].to(device)                     # (N,)
            inside = []
            for n in range(self.n_ids):
                if float(strength[n]) > 0:
                    idx = (grid[n] > 0).nonzero()[:, 0]
                    if idx.numel():
                        inside.append((n, idx, grid[n, idx], math.log(float(strength[n]))))
            outside = ((grid == 0) * (strength * layout.id_width)[:, None]).T.contiguous()   # (Q, N)
            where = (outside.sum(-1) > 0).nonzero()[:, 0]
            self._cache[key] = (inside, outside, where)
        return self._cache[key]

    def paper_terms(self, layout: TokenLayout, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 6 literally: (M, bias) with M (B|1, 1, Q, N*W) multiplying the ID logits and an
        optional log-strength bias of the same shape (None when every strength is 1)."""
        device = torch.device(device)
        key = ("paper", layout, h, w, device)
        if key not in self._cache:
            self.check_layout(layout)
            m = self.grid(h, w, device).transpose(1, 2).repeat_interleave(layout.id_width, dim=-1)
            s = self.strength.to(device)
            bias = None
            if not bool((s == 1).all()):
                neg = masked_value(torch.float32)
                logs = torch.where(s > 0, s.clamp_min(1e-30).log(), torch.full_like(s, neg))
                bias = logs.repeat_interleave(layout.id_width, dim=-1)[:, None, None, :]
            self._cache[key] = (m.unsqueeze(1).contiguous(), bias)
        return self._cache[key]

