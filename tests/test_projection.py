"""The embedding stack (sec. 3.3): token shapes, values against a hand computation, the null ID."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instantfamily_nodes.attention import TokenLayout
from instantfamily_nodes.models import IDProjection, ProjectionConfig, stack_context


def layer_norm64(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def test_tokens_match_hand_computation():
    torch.manual_seed(0)
    cfg = ProjectionConfig(d_gf=12, d_lf=6, side=3, d_k=16)
    proj = IDProjection(cfg)
    for p in proj.parameters():   # non-trivial norms, so they are really applied
        torch.nn.init.normal_(p, std=0.5)
    g, loc = torch.randn(2, 12), torch.randn(2, 3, 3, 6)
    out = proj(g, loc).detach().double().numpy()
    assert out.shape == (2, 10, 16)
    P = {k: v.detach().double().numpy() for k, v in proj.state_dict().items()}
    g64, l64 = g.double().numpy(), loc.double().numpy()
    for n in range(2):
        want = layer_norm64(g64[n] @ P["global_proj.weight"].T + P["global_proj.bias"],
                            P["global_norm.weight"], P["global_norm.bias"])
        np.testing.assert_allclose(out[n, 0], want, atol=1e-5)
        for r in range(3):
            for c in range(3):
                x = (l64[n, r, c] @ P["local_proj.weight"].T + P["local_proj.bias"]
                     + P["pos_row"][r, 0] + P["pos_col"][0, c])
                want = layer_norm64(x, P["local_norm.weight"], P["local_norm.bias"])
                np.testing.assert_allclose(out[n, 1 + 3 * r + c], want, atol=1e-5)


def test_position_embedding_distinguishes_positions():
    proj = IDProjection(ProjectionConfig(d_gf=8, d_lf=8, side=4, d_k=32))
    loc = torch.ones(1, 4, 4, 8)            # the same feature everywhere
    tokens = proj(torch.zeros(1, 8), loc)[0, 1:]
    assert torch.cdist(tokens, tokens).add(torch.eye(16) * 1e9).min() > 1e-4


@pytest.mark.parametrize("n_ids", [0, 1, 4, 7, 16])
def test_stack_any_number_of_ids(n_ids):
    proj = IDProjection()
    text = torch.randn(2, 154, 768)
    ids = proj(torch.randn(n_ids, 512), torch.randn(n_ids, 7, 7, 512))
    ctx, layout = stack_context(text, ids)
    assert layout == TokenLayout.for_face_grid(154, n_ids, 7)
    assert ctx.shape == (2, layout.total, 768)
    assert torch.equal(ctx[:, layout.text_slice], text)
    for n in range(n_ids):
        assert torch.equal(ctx[1, layout.id_slice(n)], ids[n])


def test_null_id_has_the_same_layout_as_the_conditional_stack():
    proj = IDProjection()
    text = torch.randn(1, 77, 768)
    cond, layout = stack_context(text, proj(torch.randn(4, 512), torch.randn(4, 7, 7, 512)))
    uncond, null_layout = stack_context(text, proj.null_tokens(4))
    assert null_layout == layout and uncond.shape == cond.shape
    zeros = proj(torch.zeros(4, 512), torch.zeros(4, 7, 7, 512))
    assert torch.equal(uncond[:, layout.ids_slice], zeros.reshape(1, -1, 768))
    assert proj.null_tokens(2, batch_shape=(3,)).shape == (3, 2, 50, 768)


def test_errors_name_the_mismatch():
    proj = IDProjection()
    with pytest.raises(ValueError, match="global feature width 128 != d_gf=512"):
        proj(torch.randn(1, 128), torch.randn(1, 7, 7, 512))
    with pytest.raises(ValueError, match=r"local feature map \(8, 8, 512\) != \(L, L, d_lf\)=\(7, 7, 512\)"):
        proj(torch.randn(1, 512), torch.randn(1, 8, 8, 512))
    with pytest.raises(ValueError, match="disagree on the number of faces"):
        proj(torch.randn(2, 512), torch.randn(3, 7, 7, 512))
    with pytest.raises(ValueError, match="ID token width 768 != text width 1024"):
        stack_context(torch.randn(1, 77, 1024), proj.null_tokens(1))
