"""Masked cross-attention against the independent float64 reference, plus the properties the
method relies on: isolation, text everywhere, strength, overlap, dtypes, caching, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_reference import reference_attention, resize_area
from instantfamily_nodes.attention import IDMasks, TokenLayout, masked_attention

MODES = ("hard", "paper")


def rect_masks(n, H, W, rng, soft=False):
    m = np.zeros((n, H, W), dtype=np.float32)
    for i in range(n):
        y0, x0 = rng.integers(0, H), rng.integers(0, W)
        y1, x1 = rng.integers(y0 + 1, H + 1), rng.integers(x0 + 1, W + 1)
        m[i, y0:y1, x0:x1] = rng.uniform(0.2, 1.0) if soft else 1.0
    return m


def qkv(b, grid, layout, heads, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, grid[0] * grid[1], heads * d, generator=g)
    k = torch.randn(b, layout.total, heads * d, generator=g)
    v = torch.randn(b, layout.total, heads * d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


MODE_KERNELS = [("hard", "dense"), ("hard", "regional"), ("paper", "dense"), ("paper", "regional")]


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
@pytest.mark.parametrize("n_ids,grid,image,heads,d", [
    (1, (8, 8), (64, 64), 2, 8),
    (4, (16, 16), (128, 128), 8, 5),
    (2, (9, 13), (72, 104), 4, 8),      # odd grid of a 576x832 image at 1/64
    (3, (5, 7), (33, 50), 2, 4),        # non-integer ratios
])
def test_matches_float64_reference(mode, kernel, n_ids, grid, image, heads, d):
    rng = np.random.default_rng(n_ids)
    layout = TokenLayout(77, n_ids, 5)
    masks = rect_masks(n_ids, *image, rng, soft=True)
    strength = rng.uniform(0.0, 2.5, n_ids).astype(np.float32)
    q, k, v = qkv(2, grid, layout, heads, d, seed=n_ids)
    out = masked_attention(q, k, v, heads, layout, IDMasks(torch.from_numpy(masks), strength), grid, mode, kernel)
    ref, _ = reference_attention(q, k, v, heads, 77, 5, masks, grid, mode, strength)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_ids=st.sampled_from([0, 1, 2, 4, 7, 16]),
    gh=st.integers(1, 9), gw=st.integers(1, 9),
    scale=st.sampled_from([1, 2, 3, 8]),
    heads=st.sampled_from([1, 2, 4]), d=st.integers(1, 6),
    text_len=st.sampled_from([1, 77, 154]),
    tokens=st.integers(1, 10),
    batch=st.integers(1, 2),
    per_sample=st.booleans(),
    mode_kernel=st.sampled_from(MODE_KERNELS),
    seed=st.integers(0, 2**16),
)
def test_property_reference(n_ids, gh, gw, scale, heads, d, text_len, tokens, batch, per_sample, mode_kernel, seed):
    mode, kernel = mode_kernel
    if per_sample and kernel == "regional":
        kernel = "dense"   # per-sample masks have no shared regions: the regional kernel refuses them
    rng = np.random.default_rng(seed)
    layout = TokenLayout(text_len, n_ids, tokens)
    H, W = gh * scale + rng.integers(0, 3), gw * scale + rng.integers(0, 3)
    shape = (batch, n_ids) if per_sample else (n_ids,)
    masks = np.stack([rect_masks(n_ids, H, W, rng) for _ in range(batch)]) if per_sample else rect_masks(n_ids, H, W, rng)
    q, k, v = qkv(batch, (gh, gw), layout, heads, d, seed)
    id_masks = IDMasks(torch.from_numpy(masks).float()) if n_ids else None
    out = masked_attention(q, k, v, heads, layout, id_masks, (gh, gw), mode, kernel)
    if n_ids == 0:
        ref = F.scaled_dot_product_attention(*(t.view(batch, -1, heads, d).transpose(1, 2).double() for t in (q, k, v)))
        ref = ref.transpose(1, 2).reshape(batch, -1, heads * d).numpy()
    else:
        ref, _ = reference_attention(q, k, v, heads, text_len, tokens, masks.reshape(shape + (H, W)), (gh, gw), mode)
    assert out.shape == q.shape
    np.testing.assert_allclose(out.numpy(), ref, atol=3e-5, rtol=1e-4)


def test_resize_matches_hand_computation_on_odd_grid():
    # 576x832 image -> 72x104 latent grid (1/8). A box on 8-px boundaries is a binary block; a box
    # starting half-way through a latent pixel covers half of it.
    m = torch.zeros(1, 576, 832)
    m[0, 80:160, 400:484] = 1.0    # rows 10..19 full; cols 50..59 full, col 60 half (480..484 of 480..488)
    grid = IDMasks(m).grid(72, 104)[0, 0].view(72, 104)
    want = np.zeros((72, 104))
    want[10:20, 50:60] = 1.0
    want[10:20, 60] = 0.5
    np.testing.assert_array_equal(grid.numpy(), want)
    np.testing.assert_allclose(grid.numpy(), resize_area(m[0].numpy(), 72, 104))
    for h, w in [(36, 52), (18, 26), (9, 13)]:
        np.testing.assert_allclose(IDMasks(m).grid(h, w)[0, 0].view(h, w).numpy(),
                                   resize_area(m[0].numpy(), h, w), atol=1e-6)


def _two_id_setup(mode="hard", strength=None, overlap=False):
    layout = TokenLayout(77, 2, 10)
    m = torch.zeros(2, 64, 64)
    m[0, :, :32] = 1.0
    m[1, :, 32:] = 1.0
    if overlap:
        m[0, :, :40] = 1.0   # columns 32..39 (latent 4) lie inside both masks
    q, k, v = qkv(1, (8, 8), layout, 2, 8, seed=3)
    return layout, IDMasks(m, strength), q, k, v


@pytest.mark.parametrize("kernel", ["dense", "regional"])
def test_hard_mode_isolates_ids(kernel):
    layout, masks, q, k, v = _two_id_setup()
    base = masked_attention(q, k, v, 2, layout, masks, (8, 8), kernel=kernel).view(8, 8, -1)
    k2, v2 = k.clone(), v.clone()
    k2[:, layout.id_slice(1)] += 5.0 * torch.randn_like(k2[:, layout.id_slice(1)])
    v2[:, layout.id_slice(1)] += 5.0
    changed = masked_attention(q, k2, v2, 2, layout, masks, (8, 8), kernel=kernel).view(8, 8, -1)
    assert torch.equal(base[:, :4], changed[:, :4]), "pixels outside ID 1's mask must not see ID 1"
    assert (base[:, 4:] - changed[:, 4:]).abs().amax(dim=-1).min() > 1e-3, "pixels inside must"


def test_paper_mode_leaks_by_design():
    # eq. 6: a masked logit becomes 0, so its exp() still weighs 1: outside pixels see ID 1.
    layout, masks, q, k, v = _two_id_setup("paper")
    _, p = reference_attention(q, k, v, 2, 77, 10, masks.masks[0].numpy(), (8, 8), "paper")
    left = np.arange(64).reshape(8, 8)[:, :4].ravel()          # pixels outside ID 1's mask
    assert p[0][:, left][..., layout.id_slice(1)].sum(-1).min() > 0.01


@pytest.mark.parametrize("kernel", ["dense", "regional"])
def test_pixel_in_no_mask_sees_text_only(kernel):
    layout = TokenLayout(77, 2, 10)
    m = torch.zeros(2, 64, 64)
    m[0, :32, :32] = 1
    m[1, :32, 32:] = 1
    q, k, v = qkv(1, (8, 8), layout, 2, 8, seed=5)
    out = masked_attention(q, k, v, 2, layout, IDMasks(m), (8, 8), kernel=kernel).view(8, 8, -1)
    text_only = F.scaled_dot_product_attention(
        *(t.view(1, -1, 2, 8).transpose(1, 2) for t in (q, k[:, :77], v[:, :77]))
    ).transpose(1, 2).reshape(1, 8, 8, -1)[0]
    torch.testing.assert_close(out[4:], text_only[4:], atol=1e-6, rtol=1e-5)


def test_overlap_pixel_attends_to_both():
    layout, masks, q, k, v = _two_id_setup(overlap=True)
    base = masked_attention(q, k, v, 2, layout, masks, (8, 8)).view(8, 8, -1)
    for n in (0, 1):
        v2 = v.clone()
        v2[:, layout.id_slice(n)] += 3.0
        out = masked_attention(q, k, v2, 2, layout, masks, (8, 8)).view(8, 8, -1)
        assert (out[:, 4] - base[:, 4]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_strength_zero_equals_dropping_the_id(mode):
    layout, masks, q, k, v = _two_id_setup(mode, strength=[1.0, 0.0])
    out = masked_attention(q, k, v, 2, layout, masks, (8, 8), mode)
    one = TokenLayout(77, 1, 10)
    keep = slice(0, one.total)
    ref = masked_attention(q, k[:, keep], v[:, keep], 2, one, IDMasks(masks.masks[0, :1]), (8, 8), mode)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_strength_above_one_emphasises():
    layout, masks, q, k, v = _two_id_setup()
    _, p1 = reference_attention(q, k, v, 2, 77, 10, masks.masks[0].numpy(), (8, 8), "hard")
    _, p2 = reference_attention(q, k, v, 2, 77, 10, masks.masks[0].numpy(), (8, 8), "hard", [2.0, 1.0])
    left = np.arange(64).reshape(8, 8)[:, :4].ravel()
    m1 = p1[0][:, left][..., layout.id_slice(0)].sum(-1)
    m2 = p2[0][:, left][..., layout.id_slice(0)].sum(-1)
    assert (m2 > m1).all()
    out = masked_attention(q, k, v, 2, layout, IDMasks(masks.masks[0], [2.0, 1.0]), (8, 8))
    ref, _ = reference_attention(q, k, v, 2, 77, 10, masks.masks[0].numpy(), (8, 8), "hard", [2.0, 1.0])
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5)


@pytest.mark.parametrize("n_ids", [0, 3])
def test_hard_mode_without_effective_mask_is_plain_attention(n_ids):
    layout = TokenLayout(154, n_ids, 50)
    q, k, v = qkv(2, (16, 16), layout, 8, 40, seed=7)
    masks = IDMasks(torch.ones(n_ids, 128, 128)) if n_ids else None
    out = masked_attention(q, k, v, 8, layout, masks, (16, 16), "hard")
    plain = F.scaled_dot_product_attention(*(t.view(2, -1, 8, 40).transpose(1, 2) for t in (q, k, v)))
    assert torch.equal(out, plain.transpose(1, 2).reshape(2, -1, 320))


def test_paper_mode_all_ones_is_plain_attention():
    layout = TokenLayout(77, 2, 50)
    q, k, v = qkv(1, (8, 8), layout, 8, 40, seed=8)
    out = masked_attention(q, k, v, 8, layout, IDMasks(torch.ones(2, 64, 64)), (8, 8), "paper")
    plain = F.scaled_dot_product_attention(*(t.view(1, -1, 8, 40).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, plain.transpose(1, 2).reshape(1, -1, 320), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_is_finite_and_close(mode, kernel, dtype, tol):
    layout = TokenLayout(77, 4, 50)
    rng = np.random.default_rng(0)
    masks = IDMasks(torch.from_numpy(rect_masks(4, 256, 256, rng)), [1.0, 0.0, 2.0, 0.5])
    q, k, v = qkv(2, (32, 32), layout, 8, 40, seed=9)
    ref = masked_attention(q, k, v, 8, layout, masks, (32, 32), mode, "dense")
    out = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8, layout, masks, (32, 32), mode, kernel)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # Huge logits (q x 100) must not overflow the masked bias into inf/NaN.
    big = masked_attention((q * 100).to(dtype), k.to(dtype), v.to(dtype), 8, layout, masks, (32, 32), mode, kernel)
    assert torch.isfinite(big).all()


def test_masks_built_once_per_layout_and_resolution():
    layout = TokenLayout(77, 2, 50)
    masks = IDMasks(torch.from_numpy(rect_masks(2, 512, 512, np.random.default_rng(1))))
    for grid in [(64, 64), (32, 32), (16, 16), (8, 8)]:
        q, k, v = qkv(1, grid, layout, 8, 40)
        masked_attention(q, k, v, 8, layout, masks, grid)
    first = {g: masks.hard_bias(layout, *g, torch.float32, "cpu") for g in [(64, 64), (8, 8)]}
    n_cached = len(masks._cache)
    for _ in range(3):
        for grid in [(64, 64), (32, 32), (16, 16), (8, 8)]:
            q, k, v = qkv(1, grid, layout, 8, 40)
            masked_attention(q, k, v, 8, layout, masks, grid)
    assert len(masks._cache) == n_cached
    for g, bias in first.items():
        assert masks.hard_bias(layout, *g, torch.float32, "cpu") is bias


def test_per_sample_masks_equal_separate_calls():
    layout = TokenLayout(77, 2, 5)
    rng = np.random.default_rng(4)
    m = torch.from_numpy(np.stack([rect_masks(2, 32, 32, rng) for _ in range(3)]))
    s = torch.tensor([[1.0, 0.5], [0.0, 1.0], [2.0, 2.0]])
    q, k, v = qkv(3, (8, 8), layout, 2, 4, seed=11)
    out = masked_attention(q, k, v, 2, layout, IDMasks(m, s), (8, 8))
    for b in range(3):
        one = masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], 2, layout, IDMasks(m[b], s[b]), (8, 8))
        torch.testing.assert_close(out[b:b + 1], one, atol=1e-6, rtol=1e-5)


# ---- bad inputs: each a clear error -------------------------------------------------------------

def _ok():
    layout = TokenLayout(77, 2, 5)
    q, k, v = qkv(1, (8, 8), layout, 2, 4)
    return layout, q, k, v, IDMasks(torch.ones(2, 64, 64) * 0.5)


def test_error_mask_count_differs_from_ids():
    layout, q, k, v, _ = _ok()
    with pytest.raises(ValueError, match="3 ID masks given for a context with 2 identities"):
        masked_attention(q, k, v, 2, layout, IDMasks(torch.ones(3, 64, 64)), (8, 8))


@pytest.mark.parametrize("shape", [(64, 64), (1, 2, 3, 64, 64)])
def test_error_mask_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\) or \(B, N, H, W\), got rank"):
        IDMasks(torch.ones(shape))


def test_error_empty_mask():
    layout, q, k, v, _ = _ok()
    m = torch.ones(2, 64, 64)
    m[1] = 0
    with pytest.raises(ValueError, match=r"ID mask\(s\) \[1\] are empty"):
        masked_attention(q, k, v, 2, layout, IDMasks(m), (8, 8))
    # ...unless that ID is switched off (a padded training slot).
    masked_attention(q, k, v, 2, layout, IDMasks(m, [1.0, 0.0]), (8, 8))


def test_error_mismatched_widths():
    layout, q, k, v, masks = _ok()
    with pytest.raises(ValueError, match="q width 8 != k width 6"):
        masked_attention(q, k[..., :6], v[..., :6], 2, layout, masks, (8, 8))
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        masked_attention(q, k, v, 3, layout, masks, (8, 8))


def test_error_context_does_not_match_layout():
    layout, q, k, v, masks = _ok()
    with pytest.raises(ValueError, match="k has 77 tokens but the layout expects 87"):
        masked_attention(q, k[:, :77], v[:, :77], 2, layout, masks, (8, 8))


def test_error_grid_and_values():
    layout, q, k, v, masks = _ok()
    with pytest.raises(ValueError, match="latent grid 8x9 has 72"):
        masked_attention(q, k, v, 2, layout, masks, (8, 9))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        IDMasks(torch.full((2, 8, 8), 1.5))
    with pytest.raises(ValueError, match="one value per identity"):
        IDMasks(torch.ones(2, 8, 8), [1.0])
    with pytest.raises(ValueError, match="attention mode must be one of"):
        masked_attention(q, k, v, 2, layout, masks, (8, 8), "soft")
    with pytest.raises(ValueError, match="kernel must be one of"):
        masked_attention(q, k, v, 2, layout, masks, (8, 8), kernel="fast")
    with pytest.raises(ValueError, match="no ID masks were given"):
        masked_attention(q, k, v, 2, layout, None, (8, 8))


def test_error_regional_kernel_with_per_sample_masks():
    layout = TokenLayout(77, 2, 5)
    q, k, v = qkv(2, (8, 8), layout, 2, 4)
    per_sample = IDMasks(torch.full((2, 2, 8, 8), 0.5))
    with pytest.raises(ValueError, match="regional kernel needs CPU tensors, masks shared by the batch"):
        masked_attention(q, k, v, 2, layout, per_sample, (8, 8), kernel="regional")
