"""MoA layers in real ComfyUI sampling runs (tiny SD1.5-shaped UNet, CPU).

The references are independent of the MoA code path: the unpatched model sampled on the text-only
prompt (bit for bit), and the layer's own original module run on the text tokens (the prior expert
recomputed outside the MoA layer).
"""
from __future__ import annotations

import pytest
import torch
from instantfamily_nodes.attention.layer import OPTIONS_KEY
from instantfamily_nodes.attention.moa import (
    MOA_KEY,
    MoABinding,
    MoAConfig,
    MoALayer,
    MoAWeightError,
    grow_and_feather,
    load_moa_state_dict,
    moa_layers,
    moa_state_dict,
)
from test_integration import apply, fake_faces, id_masks, sample  # noqa: F401  (env fixture below)

PROMPT = "a photo of two people"
H = W = 128   # latent 16x16: grids 16, 8, 4, 2 (the 2-core CI box is shared; 256 px costs 4x)


@pytest.fixture(scope="module")
def env(comfyui, tmp_path_factory):
    import comfy.sd
    from instantfamily_nodes.demo.tiny import (
        build_tiny_models,
        register_tiny_model_type,
    )
    from instantfamily_nodes.models import load_weights

    import nodes

    register_tiny_model_type()
    tiny = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(tiny.root / "checkpoints" / tiny.checkpoint), output_vae=True, output_clip=True)
    weights = load_weights(tiny.root / "instantfamily" / tiny.weights)
    encode = nodes.CLIPTextEncode()
    return {"model": model, "clip": clip, "weights": weights, "tiny": tiny,
            "encode": lambda text: encode.encode(clip, text)[0]}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny networks, one thread


@pytest.fixture(scope="module")
def reference(env):
    """The unpatched model sampled from the text alone (1 euler step, cfg 5: cond + uncond)."""
    return sample(env["model"], env["encode"](PROMPT), env["encode"](""), steps=1, h=H, w=W)


def moa_node(model, router="mask", strength=1.0, id_strengths="", start=0.0, end=1.0, grow=8, feather=16,
             self_attention=False, weights=None):
    from instantfamily_nodes.nodes.moa import MoA

    return MoA.execute(model, router, strength, id_strengths, start, end, grow, feather, self_attention,
                       weights).result


def trained_weights(env, model, bias=None, config=None):
    """The tiny pack weights plus MoA tensors: random experts (a trained expert differs from the
    layer), routers with ``bias``. Returns (WeightFile, bytes of the MoA tensors)."""
    from instantfamily_nodes.models.weights import WeightFile

    layers = moa_layers(model.get_model_object("diffusion_model"), config or MoAConfig(), share_expert=False)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for k, v in moa_state_dict(layers).items():
        if k.endswith("router.bias") and bias is not None:
            v = torch.tensor(bias)
        elif "expert" in k:
            v = torch.randn(v.shape, generator=gen).to(v.dtype)
        tensors[k] = v
    extra = sum(v.numel() * v.element_size() for v in tensors.values())
    return WeightFile(env["weights"].meta, {**env["weights"].tensors, **tensors}), extra


def _attn_types(model):
    dm = model.model.diffusion_model
    return {type(m).__name__ for n, m in dm.named_modules() if n.endswith(("attn1", "attn2"))}


def test_router_at_prior_is_the_unpatched_model_bit_for_bit(env, reference):
    """prior mode, and a learned router saturated at the prior, over [text ; IDs] conditioning,
    sample exactly what the unpatched model samples from the text alone (cond + uncond batched)."""
    model, pos, neg = apply(env, h=H, w=W)
    for self_attention in (False, True):
        prior, _maps = moa_node(model, "prior", self_attention=self_attention)
        assert torch.equal(sample(prior, pos, neg, steps=1, h=H, w=W), reference)
    trained, _ = trained_weights(env, model, bias=(60.0, -60.0))   # softmax exactly [1, 0] in float32
    learned, _maps = moa_node(model, "learned", weights=trained)
    assert torch.equal(sample(learned, pos, neg, steps=1, h=H, w=W), reference)
    # ... and routing to the (changed) expert does change the picture: the test can fail.
    personal, _maps = moa_node(model, "personalised", weights=trained)
    assert not torch.equal(sample(personal, pos, neg, steps=1, h=H, w=W), reference)


