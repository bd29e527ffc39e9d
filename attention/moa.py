"""Mixture-of-Attention (MoA paper, sec. 3.2): a frozen prior expert, a personalised expert and a
per-pixel router in one attention layer.

- Prior expert: the original layer, unchanged, on the TEXT tokens only (cross-attention) or on the
  hidden state (self-attention). Frozen: its projections are the model's own modules (LoRA weight
  paths such as ``...attn2.to_k.weight`` still name them while the layer is installed).
- Personalised expert: its own ``to_q``/``to_k``/``to_v``/``to_out`` (copies of the layer's, or the
  layer's own modules shared when nothing was trained), over the [text ; IDs] stack with the pack's
  masked attention (:func:`attention.masked.masked_attention`), so ID n still acts only in mask n.
- Router: a linear layer (or a small MLP) on the layer input giving 2 logits per latent pixel,
  softmax over [prior, personalised].

out = w_prior * prior + w_personal * personal, per pixel. Where w_personal is exactly 0 the output is
the prior's exactly (finite expert output times 0 adds 0), and when it is 0 everywhere the expert is
not even run: the layer is then bit-identical to the unpatched one.

The layer is shaped like diffusers' ``IPAdapterAttnProcessor2_0``: one module owning its expert and
router weights, installed through THE seam :func:`attention.layer.wrap_cross_attention` (the nodes
as ModelPatcher object patches, the trainer and in-place hosts through ``install_layers``).
What to do per generation comes in a :class:`MoABinding` under ``transformer_options[MOA_KEY]``
beside the pack's ``IdentityBinding`` (layout, ID masks, attention mode).

Pure torch: no ComfyUI imports.
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layer import (
    IdentityBinding,
    MaskedCrossAttention,
    _current_sigma,
    _grid,
    resolve_options,
    wrap_cross_attention,
)
from .layout import TEXT_CHUNK
from .masked import masked_attention, merge_heads, split_heads
from .masks import IDMasks

MOA_KEY = "instantfamily_moa"
ROUTER_MODES = ("learned", "mask", "prior", "personalised")
ROUTERS = ("linear", "mlp")
MLP_HIDDEN = 64
WEIGHT_GROUP = "moa"
# Paper: the first and the last block of the U-Net (first two and last three attention layers) are
# left out of the router loss; counted over transformer blocks so attn1 and attn2 of a block agree.
EXCLUDE_FIRST, EXCLUDE_LAST = 2, 3


# ---------------------------------------------------------------- per-generation settings

class RouterCapture:
    """Personalised share per latent pixel, summed per resolution over layers and steps (cond rows
    only), for previews. ``reset()`` at the start of each sampling run."""

    def __init__(self) -> None:
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}

    def __deepcopy__(self, memo):
        return self  # shared by ModelPatcher clones, like the binding

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def add(self, grid: tuple[int, int], share: torch.Tensor) -> None:
        """``share``: (rows, h*w) personalised share of the rows to record."""
        if share.shape[0] == 0:
            return
        s = share.detach().float().mean(0)
        key = (int(grid[0]), int(grid[1]))
        if key in self._sums:
            self._sums[key] = self._sums[key] + s.to(self._sums[key].device)
            self._counts[key] += 1
        else:
            self._sums[key] = s.clone()
            self._counts[key] = 1

    def maps(self) -> dict[tuple[int, int], torch.Tensor]:
        """{(h, w): (h, w) float32 CPU map of the mean personalised share}, largest grid first."""
        out = {k: (self._sums[k] / self._counts[k]).cpu().view(*k) for k in self._sums}
        return dict(sorted(out.items(), key=lambda kv: -kv[0][0] * kv[0][1]))

    def __len__(self) -> int:
        return sum(self._counts.values())


@dataclass(eq=False)
class MoABinding:
    """How the MoA layers route for one generation (or one training step).

    mode: ``learned`` (the trained routers), ``mask`` (training-free: the ID masks, grown and
    feathered, ARE the personalised share), ``prior`` (base model only), ``personalised`` (expert
    only). ``strength`` scales the personalised share (clamped to [0, 1]); ``id_strengths`` scale it
    per ID inside that ID's router mask. The experts mix while ``sigma_end <= sigma <= sigma_start``;
    outside, the layer is the prior. ``router_masks``: the ID masks the router uses (image space;
    default: the IdentityBinding's masks). ``record``: a list the layers append
    ``(layer, w_prior (B, h*w), grid)`` to (training). ``capture``: a :class:`RouterCapture`.
    """

    mode: str = "learned"
    strength: float = 1.0
    id_strengths: Sequence[float] | None = None
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    router_masks: IDMasks | None = None
    capture: RouterCapture | None = None
    record: list | None = None

    def __post_init__(self) -> None:
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {self.mode!r}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be finite and >= 0, got {self.strength}")
        if self.id_strengths is not None:
            s = [float(v) for v in self.id_strengths]
            if any(not math.isfinite(v) or v < 0 for v in s):
                raise ValueError(f"id_strengths must be finite and >= 0, got {s}")
            self.id_strengths = s
        self._cache: dict = {}

    def __deepcopy__(self, memo):
        return self

    def active(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    def masks_for(self, binding: IdentityBinding) -> IDMasks:
        return self.router_masks if self.router_masks is not None else binding.masks

    def id_scale(self, binding: IdentityBinding, h: int, w: int, device) -> torch.Tensor | None:
        """(B|1, h*w) per-pixel scale of the personalised share from the per-ID strengths, or None
        when every ID is at 1: 1 + sum_n m_n (s_n - 1), at least 0 (ID n's share times s_n inside
        its router mask, unchanged elsewhere)."""
        if self.id_strengths is None or all(s == 1 for s in self.id_strengths):
            return None
        key = ("scale", h, w, torch.device(device))
        if key not in self._cache:
            masks = self.masks_for(binding)
            if len(self.id_strengths) != masks.n_ids:
                raise ValueError(f"id_strengths gives {len(self.id_strengths)} values for {masks.n_ids} IDs")
            m = masks.grid(h, w, device)                                          # (B|1, N, Q)
            s = torch.tensor(self.id_strengths, dtype=m.dtype, device=m.device).view(1, -1, 1)
            self._cache[key] = (1 + (m * (s - 1)).sum(1)).clamp_min(0)
        return self._cache[key]

    def mask_share(self, binding: IdentityBinding, h: int, w: int, device) -> torch.Tensor:
        """(B|1, h*w) personalised share of the mask router: max_n s_n m_n, times strength, in [0, 1]."""
        key = ("mask", h, w, torch.device(device))
        if key not in self._cache:
            masks = self.masks_for(binding)
            m = masks.grid(h, w, device)                                          # (B|1, N, Q)
            ids = masks.strength.to(m.device)                                     # (B|1, N): 0 = ID off
            if self.id_strengths is not None:
                ids = ids * torch.tensor(self.id_strengths, dtype=m.dtype, device=m.device)
            share = (m * ids.unsqueeze(-1)).amax(1) if m.shape[1] else m.new_zeros(m.shape[0], m.shape[2])
            self._cache[key] = (share * self.strength).clamp(0, 1)
        return self._cache[key]


def grow_and_feather(masks: torch.Tensor, grow: int = 0, feather: int = 0) -> torch.Tensor:
    """ID masks (N, H, W) or (B, N, H, W) grown by ``grow`` pixels (max filter) and feathered by a
    Gaussian of radius ``feather`` pixels (sigma = radius / 2, kernel cut at the radius), so pixels
    farther than grow + feather from every mask stay exactly 0 (there the layer is the prior)."""
    if grow < 0 or feather < 0:
        raise ValueError(f"grow and feather must be >= 0 pixels, got {grow}, {feather}")
    squeeze = masks.ndim == 3
    m = masks.detach().float()
    if squeeze:
        m = m.unsqueeze(0)
    if m.ndim != 4:
        raise ValueError(f"masks must be (N, H, W) or (B, N, H, W), got {tuple(masks.shape)}")
    b, n, h, w = m.shape
    x = m.reshape(b * n, 1, h, w)
    if grow:
        x = F.max_pool2d(x, 2 * grow + 1, stride=1, padding=grow)
    if feather:
        r = int(feather)
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / (r / 2)) ** 2)
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    x = x.clamp(0, 1).reshape(b, n, h, w)
    return x[0] if squeeze else x


# ---------------------------------------------------------------- the layer

class Expert(nn.Module):
    """The personalised expert's projections (same names as the layer's, so paths read naturally)."""

    def __init__(self, inner: nn.Module, share: bool):
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "to_out"):
            module = getattr(inner, name)
            setattr(self, name, module if share else copy.deepcopy(module))
        self.shared = share


def make_router(dim: int, kind: str = "linear") -> nn.Module:
    """Per-pixel logits [prior, personalised]. Zero-initialised: an untrained router splits 50/50."""
    if kind == "linear":
        router = nn.Linear(dim, 2)
    elif kind == "mlp":
        router = nn.Sequential(nn.Linear(dim, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, 2))
    else:
        raise ValueError(f"router must be one of {ROUTERS}, got {kind!r}")
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        if kind == "mlp":  # a zero first layer would never learn (no gradient through GELU(0) * 0)
            nn.init.normal_(router[0].weight, std=dim ** -0.5)
    return router


def _unwrap(module: nn.Module) -> nn.Module:
    """The host's own attention module under any of the pack's wrappers (a model may still hold the
    wrappers of another patched clone while it is loaded)."""
    while hasattr(module, "inner") and type(module).__module__.startswith(__package__ + "."):
        module = module.inner
    return module


class MoALayer(nn.Module):
    """A MoA attention layer: prior expert (the original module), personalised expert, router."""

    def __init__(self, inner: nn.Module, kind: str = "cross", router: str = "linear", share_expert: bool = False):
        super().__init__()
        if kind not in ("cross", "self"):
            raise ValueError(f"kind must be 'cross' or 'self', got {kind!r}")
        inner = _unwrap(inner)
        # The prior's projections, re-registered under their own names (frozen; LoRA paths resolve).
        for name in ("to_q", "to_k", "to_v", "to_out"):
            setattr(self, name, getattr(inner, name))
        self.heads: int = inner.heads
        self.kind = kind
        self.router_kind = router
        self.expert = Expert(inner, share_expert)
        dim = inner.to_q.weight.shape[1]
        self.router = make_router(dim, router).to(device=inner.to_q.weight.device)
        self.path = ""          # module path under its root, set by moa_layers
        self.penalised = True   # in the router loss
        object.__setattr__(self, "inner", inner)  # the prior expert; its parameters are the ones above
        object.__setattr__(self, "_masked", MaskedCrossAttention(inner))  # same weights, no registration

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.router.parameters())
        if not self.expert.shared:
            params += list(self.expert.parameters())
        return params

    # ---------------------------------------------------------------- routing
    def _router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, 2) softmax of the router logits, in float32 (weights cast to x's device, as
        ComfyUI's cast-on-the-fly layers do in low-VRAM mode)."""
        h = x.float()
        if self.router_kind == "linear":
            logits = F.linear(h, self.router.weight.to(h), self.router.bias.to(h))
        else:
            l1, l2 = self.router[0], self.router[2]
            h = F.gelu(F.linear(h, l1.weight.to(h), l1.bias.to(h)))
            logits = F.linear(h, l2.weight.to(h), l2.bias.to(h))
        return logits.softmax(-1)

    def _weights(self, x, binding: IdentityBinding, moa: MoABinding, grid, batch: int):
        """(w_prior, w_personal), each (B|1, Q) float32, or a string 'prior'/'personal' when one
        expert takes every pixel."""
        h, w = grid
        if moa.mode == "prior" or moa.strength == 0:
            return "prior"
        scale = moa.id_scale(binding, h, w, x.device)
        if moa.mode == "mask":
            share = moa.mask_share(binding, h, w, x.device)
            if not bool(share.any()):
                return "prior"
            return 1 - share, share
        if moa.mode == "personalised":
            share = torch.full((1, h * w), float(moa.strength), device=x.device)
            if scale is not None:
                share = share * scale
            share = share.clamp(0, 1)
            if bool((share == 1).all()):
                return "personal"
            return 1 - share, share
        probs = self._router_probs(x)
        w_prior, share = probs[..., 0], probs[..., 1]
        if moa.strength != 1 or scale is not None:
            share = (share * moa.strength * (1 if scale is None else scale)).clamp(0, 1)
            w_prior = 1 - share
        return w_prior, share

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
        options, binding = resolve_options(transformer_options)
        moa: MoABinding | None = options.get(MOA_KEY)

        def prior(ctx, val=None):
            return self.inner(x, context=ctx, value=val, mask=mask, transformer_options=options)

        if moa is None and binding is not None and self.kind == "cross":
            # Identities bound but no MoA settings (a host that only sets the pack's binding): behave as
            # the pack's masked layer, never as unmasked attention over the IDs.
            return self._masked(x, context=context, value=value, mask=mask, transformer_options=options)
        if binding is None or moa is None or mask is not None or (self.kind == "self" and value is not None):
            return prior(context, value)
        if self.kind == "cross":
            if context is None:
                return prior(context, value)
            layout = binding.layout
            n_tokens = context.shape[1]
            if n_tokens != layout.total:
                if n_tokens % TEXT_CHUNK == 0:
                    return prior(context, value)  # a text-only context from other conditioning: nothing to route
                raise ValueError(
                    f"cross-attention context has {n_tokens} tokens, but the identity stack is laid out as "
                    f"{layout.describe()} = {layout.total}. Build positive and negative with the same "
                    "InstantFamily Embedding Stack, and do not combine them with other conditioning")

            def base():
                return self._prior_cross(x, context, value, binding, options, prior)
        else:
            def base():
                return prior(context)
        sigma = _current_sigma(options)
        if not (binding.active(sigma) and moa.active(sigma)):
            return base()

        grid = _grid(options, x)
        weights = self._weights(x, binding, moa, grid, x.shape[0])
        self._observe(moa, weights, options, grid, x)
        if weights == "prior":
            return base()
        personal = self._personal(x, context, value, binding, grid)
        if weights == "personal":
            return personal
        w_prior, share = weights
        out = base()
        return out * w_prior.unsqueeze(-1).to(out.dtype) + personal * share.unsqueeze(-1).to(personal.dtype)

    def _prior_cross(self, x, context, value, binding: IdentityBinding, options, prior) -> torch.Tensor:
        """The prior expert: the original layer on the text tokens, exactly what the unpatched model
        computes (contiguous slices, so its projections run the same GEMMs as on a text-only
        context). Per-person prompts are text too: with any in the layout the prior attends to them
        in their regions (the masked attention with every identity off), as the masked layer does
        outside the IDs' sigma window."""
        layout = binding.layout
        if not layout.has_prompts:
            ts = layout.text_slice
            return prior(context[:, ts].contiguous(), None if value is None else value[:, ts].contiguous())
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context if value is None else value)
        out = masked_attention(q, k, v, self.heads, layout, binding.masks.ids_off(), _grid(options, x),
                               binding.mode, binding.kernel)
        return self.to_out(out)

    def _personal(self, x, context, value, binding: IdentityBinding, grid) -> torch.Tensor:
        e = self.expert
        if self.kind == "cross":
            q, k, v = e.to_q(x), e.to_k(context), e.to_v(context if value is None else value)
            out = masked_attention(q, k, v, self.heads, binding.layout, binding.masks, grid, binding.mode,
                                   binding.kernel)
        else:
            q, k, v = e.to_q(x), e.to_k(x), e.to_v(x)
            out = merge_heads(F.scaled_dot_product_attention(*(split_heads(t, self.heads) for t in (q, k, v))))
        return e.to_out(out)

    def _observe(self, moa: MoABinding, weights, options: dict, grid, x) -> None:
        if moa.record is None and moa.capture is None:
            return
        b, q = x.shape[0], grid[0] * grid[1]
        if weights == "prior":
            w_prior, share = x.new_ones(1, q, dtype=torch.float32), x.new_zeros(1, q, dtype=torch.float32)
        elif weights == "personal":
            w_prior, share = x.new_zeros(1, q, dtype=torch.float32), x.new_ones(1, q, dtype=torch.float32)
        else:
            w_prior, share = weights
        if moa.record is not None:
            moa.record.append((self, w_prior.expand(b, q), grid))
        if moa.capture is not None:
            share = share.expand(b, q)
            cond = _cond_rows(options, b, share.device)
            moa.capture.add(grid, share[cond] if cond is not None else share)


