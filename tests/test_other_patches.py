"""Other packs' attention patches and LoRA on a model with InstantFamily applied (real ComfyUI, CPU).

ComfyUI runs an ``attn2`` replace patch (IPAdapter, PuLID and InstantID packs register them) with the
layer's projections directly, skipping the layer's forward, so the masked layer would be bypassed and
the ID tokens visible everywhere: InstantFamily refuses such a model at Apply and at run time (a patch
added after Apply). Patches that run around the layer (``attn2_patch`` before it, ``attn2_output_patch``
after it) compose: both they and the masked attention run. LoRA weight patches reach the projections
the masked layer uses.
"""
from __future__ import annotations

import pytest
import torch

from test_integration import apply, env, sample, spy  # noqa: F401  (fixtures)

LORA_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _plain_replace(calls: list):
    """A replace patch shaped like IPAdapter's: unmasked attention over the projected q, k, v."""
    from comfy.ldm.modules.attention import optimized_attention

    def attn2_replace(q, k, v, extra_options):
        calls.append(tuple(extra_options["block"]))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    return attn2_replace


def test_a_replace_patch_on_the_input_model_is_refused_at_apply(env):
    calls: list = []
    foreign = env["model"].clone()
    foreign.set_model_attn2_replace(_plain_replace(calls), "input", 4)
    foreign.set_model_attn2_replace(_plain_replace(calls), "output", 3)
    with pytest.raises(ValueError, match=r"model: .*replaces the cross-attention \(attn2\) of blocks "
                                         r"input 4, output 3.*IPAdapter"):
        apply({**env, "model": foreign})


def test_a_replace_patch_added_after_apply_is_refused_when_sampling(env):
    calls: list = []
    model, pos, neg = apply(env)
    later = model.clone()
    later.set_model_attn2_replace(_plain_replace(calls), "middle", 0)
    with pytest.raises(ValueError, match=r"replaces the cross-attention \(attn2\) of blocks middle 0"):
        sample(later, pos, neg, steps=1)
    assert calls == []


def test_patches_around_the_layer_compose_with_the_masked_attention(env, spy):
    seen = {"before": 0, "after": 0}

    def before(n, context, value, extra_options):
        seen["before"] += 1
        return n * 0.5, context, value

    def after(n, extra_options):
        seen["after"] += 1
        return n * 2.0

    model, pos, neg = apply(env)
    plain = sample(model, pos, neg, steps=1)
    spy.clear()
    both = model.clone()
    both.set_model_attn2_patch(before)
    both.set_model_attn2_output_patch(after)
    out = sample(both, pos, neg, steps=1)
    # euler, 1 step, cond + uncond in one pass: every one of the 16 layers ran the masked attention
    # and both patches.
    assert len(spy) == 16 and seen == {"before": 16, "after": 16}
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_lora_weight_patches_reach_the_masked_layer(env, spy):
    import comfy.model_management

    from instantfamily_nodes.attention.layer import MaskedCrossAttention

    model, pos, neg = apply(env)
    # ComfyUI keeps the last sampled clone's patches on the shared weights until another loads.
    comfy.model_management.unload_all_models()
    w0 = model.model.state_dict()[LORA_KEY].clone()
    diff = torch.randn_like(w0) * 0.05
    lora = model.clone()
    assert lora.add_patches({LORA_KEY: (diff,)}, 0.5) == [LORA_KEY]
    lora.patch_model()
    try:
        layer = lora.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
        assert isinstance(layer, MaskedCrossAttention)
        torch.testing.assert_close(layer.to_k.weight, w0 + 0.5 * diff)
    finally:
        lora.unpatch_model()
    assert torch.equal(model.model.state_dict()[LORA_KEY], w0)
    spy.clear()
    with_lora = sample(lora, pos, neg, steps=1)
    assert len(spy) == 16
    assert not torch.equal(with_lora, sample(model, pos, neg, steps=1))
