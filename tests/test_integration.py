"""The patch in a real ComfyUI sampling run: tiny SD1.5-shaped UNet + ControlNet, CPU.

Covers isolation measured inside a real UNet cross-attention layer while sampling, the 16 UNet + 7
ControlNet layers running masked attention, cond and uncond in one pass, long prompts, batches,
non-square sizes, cfg = 1, several samplers, no leakage between patched and unpatched models, and the
refusals.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instantfamily_nodes.attention import layer as attention_module
from instantfamily_nodes.models.faces.types import Face, Faces

N_IDS = 2


@pytest.fixture(scope="module")
def env(comfyui, tmp_path_factory):
    import comfy.sd
    import nodes

    from instantfamily_nodes.demo.tiny import build_tiny_models, register_tiny_model_type
    from instantfamily_nodes.models import load_weights
    from instantfamily_nodes.nodes import patching

    register_tiny_model_type()
    tiny = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(tiny.root / "checkpoints" / tiny.checkpoint), output_vae=True, output_clip=True)
    control = patching.load_controlnet(str(tiny.root / "controlnet" / tiny.controlnet))
    weights = load_weights(tiny.root / "instantfamily" / tiny.weights)
    encode = nodes.CLIPTextEncode()
    return {"model": model, "clip": clip, "control": control, "weights": weights,
            "encode": lambda text: encode.encode(clip, text)[0]}


def fake_faces(weights, n=N_IDS, seed=0) -> Faces:
    """Encoded faces with the weight file's feature shapes (face encoding is tested on its own)."""
    m, rng = weights.meta, np.random.default_rng(seed)
    faces = []
    for i in range(n):
        emb = rng.standard_normal(m.d_gf).astype(np.float32)
        faces.append(Face(box=np.array([10 + 60 * i, 10, 50 + 60 * i, 50], np.float32), kps=np.zeros((5, 2), np.float32),
                          embedding=emb / np.linalg.norm(emb), local=rng.standard_normal((m.L, m.L, m.d_lf)).astype(np.float32),
                          crop=np.zeros((112, 112, 3), np.uint8), score=0.9, image_index=i, image_size=(128, 128)))
    return Faces(faces, encoder=m.face_encoder)


def id_masks(h, w, n=N_IDS):
    """Vertical stripes: ID i owns the i-th of n+1 columns; the last column belongs to no one."""
    m = torch.zeros(n, h, w)
    step = w // (n + 1)
    for i in range(n):
        m[i, :, i * step:(i + 1) * step] = 1
    return m


def apply(env, h=256, w=256, mode="hard", prompt="a photo of two people", negative="", control=False, **kw):
    from instantfamily_nodes.nodes.instantfamily import Apply, EmbeddingStack, ProjectIDs

    ids = ProjectIDs.execute(fake_faces(env["weights"]), env["weights"]).result[0]
    pos, neg = EmbeddingStack.execute(env["encode"](prompt), env["encode"](negative), ids, env["weights"]).result
    extra = {}
    if control:
        extra = {"control_net": env["control"], "image": torch.rand(1, h, w, 3)}
    out = Apply.execute(env["model"], pos, neg, id_masks(h, w), kw.pop("strength", 1.0), "",
                        kw.pop("start", 0.0), kw.pop("end", 1.0), mode, env["weights"], **extra)
    return out.result


def sample(model, pos, neg, h=256, w=256, batch=1, cfg=5.0, steps=2, sampler="euler", scheduler="normal", seed=1):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, h // 8, w // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=1.0)[0]["samples"]


@pytest.fixture
def spy(monkeypatch):
    """Records every masked_attention call the wrapper makes: (batch, query pixels, grid, mode)."""
    calls = []
    real = attention_module.masked_attention

    def recording(q, k, v, heads, layout, masks, grid, mode, kernel):
        calls.append((q.shape[0], q.shape[1], tuple(grid), mode))
        return real(q, k, v, heads, layout, masks, grid, mode, kernel)

    monkeypatch.setattr(attention_module, "masked_attention", recording)
    return calls


