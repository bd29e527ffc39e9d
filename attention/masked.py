"""Masked cross-attention (InstantFamily eq. 6-7): one implementation for the UNet patch, the
ControlNet patch and the trainer.

Text tokens are visible to every pixel; the tokens of ID n only to pixels inside mask n, and the
tokens of person p's prompt only to pixels inside region p. Each such block is a token group
(``TokenLayout.groups``) with its own mask; everything below treats the groups alike.

- ``hard`` (default): masked logits get a large finite negative bias, so masked tokens receive no
  attention at all. The bias is additive, so it runs through torch's fused
  ``scaled_dot_product_attention`` (flash/memory-efficient kernels on CUDA, the fused kernel on CPU).
  Two kernels compute it, both exact: ``dense`` (SDPA over the whole context with the additive
  mask; used on CUDA, where the fused kernels take the mask for free) and ``regional`` (used on CPU
  when the masks are shared by the batch): text attention over every pixel, plus each ID's tokens
  attended only from the pixels inside its mask (and each person prompt from the pixels of its
  region), merged through their log-sum-exps. Its cost is that of text-only attention plus the face
  (and region) area, whatever N is.
  Training: the regional kernel is differentiable. When autograd records (grad enabled and an input
  requires grad) each part's log-sum-exp comes from materialised logits (the fused CPU kernel's
  log-sum-exp carries no gradient) and the merge is out of place; without grad the fused kernel and
  the in-place merge run as before. Training batches with per-sample masks use ``dense``.
- ``paper``: eq. 6 taken literally, softmax(M * QK^T / sqrt(d)) V: a masked logit becomes 0, not
  -inf, so masked tokens still receive weight exp(0) relative to the visible ones. Dense: logits
  materialised in float32, chunked over pixels. Regional (CPU): inside mask n the ID's logits are
  those of the query scaled by m; outside they are all 0, a constant part (the mean of the ID's values).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .layout import TokenLayout
from .masks import IDMasks, check_mode

# Paper mode materialises logits; cap one chunk at this many float32 elements (256 MiB).
_PAPER_CHUNK_ELEMENTS = 1 << 26
# Hard regional kernel: up to this many pixel classes (sets of visible token groups) run one attention
# each; masks that make more (many small overlaps) run the merging kernel instead.
MAX_PIXEL_CLASSES = 64


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads*d) -> (B, heads, L, d)."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_inputs(q, k, v, heads: int, layout: TokenLayout, masks: IDMasks | None, grid) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 3:
            raise ValueError(f"{name} must be [batch, tokens, heads*dim_head], got shape {tuple(t.shape)}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch and token axes")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} != k/v batch {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q width {q.shape[-1]} != k width {k.shape[-1]}: q and k must be projected "
                         "to the same inner width")
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] % heads:
            raise ValueError(f"{name} width {t.shape[-1]} is not divisible by heads={heads}")
    layout.check_context(k, "k")
    h, w = grid
    if h * w != q.shape[1]:
        raise ValueError(f"q has {q.shape[1]} query pixels but the latent grid {h}x{w} has {h * w}")
    if layout.groups and masks is None:
        raise ValueError(f"the context holds {layout.n_ids} identities and {layout.n_prompts} person prompts "
                         "but no ID masks were given")
    if masks is not None and masks.batch not in (1, q.shape[0]):
        raise ValueError(f"ID masks are given for a batch of {masks.batch} but attention runs on a "
                         f"batch of {q.shape[0]}; give (N, H, W) masks shared by all, or one set per sample")


KERNELS = ("auto", "dense", "regional")
# Returns (output, logsumexp); present in torch >= 2.2. Without it the regional kernel is unavailable.
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    layout: TokenLayout,
    masks: IDMasks | None,
    grid: tuple[int, int],
    mode: str = "hard",
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of latent pixels q over a [text ; IDs] context, each ID visible only in its mask.

    q: (B, h*w, heads*d) projected queries of an h x w latent grid (row-major, as the UNet flattens);
    k, v: (B, layout.total, heads*d) projected context. Returns (B, h*w, heads*d) in q's dtype, before
    the output projection, exactly like a ComfyUI attn2 replace function.
    """
    check_mode(mode)
    _check_inputs(q, k, v, heads, layout, masks, grid)
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    if not layout.groups:
        return merge_heads(F.scaled_dot_product_attention(qh, kh, vh))
    masks.check_layout(layout)
    if masks.trivial:
        return merge_heads(F.scaled_dot_product_attention(qh, kh, vh))
    regional = _use_regional(kernel, q, masks)
    if mode == "paper":
        paper = _paper_regional_attention if regional else _paper_attention
        return merge_heads(paper(qh, kh, vh, layout, masks, grid))
    if regional:
        classes = masks.pixel_classes(layout, *grid, q.device, q.dtype, MAX_PIXEL_CLASSES)
        if classes is not None:
            return merge_heads(_class_attention(qh, kh, vh, classes))
        return merge_heads(_regional_attention(qh, kh, vh, layout, masks, grid))
    bias = masks.hard_bias(layout, *grid, q.dtype, q.device)
    return merge_heads(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias))