def _cond_rows(options: dict, batch: int, device) -> torch.Tensor | None:
    """Row indices of the cond chunks (cond_or_uncond == 0), or None when unknown (all rows)."""
    chunks = options.get("cond_or_uncond")
    if not chunks:
        return None
    per = batch // len(chunks)
    rows = [i * per + j for i, c in enumerate(chunks) if c == 0 for j in range(per)]
    return torch.tensor(rows, dtype=torch.long, device=device)


# ---------------------------------------------------------------- building and installing

@dataclass(frozen=True)
class MoAConfig:
    self_attention: bool = False     # also replace the self-attention layers (attn1), as the paper does
    router: str = "linear"
    exclude_first: int = EXCLUDE_FIRST   # transformer blocks left out of the router loss
    exclude_last: int = EXCLUDE_LAST

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.exclude_first < 0 or self.exclude_last < 0:
            raise ValueError("exclude_first/exclude_last must be >= 0")


def moa_layers(root: nn.Module, config: MoAConfig = MoAConfig(), share_expert: bool = False) -> dict[str, MoALayer]:
    """MoA layers for every cross-attention (and, with ``config.self_attention``, self-attention)
    module under ``root``, keyed by module path, through the pack's one seam. ``share_expert``: the
    personalised expert uses the layer's own projections (training-free modes; no extra memory)."""
    layers: dict[str, MoALayer] = {}
    suffixes = [("attn2", "cross")] + ([("attn1", "self")] if config.self_attention else [])
    for suffix, kind in suffixes:
        factory = functools.partial(MoALayer, kind=kind, router=config.router, share_expert=share_expert)
        layers.update(wrap_cross_attention(root, factory=factory, suffix=suffix))
    if not layers:
        raise ValueError("no attention layers (attn2) found to turn into MoA layers")
    layers = dict(sorted(layers.items(), key=lambda kv: _module_order(root)[kv[0]]))
    blocks = list(dict.fromkeys(p.rpartition(".")[0] for p in layers))
    excluded = set(blocks[:config.exclude_first]) | set(blocks[len(blocks) - config.exclude_last:] if config.exclude_last else [])
    for path, layer in layers.items():
        layer.path = path
        layer.penalised = path.rpartition(".")[0] not in excluded
    return layers