def test_all_16_unet_and_7_controlnet_layers_run_masked_attention_in_one_cond_uncond_pass(env, spy):
    from instantfamily_nodes.attention.layer import MaskedCrossAttention

    model, pos, neg = apply(env, control=True)
    assert sum(isinstance(m, MaskedCrossAttention) for m in env["control"].control_model.modules()) == 7
    sample(model, pos, neg, steps=2)
    # euler: one model evaluation per step; 16 UNet + 7 ControlNet cross-attentions each, all with
    # cond and uncond batched together (batch 2).
    assert len(spy) == 2 * (16 + 7)
    assert {c[0] for c in spy} == {2}
    grids = {c[2] for c in spy}
    assert grids == {(32, 32), (16, 16), (8, 8), (4, 4)}


def attention_mass(model, pos, neg, layout, tokens: slice, grid: tuple[int, int] = (32, 32)) -> list:
    """Per-pixel attention mass the first UNet cross-attention layer gives ``tokens`` while sampling 2
    steps: their values set to 1 and all others to 0, the layer's output read before its projection."""
    wrapper = model.object_patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"]
    masses = []

    def on_v(_m, _i, v):
        out = torch.zeros_like(v)
        if v.shape[1] == layout.total:
            out[:, tokens] = 1.0
        return out

    def before_out(_m, args):
        masses.append(args[0].mean(-1).reshape(args[0].shape[0], *grid))

    hooks = [wrapper.to_v.register_forward_hook(on_v), wrapper.to_out[0].register_forward_pre_hook(before_out)]
    try:
        sample(model, pos, neg, steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert masses, "the patched layer did not run"
    return masses


def test_isolation_measured_in_a_real_unet_layer_during_sampling(env):
    """Hard mode: the attention mass outside mask n on ID n's tokens is < 1e-6, and inside it is not."""
    model, pos, neg = apply(env)
    layout = pos[0][1]["instantfamily_layout"]
    masses = attention_mass(model, pos, neg, layout, layout.id_slice(0))
    from instantfamily_nodes.attention import IDMasks

    inside = (IDMasks(id_masks(256, 256)).grid(32, 32)[0, 0] > 0).view(32, 32)   # soft border included
    for mass in masses:
        assert mass[:, ~inside].max() < 1e-6
        assert mass[:, inside].min() > 1e-4


@pytest.mark.parametrize("case", ["long_prompt", "batch2_nonsquare", "cfg1", "dpmpp_karras", "paper"])
def test_coverage(env, spy, case):
    long = "a photo of a family, " * 20   # 120 tokens: two CLIP windows
    kw = {"long_prompt": dict(prompt=long), "batch2_nonsquare": dict(h=192, w=320),
          "cfg1": {}, "dpmpp_karras": {}, "paper": dict(mode="paper")}[case]
    model, pos, neg = apply(env, **kw)
    h, w = kw.get("h", 256), kw.get("w", 256)
    sample_kw = {"batch2_nonsquare": dict(batch=2, h=h, w=w), "cfg1": dict(cfg=1.0),
                 "dpmpp_karras": dict(sampler="dpmpp_2m", scheduler="karras", steps=3)}.get(case, {})
    out = sample(model, pos, neg, **sample_kw)
    assert torch.isfinite(out).all() and spy
    if case == "long_prompt":
        assert pos[0][0].shape[1] == 154 + N_IDS * 50 and neg[0][0].shape[1] == pos[0][0].shape[1]
        assert {c[0] for c in spy} == {2}
    if case == "batch2_nonsquare":
        assert {c[2] for c in spy} == {(24, 40), (12, 20), (6, 10), (3, 5)}
        assert {c[0] for c in spy} == {4}
    if case == "cfg1":
        assert {c[0] for c in spy} == {1}
    if case == "paper":
        assert {c[3] for c in spy} == {"paper"}


def test_sigma_window_limits_when_ids_act(env, spy):
    model, pos, neg = apply(env, start=0.5, end=1.0)
    sample(model, pos, neg, steps=4)
    assert 0 < len(spy) < 4 * 16


def test_no_leakage_and_no_interference(env):
    base_pos, base_neg = env["encode"]("a photo of two people"), env["encode"]("")
    before = sample(env["model"], base_pos, base_neg)
    a_model, a_pos, a_neg = apply(env, strength=1.0)
    b_model, b_pos, b_neg = apply(env, strength=0.3)
    a1 = sample(a_model, a_pos, a_neg)
    b1 = sample(b_model, b_pos, b_neg)
    a2 = sample(a_model, a_pos, a_neg)
    after = sample(env["model"], base_pos, base_neg)
    assert torch.equal(before, after), "the untouched model changed after a patched run"
    assert torch.equal(a1, a2), "a second patched clone interfered with the first"
    assert not torch.equal(a1, b1)
    clone = a_model.clone()
    binding = a_model.model_options["transformer_options"]["instantfamily"]
    assert clone.model_options["transformer_options"]["instantfamily"] is binding
    assert clone.object_patches[next(iter(clone.object_patches))] is a_model.object_patches[next(iter(a_model.object_patches))]


def test_refusals(env):
    import comfy.supported_models

    from instantfamily_nodes.nodes.instantfamily import Apply, EmbeddingStack, ProjectIDs
    from instantfamily_nodes.nodes.patching import check_sd15

    model, pos, neg = apply(env)
    with pytest.raises(ValueError, match="2 masks for 3 IDs|3 masks for 2 IDs"):
        Apply.execute(env["model"], pos, neg, id_masks(64, 64, 3), 1.0, "", 0.0, 1.0, "hard")
    with pytest.raises(ValueError, match="masked ControlNet attention needs a ControlNet loaded with InstantFamily"):
        import comfy.controlnet

        foreign = env["control"].copy()
        foreign.__class__ = comfy.controlnet.ControlNet
        Apply.execute(env["model"], pos, neg, id_masks(64, 64), 1.0, "", 0.0, 1.0, "hard",
                      control_net=foreign, image=torch.rand(1, 64, 64, 3))
    with pytest.raises(ValueError, match="no identity stack"):
        Apply.execute(env["model"], env["encode"]("x"), env["encode"](""), id_masks(64, 64), 1.0, "", 0.0, 1.0, "hard")
    sdxl_like = env["model"].clone()
    sdxl_like.model = type(sdxl_like.model).__new__(type(sdxl_like.model))
    sdxl_like.model.model_config = comfy.supported_models.SDXL.__new__(comfy.supported_models.SDXL)
    with pytest.raises(ValueError, match="SD1.5 models only, this is SDXL"):
        check_sd15(sdxl_like)
    wrong = fake_faces(env["weights"])
    wrong.encoder = "insightface/buffalo_l"
    with pytest.raises(ValueError, match="weights were trained on 'insightface/antelopev2'"):
        ProjectIDs.execute(wrong, env["weights"])
    with pytest.raises(ValueError, match="no local feature map"):
        dlib_faces = fake_faces(env["weights"])
        for f in dlib_faces:
            f.local = None
        ProjectIDs.execute(dlib_faces, env["weights"])
    assert EmbeddingStack is not None


@pytest.mark.parametrize("backend", ["attention_sub_quad", "attention_pytorch", "attention_split", "attention_basic"])
def test_any_comfyui_attention_backend(env, spy, monkeypatch, backend):
    """Whatever ComfyUI picked for the unmasked layers, the IDs go through the masked attention and
    the untouched model gives the same result before and after."""
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "optimized_attention", getattr(attention, backend))
    base_pos, base_neg = env["encode"]("a photo"), env["encode"]("")
    before = sample(env["model"], base_pos, base_neg, steps=1)
    model, pos, neg = apply(env, control=True)
    out = sample(model, pos, neg, steps=1)
    assert torch.isfinite(out).all() and len(spy) == 16 + 7
    assert torch.equal(sample(env["model"], base_pos, base_neg, steps=1), before)


def test_id_stack_save_and_load_round_trip(env, tmp_path, monkeypatch):
    import folder_paths

    from instantfamily_nodes.nodes.instantfamily import LoadIDStack, ProjectIDs, SaveIDStack, _stack_files, _weight_files

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "instantfamily", ([], set()))
    ids = ProjectIDs.execute(fake_faces(env["weights"], n=3), env["weights"]).result[0]
    SaveIDStack.execute(ids, "family")
    assert (tmp_path / "instantfamily" / "ids" / "family.safetensors").is_file()
    assert _stack_files() == ["ids/family.safetensors"] and _weight_files() == []
    loaded = LoadIDStack.execute("ids/family.safetensors").result[0]
    assert torch.equal(loaded.tokens, ids.tokens) and loaded.face_encoder == ids.face_encoder == "insightface/antelopev2"
    with pytest.raises(ValueError, match="must be a plain file name"):
        SaveIDStack.execute(ids, "../elsewhere")
    (tmp_path / "instantfamily" / "ids" / "bogus.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LoadIDStack.execute("ids/bogus.safetensors")