def test_mask_router_background_pixels_equal_the_prior_expert_in_every_layer(env):
    model, pos, neg = apply(env, h=H, w=W)
    moa_model, _maps = moa_node(model, "mask", grow=4, feather=4)
    binding = moa_model.model_options["transformer_options"][OPTIONS_KEY]
    moa = moa_model.model_options["transformer_options"][MOA_KEY]
    checked, hooks = [], []

    def check(layer, args, kwargs, out):
        x, context, opts = args[0], kwargs["context"], kwargs["transformer_options"]
        h, w = opts["activations_shape"][-2:]
        # The prior expert recomputed outside the MoA code: the layer's original module on the text.
        prior = layer.inner(x, context=context[:, binding.layout.text_slice], transformer_options=opts)
        share = moa.mask_share(binding, h, w, x.device)[0]
        background = share == 0
        assert (~background).any()
        assert torch.equal(out[:, background], prior[:, background]), layer.path
        assert not torch.allclose(out[:, ~background], prior[:, ~background])
        checked.append((layer.path, int(background.sum())))

    for layer in moa_model.object_patches.values():
        if isinstance(layer, MoALayer):
            hooks.append(layer.register_forward_hook(check, with_kwargs=True))
    try:
        sample(moa_model, pos, neg, steps=2, h=H, w=W)
    finally:
        for hk in hooks:
            hk.remove()
    assert len(checked) == 2 * 16 and len({p for p, _ in checked}) == 16
    # Every grid but the coarsest (2x2, where the feathered masks touch both cells) has background.
    assert all(n > 0 for p, n in checked if not p.startswith(("middle_block", "input_blocks.7", "input_blocks.8")))


def test_grow_and_feather_keeps_far_pixels_exactly_zero():
    m = torch.zeros(1, 64, 64)
    m[0, 20:30, 20:30] = 1
    g = grow_and_feather(m, grow=6, feather=6)
    assert g[0, 20:30, 20:30].min() > 1 - 1e-6                # feathering starts outside the mask
    assert g[0, :8].max() == 0 and g[0, :, 42:].max() == 0     # farther than grow + feather: exactly 0
    assert 0 < g[0, 25, 38] < 1 and 0 < g[0, 25, 11] < 1       # inside the feather band: soft
    assert torch.equal(grow_and_feather(m), m)


def test_weights_round_trip_and_mismatch_names_the_path(env, tmp_path):
    from instantfamily_nodes.models.weights import load_weights, save_weights

    w = env["weights"]
    dm = env["model"].get_model_object("diffusion_model")
    layers = moa_layers(dm, MoAConfig(router="mlp"), share_expert=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.trainable_parameters():
                p.normal_()
    path = tmp_path / "moa.safetensors"
    save_weights(path, w.meta, w.projection(), extra=moa_state_dict(layers))
    loaded = load_weights(path)
    fresh = moa_layers(dm, MoAConfig(router="mlp"), share_expert=False)
    load_moa_state_dict(fresh, loaded.tensors, str(path))
    for p, layer in layers.items():
        a, b = layer.state_dict(), fresh[p].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("moa.input_blocks.1.1.transformer_blocks.0.attn2.expert.to_k") for k in loaded.tensors)
    # Another layer set: self-attention layers the file lacks -> the first missing path is named.
    other = moa_layers(dm, MoAConfig(router="mlp", self_attention=True), share_expert=False)
    with pytest.raises(MoAWeightError, match=r"moa\.input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.router\.0\.weight is missing"):
        load_moa_state_dict(other, loaded.tensors, str(path))
    with pytest.raises(MoAWeightError, match=r"router\.weight is missing"):
        load_moa_state_dict(moa_layers(dm, MoAConfig(router="linear"), share_expert=False), loaded.tensors)
    with pytest.raises(ValueError, match="'learned' needs pack weights with trained MoA layers"):
        moa_node(apply(env, h=H, w=W)[0], "learned")