def _module_order(root: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(root.named_modules(remove_duplicate=False))}


def trainable_parameters(layers: Mapping[str, MoALayer]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in layer.trainable_parameters()]


def extra_bytes(layers: Mapping[str, MoALayer]) -> int:
    """Bytes the layers add to their host (own experts and routers; shared projections excluded)."""
    return sum(p.numel() * p.element_size() for p in trainable_parameters(layers))


# ---------------------------------------------------------------- weights ("moa.<path>.<param>")

def _own_tensors(layer: MoALayer) -> dict[str, torch.Tensor]:
    out = {f"router.{k}": v for k, v in layer.router.state_dict().items()}
    if not layer.expert.shared:
        out.update({f"expert.{k}": v for k, v in layer.expert.state_dict().items()})
    return out


def moa_state_dict(layers: Mapping[str, MoALayer]) -> dict[str, torch.Tensor]:
    """Expert + router tensors keyed ``moa.<module path>.<param>`` for the pack's weight file."""
    out = {}
    for path, layer in layers.items():
        if layer.expert.shared:
            raise ValueError(f"layer {path}: the personalised expert shares the base model's weights; "
                             "only layers built with their own expert (share_expert=False) can be saved")
        out.update({f"{WEIGHT_GROUP}.{path}.{k}": v.detach() for k, v in _own_tensors(layer).items()})
    return out


