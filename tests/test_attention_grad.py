"""Masked attention is trainable: gradients of both modes and both kernels against autograd on an
independent float64 reference (tests/attention_reference.py), gradcheck on small shapes, float64
hard mode without overflow, and the no-grad (inference) path unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_reference import reference_attention, reference_attention_torch
from instantfamily_nodes.attention import IDMasks, TokenLayout, masked_attention

MODE_KERNELS = [("hard", "dense"), ("hard", "regional"), ("paper", "dense"), ("paper", "regional")]


def soft_rect_masks(n, H, W, seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((n, H, W), dtype=np.float32)
    for i in range(n):
        y0, x0 = rng.integers(0, H // 2), rng.integers(0, W // 2)
        m[i, y0:y0 + H // 2, x0:x0 + W // 2] = rng.uniform(0.4, 1.0)
    return m


def inputs(b, q_len, layout, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, width, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for n in (q_len, layout.total, layout.total)]


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
def test_gradcheck_small(mode, kernel):
    layout = TokenLayout(3, 2, 2)
    grid = (3, 4)
    masks = IDMasks(torch.from_numpy(soft_rect_masks(2, 6, 8, seed=1)), [1.0, 0.5])
    q, k, v = inputs(1, 12, layout, 4, torch.float64, seed=0)
    fn = lambda q, k, v: masked_attention(q, k, v, 2, layout, masks, grid, mode, kernel)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
def test_grads_match_float64_reference_on_sd_like_shapes(mode, kernel):
    """16x16 latent (a 128-px picture at 1/8), 8 heads x 40, 77 text + 4 IDs x 50 tokens."""
    layout = TokenLayout(77, 4, 50)
    grid, heads, d = (16, 16), 8, 40
    raw = soft_rect_masks(4, 128, 128, seed=3)
    strength = [1.0, 0.0, 2.0, 0.7]
    q, k, v = inputs(1, 256, layout, heads * d, torch.float32, seed=4)
    w = torch.randn(1, 256, heads * d, generator=torch.Generator().manual_seed(5))
    out = masked_attention(q, k, v, heads, layout, IDMasks(torch.from_numpy(raw), strength), grid, mode, kernel)
    (out * w).sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention_torch(q64, k64, v64, heads, 77, 50, raw, grid, mode, strength)
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=1e-5 * max(1.0, scale), rtol=1e-3)
    # The switched-off ID (strength 0) gets no gradient in hard mode: its keys/values are never seen.
    if mode == "hard":
        ids1 = layout.id_slice(1)
        assert k.grad[:, ids1].abs().max() == 0 and v.grad[:, ids1].abs().max() == 0


@pytest.mark.parametrize("kernel", ["dense", "regional"])
def test_hard_mode_float64_is_exact(kernel):
    """Binary masks on an integer-ratio grid have exactly representable weights, so float64 matches
    the float64 reference to rounding; the bias stays finite (float64's masked value once overflowed
    a float32 buffer to -inf)."""
    layout = TokenLayout(5, 3, 4)
    grid = (6, 6)
    raw = (soft_rect_masks(3, 24, 24, seed=7) > 0).astype(np.float32)
    masks = IDMasks(torch.from_numpy(raw), [1.0, 0.0, 2.0])
    bias = masks.hard_bias(layout, *grid, torch.float64, "cpu")
    assert bias.dtype == torch.float64 and torch.isfinite(bias).all() and bias.min() < -1e300
    q, k, v = (t.detach() for t in inputs(2, 36, layout, 8, torch.float64, seed=8))
    out = masked_attention(q, k, v, 2, layout, masks, grid, "hard", kernel)
    ref, _ = reference_attention(q, k, v, 2, 5, 4, raw, grid, "hard", [1.0, 0.0, 2.0])
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["hard", "paper"])
def test_grad_path_equals_inference_path(mode):
    """Under autograd the regional kernel materialises its parts and merges out of place; the
    forward value must equal the fused, in-place inference path."""
    layout = TokenLayout(77, 3, 50)
    masks = IDMasks(torch.from_numpy(soft_rect_masks(3, 64, 64, seed=11)), [1.0, 1.5, 0.5])
    q, k, v = inputs(2, 64, layout, 64, torch.float32, seed=12)
    with torch.no_grad():
        fused = masked_attention(q, k, v, 4, layout, masks, (8, 8), mode, "regional")
    recorded = masked_attention(q, k, v, 4, layout, masks, (8, 8), mode, "regional")
    assert recorded.requires_grad and not fused.requires_grad
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=1e-5)