def test_object_patches_gone_after_unpatching_and_memory_counted(env):
    import comfy.model_management

    base_pos, base_neg = env["encode"](PROMPT), env["encode"]("")
    before = sample(env["model"], base_pos, base_neg, steps=1, h=H, w=W)
    model, pos, neg = apply(env, h=H, w=W)
    moa_model, _ = moa_node(model, "mask", self_attention=True)
    assert sum(isinstance(v, MoALayer) for v in moa_model.object_patches.values()) == 32
    sample(moa_model, pos, neg, steps=1, h=H, w=W)
    comfy.model_management.unload_all_models()
    assert _attn_types(env["model"]) == {"CrossAttention"}
    assert torch.equal(sample(env["model"], base_pos, base_neg, steps=1, h=H, w=W), before)
    # Shared experts add only the routers; own experts are counted in the size ComfyUI budgets with.
    routers = sum(p.numel() * p.element_size() for v in moa_model.object_patches.values()
                  if isinstance(v, MoALayer) for p in v.router.parameters())
    assert routers > 0 and moa_model.model_size() == model.model_size() + routers
    trained, extra = trained_weights(env, model)
    owned, _ = moa_node(model, "learned", weights=trained)
    assert extra > 0 and owned.model_size() == model.model_size() + extra


def test_router_map_preview_renders_in_id_colours(env):
    from instantfamily_nodes.nodes.moa import RouterMapPreview
    from instantfamily_nodes.palette import id_color

    model, pos, neg = apply(env, h=H, w=W)
    moa_model, maps = moa_node(model, "mask", id_strengths="1, 0.5", grow=0, feather=0)
    latent = sample(moa_model, pos, neg, steps=2, h=H, w=W)
    assert len(maps.capture) == 2 * 16                      # every layer, both steps (cond rows)
    images = RouterMapPreview.execute(maps, {"samples": latent}).result[0]
    assert images.shape == (4, H, W, 3)                      # one per resolution: 16, 8, 4, 2
    img = (images[0] * 255).round()
    # id_masks: ID 0 owns columns 0..41, ID 1 columns 42..83, nobody 84..127.
    assert torch.allclose(img[64, 20], torch.tensor(id_color(0), dtype=torch.float32), atol=1)
    half = 24 + 0.5 * (torch.tensor(id_color(1), dtype=torch.float32) - 24)   # ID 1 at strength 0.5
    assert torch.allclose(img[64, 62], half, atol=1)
    assert torch.allclose(img[64, 115], torch.full((3,), 24.0), atol=1)
    # A second run starts a fresh average (reset by the ModelPatcher's pre-run callback).
    sample(moa_model, pos, neg, steps=1, h=H, w=W)
    assert len(maps.capture) == 16


def test_strength_window_and_per_id_control(env, reference):
    model, pos, neg = apply(env, h=H, w=W)
    off, _ = moa_node(model, "mask", strength=0.0)
    assert torch.equal(sample(off, pos, neg, steps=1, h=H, w=W), reference)
    both_off, _ = moa_node(model, "mask", id_strengths="0, 0")
    assert torch.equal(sample(both_off, pos, neg, steps=1, h=H, w=W), reference)
    late, maps = moa_node(model, "mask", start=0.5, end=1.0)
    sample(late, pos, neg, steps=4, h=H, w=W)
    assert 0 < len(maps.capture) < 4 * 16
    with pytest.raises(ValueError, match="no identities bound"):
        moa_node(env["model"], "mask")


