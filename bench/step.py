"""One sampling step of the full SD1.5 UNet + ControlNet (random weights) through ComfyUI's sampler.

Side by side in one run (interleaved rounds, best round kept):
  vanilla      text-only conditioning, plain ControlNet path
  masked N     InstantFamily: N IDs stacked, every UNet and ControlNet cross-attention masked
  prompts N    InstantFamily with per-person prompts: N IDs plus N person prompts (realistic lines,
               token counts from ComfyUI's SD1 tokenizer, trimmed to their own tokens as the Person
               Prompts node does), each masked to its person's region, all in the same masked pass;
               "prompts-full N=4": the same with the padded 77-token chunks (the node's padding=full)
  regional N   what users do today for per-person prompts: one ConditioningSetMask per person (on the
               same person regions as "prompts N") + ConditioningCombine (no identity adapter at all:
               the cheapest form of today's per-person chains)
cfg > 1, so cond and uncond are both evaluated. 256x256 on CPU, 512x512 on CUDA by default.

    python bench/step.py [--device cuda] [--size 512] [--quick]

Needs ComfyUI: $COMFYUI_PATH, two folders above the pack, or /opt/ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import grid_face_masks, machine, markdown_table, peak_memory, time_interleaved, write_results  # noqa: E402

from instantfamily_nodes.comfy_path import find_comfyui  # noqa: E402

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1,
}


def build(device: str):
    import comfy.controlnet
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.cldm.cldm import ControlNet as CldmControlNet

    from instantfamily_nodes.demo.tiny import init_weights
    from instantfamily_nodes.nodes.patching import wrap_controlnet

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    base = config.get_model({}, device=device)
    init_weights(base.diffusion_model, 0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    base = base.to(device=device, dtype=dtype)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device(device))
    cfg = {k: v for k, v in SD15_UNET.items() if k not in ("out_channels",)}
    cnet = CldmControlNet(**cfg, hint_channels=3, device="cpu", dtype=torch.float32)
    init_weights(cnet, 1)
    control = comfy.controlnet.load_controlnet_state_dict(cnet.state_dict())
    return model, wrap_controlnet(control, "random SD1.5 ControlNet")


def text(n_tokens: int = 77, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, n_tokens, 768, generator=g), {}]]


def masked(model, control, n: int, size: int, hint):
    import nodes

    from instantfamily_nodes.attention import IDMasks, TokenLayout
    from instantfamily_nodes.attention.layer import IdentityBinding
    from instantfamily_nodes.models import IDProjection, stack_context
    from instantfamily_nodes.nodes.patching import patch_unet

    proj = IDProjection()
    with torch.no_grad():
        ids = proj(torch.randn(n, 512), torch.randn(n, 7, 7, 512))
        null = proj.null_tokens(n)
    pos_ctx, layout = stack_context(text()[0][0], ids)
    neg_ctx, _ = stack_context(text(seed=1)[0][0], null)
    binding = IdentityBinding(layout, IDMasks(grid_face_masks(n, size)))
    pos = [[pos_ctx, {"cross_attn_controlnet": pos_ctx}]]
    neg = [[neg_ctx, {"cross_attn_controlnet": neg_ctx}]]
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0)
    assert layout == TokenLayout(77, n, 50)
    return patch_unet(model, binding), pos, neg


def grid_person_masks(n: int, size: int) -> torch.Tensor:
    """The person (body) region around each face of grid_face_masks: its whole grid cell grown by 10% on
    each side, so neighbours overlap a little as body boxes do."""
    m = torch.zeros(n, size, size)
    cols = max(1, int(n ** 0.5 + 0.999))
    cell = size // cols
    pad = cell // 10
    for i in range(n):
        r, c = divmod(i, cols)
        m[i, max(0, r * cell - pad): (r + 1) * cell + pad, max(0, c * cell - pad): (c + 1) * cell + pad] = 1
    return m


# What users write per person (issue 13); token counts come from ComfyUI's own SD1 tokenizer.
PERSON_LINES = ("the man on the left in a red leather jacket", "a girl in the middle holding a yellow balloon",
                "a woman in a blue summer dress, smiling", "an old man with a grey beard and a straw hat",
                "a boy in a green hoodie waving", "a woman with curly red hair and round glasses",
                "a teenager in a black t-shirt with headphones", "a grandmother in a white cardigan, knitting")


def person_prompt_lengths(n: int, trimmed: bool = True) -> list[int]:
    """Tokens per person prompt as the Person Prompts node encodes PERSON_LINES (trimmed: start, words, end)."""
    import comfy.sd1_clip

    from instantfamily_nodes.pose.persons import content_lengths

    tok = comfy.sd1_clip.SD1Tokenizer()
    out = []
    for line in (PERSON_LINES * (n // len(PERSON_LINES) + 1))[:n]:
        chunks = tok.tokenize_with_weights(line)["l"]
        out.append(sum(content_lengths(chunks)) if trimmed else 77 * len(chunks))
    return out


def prompts(model, control, n: int, size: int, hint, trimmed: bool = True):
    """N IDs + N person prompts in one masked pass; the negative has the same layout (null IDs, the
    encoding of "" per person), as the Embedding Stack builds it."""
    import nodes

    from instantfamily_nodes.attention import IDMasks, TokenLayout
    from instantfamily_nodes.attention.layer import IdentityBinding
    from instantfamily_nodes.models import IDProjection, stack_context
    from instantfamily_nodes.nodes.patching import patch_unet

    proj = IDProjection()
    with torch.no_grad():
        ids = proj(torch.randn(n, 512), torch.randn(n, 7, 7, 512))
        null = proj.null_tokens(n)
    lens = person_prompt_lengths(n, trimmed)
    lines = [text(k, seed=10 + i)[0][0] for i, k in enumerate(lens)]
    empties = [text(k, seed=2)[0][0] for k in lens]       # the negative: "" cut to the same counts
    pos_ctx, layout = stack_context(text()[0][0], ids, lines)
    neg_ctx, neg_layout = stack_context(text(seed=1)[0][0], null, empties)
    assert layout == neg_layout == TokenLayout(77, n, 50, prompt_lens=tuple(lens))
    binding = IdentityBinding(layout, IDMasks(grid_face_masks(n, size), regions=grid_person_masks(n, size)))
    pos = [[pos_ctx, {"cross_attn_controlnet": pos_ctx}]]
    neg = [[neg_ctx, {"cross_attn_controlnet": neg_ctx}]]
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0)
    return patch_unet(model, binding), pos, neg


def regional(model, control, n: int, size: int, hint):
    import nodes

    setmask, combine = nodes.ConditioningSetMask(), nodes.ConditioningCombine()
    pos = text()
    for i, m in enumerate(grid_person_masks(n, size)):
        person = setmask.append(text(seed=10 + i), m, "default", 1.0)[0]
        pos = combine.combine(pos, person)[0]
    neg = text(seed=1)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0)
    return model, pos, neg


def moa(model, control, n: int, size: int, hint):
    """MoA (issue 12) over the masked setup as a trained MoA file runs it: learned routers and own
    personalised experts in every UNet cross-attention, so each layer runs both experts + the router."""
    from instantfamily_nodes.attention.moa import MoABinding, MoAConfig, moa_layers, moa_state_dict
    from instantfamily_nodes.models.weights import WeightFile
    from instantfamily_nodes.nodes.moa import patch_moa

    patched, pos, neg = masked(model, control, n, size, hint)
    trained = moa_state_dict(moa_layers(model.get_model_object("diffusion_model"), MoAConfig(), share_expert=False))
    return patch_moa(patched, MoABinding("learned"), MoAConfig(), WeightFile(None, trained)), pos, neg


def run(device: str, size: int, quick: bool) -> None:
    import nodes

    model, control = build(device)
    hint = torch.rand(1, size, size, 3)
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    ns = [1, 4] if quick else [1, 2, 4, 8]
    setups = {"vanilla": (model, *nodes.ControlNetApplyAdvanced().apply_controlnet(text(), text(seed=1), control, hint, 1.0, 0.0, 1.0))}
    for n in ns:
        setups[f"masked N={n}"] = masked(model, control, n, size, hint)
    setups["moa N=4"] = moa(model, control, 4, size, hint)
    for n in ns:
        setups[f"prompts N={n}"] = prompts(model, control, n, size, hint)
    setups["prompts-full N=4"] = prompts(model, control, 4, size, hint, trimmed=False)
    for n in ns:
        setups[f"regional N={n}"] = regional(model, control, n, size, hint)

    def step(m, p, ng):
        return lambda: nodes.common_ksampler(m, 0, 1, 5.0, "euler", "normal", p, ng, latent, disable_noise=False)[0]

    fns = {name: step(*s) for name, s in setups.items()}
    with torch.inference_mode():
        for name, fn in fns.items():
            print(f"warm-up: {name}", flush=True)
            fn()
        times = time_interleaved(fns, rounds=2 if quick else 3, min_run_time=0.1)
        mems = {name: peak_memory(fn, device) / 2**20 for name, fn in fns.items()}
    header = ["variant", "N", "step s", "vs vanilla", "vs masked N=1", "peak MiB"]
    rows = []
    for name in fns:
        n = int(name.split("=")[1]) if "=" in name else 0
        ref1 = times.get(f"{name.split(' ')[0]} N=1", times["vanilla"])
        rows.append([name.split(" ")[0], n, times[name], times[name] / times["vanilla"], times[name] / ref1, mems[name]])
    info = machine(device)
    import comfy.ldm.modules.attention as attention

    info["comfy attention"] = attention.optimized_attention.__name__ + " (ComfyUI's choice; used by vanilla and unmasked layers)"
    info["model"] = f"full SD1.5 UNet (320 ch) + SD1.5 ControlNet, random weights, {size}x{size}, batch 1, cfg 5, euler, 1 step"
    m4 = times.get("masked N=4", float("nan")) / times["vanilla"]
    m8 = times.get("masked N=8", float("nan")) / times.get("masked N=1", float("nan"))
    notes = (f"Targets: masked N=4 <= 1.10x vanilla (measured {m4:.3f}); masked N=8 / N=1 <= 1.15 "
             f"(measured {m8:.3f}). One step includes ComfyUI's sampler overhead (cond preparation, "
             "ControlNet hint upscaling), as a user sees it.")
    p4 = times.get("prompts N=4", float("nan")) / times["vanilla"]
    r4 = times.get("regional N=4", float("nan")) / times["vanilla"]
    pf4 = times.get("prompts-full N=4", float("nan")) / times["vanilla"]
    notes += (f" Per-person prompts (issue 13): prompts N=4 {p4:.3f}x vanilla (target <= 1.15; lines of "
              f"{person_prompt_lengths(4)} tokens as the node trims them), with the full 77-token padding "
              f"{pf4:.3f}x, regional conditioning on the same person regions {r4:.3f}x.")
    moa4 = times["moa N=4"] / times["masked N=4"]
    notes += (f" MoA (issue 12): moa N=4 (learned routers, own experts) {moa4:.3f}x masked N=4, "
              f"{times['moa N=4'] / times['vanilla']:.3f}x vanilla.")
    path = write_results("step", device, info, header, rows, notes)
    # Headline ratios for other tools and the README, next to the table.
    results = path.with_suffix(".json")
    data = json.loads(results.read_text())
    data["summary"] = {
        "masked_n4_vs_vanilla": m4,
        "masked_n8_vs_n1": m8,
        "person_prompts_n4_vs_vanilla": p4,
        "regional_n4_vs_vanilla": r4,
        "person_prompts_n4_vs_regional_n4": p4 / r4,
        "person_prompts_full_padding_n4_vs_vanilla": pf4,
        "person_prompt_tokens_n4": person_prompt_lengths(4),
        "moa_vs_masked_step": moa4,
        "moa_n4_vs_vanilla": times["moa N=4"] / times["vanilla"],
    }
    results.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown_table(header, rows))
    print(notes)
    print(f"\nwritten: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="image size (default 256 on CPU, 512 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="N in {1, 4} only")
    args = ap.parse_args()
    try:
        sys.path.insert(0, str(find_comfyui()))
    except FileNotFoundError as exc:
        sys.exit(str(exc))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    run(args.device, args.size or (512 if args.device.startswith("cuda") else 256), args.quick)


if __name__ == "__main__":
    main()
