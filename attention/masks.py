"""Per-token-group masks (face masks of the IDs, regions of the person prompts): image space in,
per-layer attention masks out, each built once and reused.

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
    """The masks of N identities and of P person regions (and their strengths) for one generation or
    one training batch: one mask per token group of a :class:`TokenLayout`.

    ``masks``: the face masks, (N, H, W) shared by every batch element, or (B, N, H, W) per sample;
    values in [0, 1] (soft masks allowed); None when there are no identities. ``strength``: None (all
    1), a sequence of N floats, or a (N,) / (B, N) tensor; 0 turns an ID off, 1 is neutral, >1
    emphasises it. Strength multiplies the attention weight an ID's tokens get (a log-strength logit
    bias), the same in both modes.

    ``regions`` / ``region_strength``: the same for the per-person prompts, one region per person
    (``layout.prompt_lens``), e.g. the body box from the pose: person p's prompt tokens are visible
    only inside region p. A person without a prompt may have any region (it is not used).
    """

    def __init__(self, masks: torch.Tensor | None, strength: Sequence[float] | torch.Tensor | None = None,
                 regions: torch.Tensor | None = None,
                 region_strength: Sequence[float] | torch.Tensor | None = None):
        if masks is None and regions is None:
            raise ValueError("IDMasks needs face masks, person regions, or both")
        self.masks = self._masks(masks, "masks", regions)          # (B|1, N, H, W) float32, image space
        self.n_ids = self.masks.shape[1]
        self.strength = self._strength(strength, self.n_ids, "strength")          # (B|1, N) float32
        self.regions = self._masks(regions, "regions", self.masks)                # (B|1, P, H', W')
        self.n_regions = self.regions.shape[1]
        self.region_strength = self._strength(region_strength, self.n_regions, "region_strength")
        batches = {t.shape[0] for t in (self.masks, self.strength, self.regions, self.region_strength)} - {1}
        if len(batches) > 1:
            raise ValueError(f"masks, regions and strengths are given for different batch sizes {sorted(batches)}; "
                             "give each either shared (no batch axis) or for the same batch")
        # Every group visible everywhere at strength 1: attention is plain attention, bit for bit.
        self.trivial = (bool((self.masks == 1).all()) and bool((self.strength == 1).all())
                        and bool((self.regions == 1).all()) and bool((self.region_strength == 1).all()))
        self._cache: dict[tuple, object] = {}

    @staticmethod
    def _masks(masks: torch.Tensor | None, name: str, other: torch.Tensor | None) -> torch.Tensor:
        if masks is None:
            # No groups of this kind: an empty stack of the other kind's size.
            hw = tuple(other.shape[-2:]) if other is not None else (1, 1)
            return torch.zeros(1, 0, *hw)
        if not isinstance(masks, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
        if masks.ndim == 3:
            masks = masks.unsqueeze(0)
        if masks.ndim != 4:
            raise ValueError(
                f"{name} must be (N, H, W) or (B, N, H, W), got rank {masks.ndim} with shape "
                f"{tuple(masks.shape)}; stack one [H, W] mask per identity (or person)"
            )
        if masks.shape[-1] == 0 or masks.shape[-2] == 0:
            raise ValueError(f"{name} have an empty spatial size {tuple(masks.shape[-2:])}")
        masks = masks.detach().to(torch.float32)
        if masks.numel() and (not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1):
            raise ValueError(f"{name}: mask values must be finite and in [0, 1]")
        return masks

    @staticmethod
    def _strength(strength, n: int, name: str) -> torch.Tensor:
        if strength is None:
            return torch.ones(1, n)
        s = torch.as_tensor(strength, dtype=torch.float32).detach()
        if s.ndim == 1:
            s = s.unsqueeze(0)
        if s.ndim != 2 or s.shape[-1] != n:
            what = "identity" if name == "strength" else "person region"
            raise ValueError(f"{name} must give one value per {what} ({n}), got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{name} values must be finite and >= 0")
        return s

    @property
    def batch(self) -> int:
        """1 when the masks are shared by the whole batch."""
        return max(self.masks.shape[0], self.strength.shape[0], self.regions.shape[0],
                   self.region_strength.shape[0])

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; masks and caches are read-only data.
        return self

    def ids_off(self) -> "IDMasks":
        """The same masks with every identity switched off (strength 0): person prompts only. Used
        outside the IDs' sigma window; made once."""
        if "ids_off" not in self._cache:
            self._cache["ids_off"] = IDMasks(
                self.masks if self.n_ids else None, torch.zeros_like(self.strength),
                self.regions if self.n_regions else None, self.region_strength)
        return self._cache["ids_off"]

    def check_layout(self, layout: TokenLayout) -> None:
        """Validate once per layout that these masks fit it (counts, no live empty mask)."""
        if ("checked", layout) in self._cache:
            return
        if layout.n_ids != self.n_ids:
            raise ValueError(
                f"{self.n_ids} ID masks given for a context with {layout.n_ids} identities; "
                "give exactly one mask per stacked identity, in stack order"
            )
        if layout.n_prompts != self.n_regions:
            raise ValueError(
                f"{self.n_regions} person regions given for a context with {layout.n_prompts} person "
                "prompts; give exactly one region mask per prompt line, in the same order"
            )
        # An empty mask is only legal for a group switched off (strength 0), e.g. a padded slot in a
        # training batch with fewer faces than slots, or for a person without a prompt.
        empty_mask = self.masks.amax(dim=(-2, -1)) == 0                      # (B|1, N)
        live = self.strength > 0                                              # (B|1, N)
        empty = sorted({int(n) for n in (empty_mask & live).nonzero()[:, 1].tolist()})
        if empty:
            raise ValueError(
                f"ID mask(s) {empty} are empty (all zeros): that identity could never appear. "
                "Check the face boxes or masks, or set its strength to 0 to switch it off"
            )
        has_prompt = torch.tensor([n > 0 for n in layout.prompt_lens], dtype=torch.bool)
        empty_region = (self.regions.amax(dim=(-2, -1)) == 0) & (self.region_strength > 0) & has_prompt
        empty = sorted({int(p) for p in empty_region.nonzero()[:, 1].tolist()})
        if empty:
            raise ValueError(
                f"person region(s) {empty} are empty (all zeros): that person's prompt could never act. "
                "Check the person boxes or region masks, or leave that person's prompt line empty"
            )
        self._cache[("checked", layout)] = True

    def grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B|1, N, h*w) float32: the face masks area-resized to an h x w latent grid."""
        return self._resized(self.masks, "grid", h, w, device)

    def region_grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B|1, P, h*w) float32: the person regions area-resized to an h x w latent grid."""
        return self._resized(self.regions, "region_grid", h, w, device)

    def _resized(self, masks: torch.Tensor, name: str, h: int, w: int, device) -> torch.Tensor:
        device = torch.device(device)
        key = (name, h, w, device)
        if key not in self._cache:
            m = masks
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="area") if m.shape[1] else m.new_zeros(*m.shape[:2], h, w)
            self._cache[key] = m.flatten(2).clamp_(0, 1).to(device)
        return self._cache[key]

    def id_weight(self, h: int, w: int, device) -> torch.Tensor:
        """(B, N, h*w): the visibility weight strength * mask of each ID at each pixel (hard mode)."""
        return self.grid(h, w, device) * self.strength.to(device).unsqueeze(-1)

    def group_terms(self, layout: TokenLayout, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token group of ``layout`` (``layout.groups``, in order): (mask (B|1, G, h*w), strength
        (B|1, G), token counts (G,) long). Cached per (layout, grid, device)."""
        device = torch.device(device)
        key = ("groups", layout, h, w, device)
        if key not in self._cache:
            self.check_layout(layout)
            ids = [g.index for g in layout.groups if g.kind == "id"]
            prompts = [g.index for g in layout.groups if g.kind == "prompt"]
            face, region = self.grid(h, w, device), self.region_grid(h, w, device)
            b = max(face.shape[0], region.shape[0])
            mask = torch.cat([face[:, ids].expand(b, -1, -1), region[:, prompts].expand(b, -1, -1)], dim=1)
            sb = max(self.strength.shape[0], self.region_strength.shape[0])
            strength = torch.cat([self.strength[:, ids].expand(sb, -1),
                                  self.region_strength[:, prompts].expand(sb, -1)], dim=1).to(device)
            counts = torch.tensor([g.length for g in layout.groups], dtype=torch.long, device=device)
            self._cache[key] = (mask.contiguous(), strength.contiguous(), counts)
        return self._cache[key]

    def hard_bias(self, layout: TokenLayout, h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """Additive logit bias (B|1, 1, h*w, layout.total) for SDPA, or None when it is all zeros
        (then plain attention runs, bit-identical to an unpatched layer).

        The tokens of group g (an ID or a person prompt) get log(strength_g * mask_g(pixel)): 0 where
        visible and neutral, a large finite negative where masked, so the masked tokens receive
        exactly no attention.
        """
        device = torch.device(device)
        key = ("hard", layout, h, w, dtype, device)
        if key not in self._cache:
            mask, strength, counts = self.group_terms(layout, h, w, device)
            weight = mask * strength.unsqueeze(-1)                    # (B, G, Q)
            if bool((weight == 1).all()):
                self._cache[key] = None
            else:
                # Built in a type that holds masked_value(dtype): float64's bias overflows float32.
                weight = weight.to(torch.promote_types(dtype, torch.float32))
                neg = masked_value(dtype)
                logw = torch.where(weight > 0, weight.clamp_min(1e-30).log(), torch.full_like(weight, neg))
                per_token = logw.transpose(1, 2).repeat_interleave(counts, dim=-1)    # (B, Q, K - T)
                text = per_token.new_zeros(per_token.shape[0], per_token.shape[1], layout.text_len)
                bias = torch.cat([text, per_token], dim=-1).unsqueeze(1)              # (B, 1, Q, K)
                self._cache[key] = bias.to(dtype).contiguous()
        return self._cache[key]

    def pixel_classes(self, layout: TokenLayout, h: int, w: int, device, dtype: torch.dtype,
                      max_classes: int = 64) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
        """For masks shared by the batch (hard mode): the pixels grouped by which token groups they see.

        Per class: (pixel indices, the context tokens the class sees: the text, then each visible
        group's tokens, and an additive bias (pixels, tokens) in ``dtype`` holding log(strength *
        mask) of each visible token, or None when every such weight is 1). A class's pixels see no
        other token at all, so one attention over these tokens is exact for them. None when the masks
        make more than ``max_classes`` classes (then the merging kernel runs)."""
        device = torch.device(device)
        key = ("classes", layout, h, w, device, dtype, max_classes)
        if key not in self._cache:
            if self.batch != 1:
                raise ValueError("pixel classes need masks shared by the batch; per-sample masks run dense")
            mask, strength, _ = self.group_terms(layout, h, w, device)
            weight = (mask * strength.unsqueeze(-1))[0]                # (G, Q)
            visible = (weight > 0).T                                   # (Q, G)
            signatures, which = torch.unique(visible, dim=0, return_inverse=True)
            if signatures.shape[0] > max_classes:
                self._cache[key] = None
                return None
            text = torch.arange(layout.text_len, device=device)
            classes = []
            for c, sig in enumerate(signatures):
                idx = (which == c).nonzero()[:, 0]
                groups = sig.nonzero()[:, 0].tolist()
                tokens = torch.cat([text] + [torch.arange(layout.groups[g].tokens.start, layout.groups[g].tokens.stop,
                                                          device=device) for g in groups])
                w_c = weight[groups][:, idx]                           # (g, P)
                bias = None
                if groups and not bool((w_c == 1).all()):
                    counts = [layout.groups[g].length for g in groups]
                    logw = w_c.to(torch.promote_types(dtype, torch.float32)).log().T   # (P, g)
                    per_token = logw.repeat_interleave(torch.tensor(counts, device=device), dim=-1)
                    bias = torch.cat([per_token.new_zeros(len(idx), layout.text_len), per_token], -1).to(dtype)
                classes.append((idx, tokens, bias))
            self._cache[key] = classes
        return self._cache[key]

    def regions_for(self, layout: TokenLayout, h: int, w: int, device,
                    dtype: torch.dtype = torch.float32) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """For masks shared by the batch: per visible token group, (its token slice, pixel indices
        with weight > 0, log weight at those pixels in ``dtype``). The regional kernel attends a
        group's tokens from those pixels only."""
        device = torch.device(device)
        key = ("regions", layout, h, w, device, dtype)
        if key not in self._cache:
            if self.batch != 1:
                raise ValueError("regions need masks shared by the batch; per-sample masks run dense")
            mask, strength, _ = self.group_terms(layout, h, w, device)
            weight = (mask * strength.unsqueeze(-1))[0]               # (G, Q)
            regions = []
            for g, group in enumerate(layout.groups):
                idx = (weight[g] > 0).nonzero()[:, 0]
                if idx.numel():
                    regions.append((group.tokens, idx, weight[g, idx].to(dtype).log()))
            self._cache[key] = regions
        return self._cache[key]

    def paper_regions(self, layout: TokenLayout, h: int, w: int, device):
        """For the regional paper kernel (masks shared by the batch):

        - inside: per group with strength > 0, (token slice, pixels with mask > 0, their mask values,
          log strength);
        - outside: (Q, G) weights tokens * strength where a pixel is outside group g's mask (its
          logits are all 0 there, so each of the group's tokens weighs exp(0)), and the pixels where
          any is > 0.
        """
        device = torch.device(device)
        key = ("paper_regions", layout, h, w, device)
        if key not in self._cache:
            if self.batch != 1:
                raise ValueError("regions need masks shared by the batch; per-sample masks run dense")
            mask, strength, counts = self.group_terms(layout, h, w, device)
            grid, strength = mask[0], strength[0]                      # (G, Q), (G,)
            inside = []
            for g, group in enumerate(layout.groups):
                if float(strength[g]) > 0:
                    idx = (grid[g] > 0).nonzero()[:, 0]
                    if idx.numel():
                        inside.append((group.tokens, idx, grid[g, idx], math.log(float(strength[g]))))
            outside = ((grid == 0) * (strength * counts)[:, None]).T.contiguous()   # (Q, G)
            where = (outside.sum(-1) > 0).nonzero()[:, 0]
            self._cache[key] = (inside, outside, where)
        return self._cache[key]

    def paper_terms(self, layout: TokenLayout, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 6 literally: (M, bias) with M (B|1, 1, Q, K - T) multiplying the non-text logits and an
        optional log-strength bias of the same shape (None when every strength is 1)."""
        device = torch.device(device)
        key = ("paper", layout, h, w, device)
        if key not in self._cache:
            mask, s, counts = self.group_terms(layout, h, w, device)
            m = mask.transpose(1, 2).repeat_interleave(counts, dim=-1)
            bias = None
            if not bool((s == 1).all()):
                neg = masked_value(torch.float32)
                logs = torch.where(s > 0, s.clamp_min(1e-30).log(), torch.full_like(s, neg))
                bias = logs.repeat_interleave(counts, dim=-1)[:, None, None, :]
            self._cache[key] = (m.unsqueeze(1).contiguous(), bias)
        return self._cache[key]