def test_subject_morphing(env):
    import numpy as np
    from instantfamily_nodes.nodes.instantfamily import ProjectIDs
    from instantfamily_nodes.nodes.moa import MorphFaces, MorphIDs

    w = env["weights"]
    fa, fb = fake_faces(w, seed=0), fake_faces(w, seed=1)
    ia, ib = (ProjectIDs.execute(f, w).result[0] for f in (fa, fb))
    for alpha, want in ((0.0, ia.tokens[0]), (1.0, ib.tokens[1]), (0.25, 0.75 * ia.tokens[0] + 0.25 * ib.tokens[1])):
        out = MorphIDs.execute(ia, 0, ib, 1, alpha).result[0]
        assert torch.allclose(out.tokens[0], want, atol=1e-6) and torch.equal(out.tokens[1], ia.tokens[1])
    mid = MorphFaces.execute(fa, 0, fb, 1, 0.5).result[0]
    e = mid[0].embedding.astype(np.float64)
    assert abs(np.linalg.norm(e) - 1) < 1e-5                 # slerp stays on the unit sphere
    da, db = e @ fa[0].embedding, e @ fb[1].embedding
    assert abs(da - db) < 1e-5 and da > float(fa[0].embedding @ fb[1].embedding)
    assert fa[0].embedding is not mid[0].embedding and mid[1] is fa[1]
    with pytest.raises(ValueError, match="index_b: ID 5 does not exist"):
        MorphIDs.execute(ia, 0, ib, 5, 0.5)


def test_with_person_prompts_the_prior_keeps_them_in_their_regions(env):
    """Person prompts are text: the prior expert attends to them in their regions (the masked
    attention with every identity off). MoA at the prior == the Apply'd model whose ID window
    is empty (it then runs exactly that), bit for bit."""
    from test_person_prompts_comfy import apply as apply_prompts

    model, pos, neg, _ = apply_prompts(env)
    no_ids, pos0, neg0, _ = apply_prompts(env, start=1.0, end=1.0)
    prior, _ = moa_node(model, "prior")
    reference = sample(no_ids, pos0, neg0, steps=1)
    assert torch.equal(sample(prior, pos, neg, steps=1), reference)
    mask, _ = moa_node(model, "mask")
    assert not torch.equal(sample(mask, pos, neg, steps=1), reference)


def test_in_place_host_scoped_options_and_masked_fallback(comfyui):
    """In a real SpatialTransformer with the MoA layers installed in place (the trainer's and a
    ControlNet's way): settings from ``binding_scope`` reach them; the prior equals the original module
    on the text; with the IDs bound but no MoA settings the layer is the pack's masked layer."""
    import copy

    from comfy.ldm.modules.attention import SpatialTransformer
    from instantfamily_nodes.attention import IDMasks, TokenLayout
    from instantfamily_nodes.attention.layer import (
        IdentityBinding,
        MaskedCrossAttention,
        binding_scope,
        install_layers,
        wrap_cross_attention,
    )

    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=16, depth=1, context_dim=768, use_linear=True)
    with torch.no_grad():
        for p in st.parameters():
            p.normal_(0, 0.2)
    layout = TokenLayout(77, 2, 5)
    masks = torch.zeros(2, 64, 96)
    masks[0, :, :40], masks[1, 16:48, 56:] = 1, 1
    binding = IdentityBinding(layout, IDMasks(masks))
    x, ctx = torch.randn(1, 32, 8, 12), torch.randn(1, layout.total, 768)
    plain, masked = copy.deepcopy(st), copy.deepcopy(st)
    install_layers(masked, wrap_cross_attention(masked, MaskedCrossAttention))
    install_layers(st, moa_layers(st))
    with torch.no_grad():
        want_prior = plain(x, context=[ctx[:, :77]])
        with binding_scope({OPTIONS_KEY: binding, MOA_KEY: MoABinding("prior")}):
            assert torch.equal(st(x, context=[ctx]), want_prior)
        with binding_scope({OPTIONS_KEY: binding}):
            got, want = st(x, context=[ctx]), masked(x, context=[ctx])
        assert torch.equal(got, want) and not torch.allclose(got, plain(x, context=[ctx]))