def _use_regional(kernel: str, q: torch.Tensor, masks: IDMasks) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    usable = q.device.type == "cpu" and masks.batch == 1 and _flash_cpu is not None
    if kernel == "regional" and not usable:
        raise ValueError("the regional kernel needs CPU tensors, masks shared by the batch and a torch "
                         "with _scaled_dot_product_flash_attention_for_cpu; use kernel='dense'")
    return usable if kernel == "auto" else kernel == "regional"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _part_attention(q, k, v, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, P, d), log-sum-exp (B, H, P)) of q over one key set.

    The fused CPU kernel's log-sum-exp has no gradient, so under autograd the logits are materialised
    (a part is the text tokens or one ID's tokens: at most a few hundred keys)."""
    if not differentiable:
        return _flash_cpu(q, k, v)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = logits.logsumexp(-1)
    return (logits - lse.unsqueeze(-1)).exp() @ v, lse


class _Merger:
    """Running softmax over several key sets, pixel-major: out (B, Q, H, d) and lse (B, Q, H) in float32
    (float64 for float64 inputs).

    Adding a part (o_p, l_p) for some pixels keeps out = sum_p exp(l_p) o_p / sum_p exp(l_p) exact.
    ``differentiable``: merge out of place (index_copy) so autograd can record it; in place otherwise."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, differentiable: bool = False):
        work = torch.promote_types(out.dtype, torch.float32)
        self.differentiable = differentiable
        self.out = out.transpose(1, 2).to(work)                # the kernel's memory is already pixel-major
        self.lse = lse.transpose(1, 2).to(work).contiguous()

    def add(self, idx: torch.Tensor, o_p: torch.Tensor, l_p: torch.Tensor) -> None:
        """o_p (B, P, H, d) and l_p (B, P, H) for the pixels ``idx``."""
        l_old = self.lse[:, idx]
        l_new = torch.logaddexp(l_old, l_p)
        a, b = (l_old - l_new).exp().unsqueeze(-1), (l_p - l_new).exp().unsqueeze(-1)
        merged = self.out[:, idx] * a + o_p * b
        if self.differentiable:
            self.out = self.out.index_copy(1, idx, merged)
            self.lse = self.lse.index_copy(1, idx, l_new)
        else:
            self.out[:, idx] = merged
            self.lse[:, idx] = l_new

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out.transpose(1, 2).to(dtype)


def _paper_regional_attention(q, k, v, layout: TokenLayout, masks: IDMasks, grid) -> torch.Tensor:
    """Eq. 6 through the fused kernel. Inside mask n the ID's logits are m * q.k / sqrt(d), i.e. plain
    attention of the query scaled by m. Outside, every ID logit is exactly 0: each of the ID's tokens
    weighs exp(0), so all outside parts together are one weighted mean of the IDs' mean values,
    merged once. Strength s multiplies a part's weight (adds log s)."""
    text = layout.text_slice
    grad = _needs_grad(q, k, v)
    merged = _Merger(*_part_attention(q, k[:, :, text], v[:, :, text], grad), differentiable=grad)
    work = merged.out.dtype
    q_rows = q.transpose(1, 2)                                 # (B, Q, H, d)
    inside, outside, where = masks.paper_regions(layout, *grid, q.device)
    for tokens, idx, m, log_s in inside:
        q_in = q_rows[:, idx] * m.to(q.dtype)[:, None, None]
        o_n, l_n = _part_attention(q_in.transpose(1, 2), k[:, :, tokens], v[:, :, tokens], grad)
        merged.add(idx, o_n.transpose(1, 2).to(work), l_n.transpose(1, 2).to(work) + log_s)
    if where.numel():
        b, h, _, d = v.shape
        # The mean value of each group's tokens (groups differ in length: one mean per group).
        mean_v = torch.stack([v[:, :, g.tokens].to(work).mean(2) for g in layout.groups], dim=2)  # (B, H, G, d)
        weight = outside[where].to(work)                       # (P, G): tokens * strength, 0 inside
        total = weight.sum(-1)                                 # (P,)
        o_out = torch.einsum("pn,bhnd->bphd", weight / total[:, None], mean_v)
        merged.add(where, o_out, total.log()[None, :, None].expand(b, -1, h))
    return merged.result(q.dtype)


def _regional_attention(q, k, v, layout: TokenLayout, masks: IDMasks, grid) -> torch.Tensor:
    """Hard mode as text attention everywhere + each token group's attention inside its mask (ID n in
    face mask n, person p's prompt in region p), merged exactly.

    With per-part outputs o_p and log-sum-exps l_p (l_g already carrying log(strength * mask)),
    softmax over the union is sum_p exp(l_p) o_p / sum_p exp(l_p); merging one ID at a time keeps
    a running log-sum-exp, so overlapping masks just merge twice.
    """
    text = layout.text_slice
    grad = _needs_grad(q, k, v)
    merged = _Merger(*_part_attention(q, k[:, :, text], v[:, :, text], grad), differentiable=grad)
    work = merged.out.dtype
    q_rows = q.transpose(1, 2)                                 # (B, Q, H, d)
    for tokens, idx, log_w in masks.regions_for(layout, *grid, q.device, work):
        o_n, l_n = _part_attention(q_rows[:, idx].transpose(1, 2), k[:, :, tokens], v[:, :, tokens], grad)
        merged.add(idx, o_n.transpose(1, 2).to(work), l_n.transpose(1, 2).to(work) + log_w[:, None])
    return merged.result(q.dtype)


def _class_attention(q, k, v, classes) -> torch.Tensor:
    """Hard mode, pixels grouped by the token groups they see (``IDMasks.pixel_classes``): one fused
    attention per class over the text and that class's visible tokens, with the log-weight bias only
    where a weight is not 1. Every pixel is in exactly one class and sees no other token, so this is
    exact and needs no merging; the outputs are put back in pixel order by one gather (differentiable
    as it stands). Rows are gathered pixel-major (B, Q, H, d), the memory order of the projections, so
    each gather copies whole rows."""
    q_rows, k_rows, v_rows = (t.transpose(1, 2) for t in (q, k, v))      # (B, L, H, d), contiguous
    outs, order = [], []
    for idx, tokens, bias in classes:
        qc = q_rows.index_select(1, idx).transpose(1, 2)
        kc, vc = (t.index_select(1, tokens).transpose(1, 2) for t in (k_rows, v_rows))
        outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias).transpose(1, 2))
        order.append(idx)
    if len(outs) == 1:
        return outs[0].transpose(1, 2)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return torch.cat(outs, dim=1).index_select(1, inverse).transpose(1, 2)


def _paper_attention(q, k, v, layout: TokenLayout, masks: IDMasks, grid) -> torch.Tensor:
    """softmax(M * QK^T / sqrt(d) + log strength) V, in float32 (float64 for float64 inputs), chunked
    over query pixels. Out of place under autograd (the chunks are concatenated, not written into)."""
    m, strength_bias = masks.paper_terms(layout, *grid, q.device)    # (B|1, 1, Q, K-T), (B|1, 1, 1, K-T)
    b, heads, n_q, d = q.shape
    scale = d ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    kf, vf = k.to(work), v.to(work)
    m = m.to(work)
    strength_bias = strength_bias.to(work) if strength_bias is not None else None
    chunk = max(1, _PAPER_CHUNK_ELEMENTS // max(1, b * heads * k.shape[2]))
    t = layout.text_len
    parts = []
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        logits = (q[:, :, start:stop].to(work) @ kf.transpose(-1, -2)) * scale
        ids = logits[..., t:] * m[:, :, start:stop]
        if strength_bias is not None:
            ids = ids + strength_bias
        logits = torch.cat([logits[..., :t], ids], dim=-1)
        parts.append((logits.softmax(dim=-1) @ vf).to(q.dtype))
    return torch.cat(parts, dim=2)
