"""The masked-attention wrapper inside ComfyUI's real SpatialTransformer (real ComfyUI, CPU).

Attention mass is measured in the real layer: a hook on to_v makes ID n's value rows all-ones and
every other row zero, so the attention output at each pixel (captured before to_out) IS the mass
that pixel puts on ID n's tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch

from instantfamily_nodes.attention import IDMasks, TokenLayout
from instantfamily_nodes.attention.layer import OPTIONS_KEY, IdentityBinding, MaskedCrossAttention, wrap_cross_attention

H, W = 8, 12          # a non-square latent grid
LAYOUT = TokenLayout(77, 2, 5)


@pytest.fixture
def layer(comfyui):
    from comfy.ldm.modules.attention import SpatialTransformer

    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=16, depth=1, context_dim=768, use_linear=True)
    with torch.no_grad():
        for p in st.parameters():
            p.normal_(0, 0.2)
    return st


def _masks():
    m = torch.zeros(2, 64, 96)
    m[0, :, :40] = 1            # latent columns 0..4
    m[1, 16:48, 56:] = 1        # latent rows 2..5, columns 7..11
    return m


def _install(layer):
    for path, wrapper in wrap_cross_attention(layer).items():
        parent, _, leaf = path.rpartition(".")
        setattr(layer.get_submodule(parent), leaf, wrapper)


def _mass(layer, context, options, n):
    """(H, W) attention mass on ID n's tokens, per head-averaged pixel, in the real layer."""
    attn2 = layer.transformer_blocks[0].attn2
    captured = {}

    def on_v(_m, _i, v):
        out = torch.zeros_like(v)
        out[:, LAYOUT.id_slice(n)] = 1.0
        return out

    def before_out(_m, args):
        captured["a"] = args[0]

    h1 = attn2.to_v.register_forward_hook(on_v)
    h2 = attn2.to_out[0].register_forward_pre_hook(before_out)
    try:
        layer(torch.randn(1, 32, H, W), context=[context], transformer_options=options)
    finally:
        h1.remove()
        h2.remove()
    return captured["a"][0].mean(-1).view(H, W)


def test_hard_mode_isolation_in_a_real_layer(layer):
    _install(layer)
    context = torch.randn(1, LAYOUT.total, 768)
    binding = IdentityBinding(LAYOUT, IDMasks(_masks()), "hard")
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[:, :5] = True
    m0 = _mass(layer, context, {OPTIONS_KEY: binding}, 0)
    assert m0[~inside].max() < 1e-6
    assert m0[inside].min() > 1e-3
    m1 = _mass(layer, context, {OPTIONS_KEY: binding}, 1)
    assert m1[:2].max() < 1e-6 and m1[:, :7].max() < 1e-6
    assert m1[2:6, 7:].min() > 1e-3


def test_paper_mode_leaks_in_a_real_layer(layer):
    _install(layer)
    context = torch.randn(1, LAYOUT.total, 768)
    binding = IdentityBinding(LAYOUT, IDMasks(_masks()), "paper")
    m1 = _mass(layer, context, {OPTIONS_KEY: binding}, 1)
    assert m1[:, :7].min() > 1e-3     # eq. 6: masked logits are 0, not -inf


def test_without_binding_the_wrapper_is_the_original_layer(layer):
    context = torch.randn(1, 77, 768)
    x = torch.randn(1, 32, H, W)
    before = layer(x, context=[context], transformer_options={})
    _install(layer)
    assert isinstance(layer.transformer_blocks[0].attn2, MaskedCrossAttention)
    after = layer(x, context=[context], transformer_options={})
    assert torch.equal(before, after)
    # Same parameters, same paths: LoRA-style keys still resolve.
    names = {n for n, _ in layer.named_parameters()}
    assert "transformer_blocks.0.attn2.to_k.weight" in names


def test_outside_the_sigma_window_ids_are_ignored(layer):
    x = torch.randn(1, 32, H, W)
    text = torch.randn(1, 77, 768)
    context = torch.cat([text, torch.randn(1, LAYOUT.total - 77, 768)], dim=1)
    plain = layer(x, context=[text], transformer_options={})
    _install(layer)
    binding = IdentityBinding(LAYOUT, IDMasks(_masks()), sigma_start=5.0, sigma_end=1.0)
    late = layer(x, context=[context], transformer_options={OPTIONS_KEY: binding, "sigmas": torch.tensor([0.5])})
    assert torch.equal(late, plain)
    during = layer(x, context=[context], transformer_options={OPTIONS_KEY: binding, "sigmas": torch.tensor([2.0])})
    assert not torch.allclose(during, plain)


def test_binding_is_shared_not_copied_by_deepcopy():
    binding = IdentityBinding(LAYOUT, IDMasks(_masks()))
    options = {"transformer_options": {OPTIONS_KEY: binding}}
    assert copy.deepcopy(options)["transformer_options"][OPTIONS_KEY] is binding


def test_wrong_context_length_is_a_clear_error(layer):
    _install(layer)
    binding = IdentityBinding(LAYOUT, IDMasks(_masks()))
    with pytest.raises(ValueError, match="context has 100 tokens, but the identity stack is laid out as"):
        layer(torch.randn(1, 32, H, W), context=[torch.randn(1, 100, 768)], transformer_options={OPTIONS_KEY: binding})