class MoAWeightError(ValueError):
    """MoA tensors that do not fit the live layers; the message names the first mismatching path."""


def load_moa_state_dict(layers: Mapping[str, MoALayer], tensors: Mapping[str, torch.Tensor],
                        source: str = "weights") -> None:
    """Copy ``moa.*`` tensors into the live layers (own experts), after checking that the file
    holds exactly these layers' tensors with these shapes."""
    want: dict[str, tuple[MoALayer, str, torch.Tensor]] = {}
    for path, layer in layers.items():
        if layer.expert.shared:
            raise ValueError(f"layer {path}: built with a shared expert; build with share_expert=False to load weights")
        for k, v in _own_tensors(layer).items():
            want[f"{WEIGHT_GROUP}.{path}.{k}"] = (layer, k, v)
    have = {k: v for k, v in tensors.items() if k.startswith(WEIGHT_GROUP + ".")}
    if not have:
        raise MoAWeightError(f"{source}: holds no MoA tensors (moa.*); train MoA layers first, or pick a "
                             "training-free router mode (mask, prior, personalised)")
    for name, (_, _, live) in want.items():
        if name not in have:
            raise MoAWeightError(f"{source}: {name} is missing (live layer expects shape {tuple(live.shape)}); the "
                                 "file was trained for another MoA layer set (self-attention or router kind differ?)")
        if tuple(have[name].shape) != tuple(live.shape):
            raise MoAWeightError(f"{source}: {name} has shape {tuple(have[name].shape)}, the live layer "
                                 f"{tuple(live.shape)}; the file was trained for another base model or router")
    stray = sorted(set(have) - set(want))
    if stray:
        raise MoAWeightError(f"{source}: {stray[0]} has no live layer ({len(stray)} such tensors); the file was "
                             "trained for another MoA layer set (self-attention or router kind differ?)")
    with torch.no_grad():
        for name, (_, _, live) in want.items():
            live.copy_(have[name].to(live))


def config_from_tensors(tensors: Iterable[str]) -> MoAConfig:
    """The MoA layer set a weight file was trained with, read from its tensor names."""
    names = [k for k in tensors if k.startswith(WEIGHT_GROUP + ".")]
    if not names:
        raise MoAWeightError("the weight file holds no MoA tensors (moa.*)")
    self_attention = any(".attn1." in k for k in names)
    router = "mlp" if any(".router.0." in k for k in names) else "linear"
    return MoAConfig(self_attention=self_attention, router=router)


__all__ = [
    "MOA_KEY",
    "ROUTERS",
    "ROUTER_MODES",
    "MoABinding",
    "MoAConfig",
    "MoALayer",
    "MoAWeightError",
    "RouterCapture",
    "config_from_tensors",
    "extra_bytes",
    "grow_and_feather",
    "load_moa_state_dict",
    "moa_layers",
    "moa_state_dict",
    "trainable_parameters",
]
