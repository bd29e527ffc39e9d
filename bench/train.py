"""One training step of the full-size SD1.5 UNet + ControlNet (random weights), masked N = 4 vs plain.

Side by side in one run (interleaved rounds, best round kept), the trainer's own ``TrainModel.loss``
with cached latents and text embeddings (as ``train prepare --cache-latents --cache-text`` writes them):
  plain        a plain ControlNet training step: text-only context, ControlNet trained, UNet frozen
  masked N=4   InstantFamily: 4 IDs projected and stacked, masked attention in all 16 UNet and
               7 ControlNet cross-attention layers, projection + ControlNet trained
  moa N=4      masked N=4 with MoA (train/moa.py) in the 16 UNet cross-attention layers: frozen prior +
               trained personalised expert + router per layer, router loss; MoA parameters trained too
A step is forward + backward + AdamW update, batch 1, fp32 on CPU (bf16 autocast on CUDA).
FLOPs per sample (forward + backward) come from torch's FlopCounterMode over one real 512 px step,
so a GPU run can report utilisation. ``prepare`` images/s is measured on generated scenes with the
pack's synthetic insightface-shaped face pack.

    python bench/train.py [--device cuda] [--size 512] [--quick]

Writes bench/results/train-<cpu|cuda>.{md,json}; the json's ``summary`` holds ``masked_vs_plain_step``,
``flops_per_sample_512`` and ``prepare_images_per_s``. Needs ComfyUI (found like the tests find it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import grid_face_masks, machine, peak_memory, time_interleaved, write_results  # noqa: E402
from step import SD15_UNET  # noqa: E402

from instantfamily_nodes.comfy_path import find_comfyui  # noqa: E402

N_IDS = 4
FACE = {"d_gf": 512, "d_lf": 512, "L": 7}       # antelopev2's widths


def build_model(device: str):
    """TrainModel around a randomly initialised full-size SD1.5 UNet and a ControlNet copied from it."""
    import comfy.latent_formats
    import comfy.supported_models

    from instantfamily_nodes.attention.layer import install_layers, wrap_cross_attention
    from instantfamily_nodes.demo.tiny import init_weights
    from instantfamily_nodes.models.projection import IDProjection
    from instantfamily_nodes.models.weights import WeightMeta
    from instantfamily_nodes.train.config import TrainConfig
    from instantfamily_nodes.train.model import TrainModel, controlnet_from_unet

    cfg = TrainConfig(n_ids=N_IDS, mixed_precision="auto")
    unet = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({}, device="cpu").diffusion_model
    init_weights(unet, 0)
    controlnet = controlnet_from_unet(unet, SD15_UNET, seed=1)
    install_layers(unet, wrap_cross_attention(unet))
    install_layers(controlnet, wrap_cross_attention(controlnet))
    wmeta = WeightMeta(face_encoder="insightface/antelopev2", L=FACE["L"], d_gf=FACE["d_gf"], d_lf=FACE["d_lf"],
                       d_k=768, attention_mode="hard", train_n_ids=N_IDS)
    projection = IDProjection(wmeta.projection_config)
    # SD1.5's scaled-linear schedule (what ComfyUI's model_sampling holds for it)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    unet.requires_grad_(False).eval().to(device)
    model = TrainModel(cfg, wmeta, projection, controlnet, unet, alphas_cumprod, comfy.latent_formats.SD15(),
                       torch.zeros(1, 77, 768), device=device)
    return model.to(device)


def make_batch(size: int, n_ids: int, device: str):
    from instantfamily_nodes.train.batch import Batch

    g = torch.Generator().manual_seed(0)
    b, lat = 1, size // 8
    masks = grid_face_masks(n_ids, size)[None] if n_ids else torch.zeros(b, 0, size, size)
    return Batch(
        image=None, latent=torch.randn(b, 4, lat, lat, generator=g), caption=["a photo of a family"],
        text_embedding=torch.randn(b, 77, 768, generator=g),
        id_global=torch.randn(b, n_ids, FACE["d_gf"], generator=g),
        id_local=torch.randn(b, n_ids, FACE["L"], FACE["L"], FACE["d_lf"], generator=g),
        id_present=torch.ones(b, n_ids, dtype=torch.bool), masks=masks,
        control=torch.rand(b, 3, size, size, generator=g),
        drop_text=torch.zeros(b, dtype=torch.bool), drop_ids=torch.zeros(b, dtype=torch.bool),
        keys=["bench"], face_index=torch.arange(n_ids)[None],
    ).to(device)


def step_fn(model, batch, params, device: str):
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batch, gen)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def flops_per_sample(model, size: int) -> float:
    """Forward + backward FLOPs of one masked N = 4 sample at ``size`` px (FlopCounterMode, one real step:
    the trainer's data-dependent checks need real tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = make_batch(size, N_IDS, str(model.device))
    gen = torch.Generator(device="cpu").manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(batch, gen).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _prepare_seconds(tmp: Path, n_images: int) -> float:
    """Wall seconds of one ``train prepare`` run (1 worker) over ``n_images`` generated 3-face scenes."""
    from PIL import Image

    from instantfamily_nodes.train.__main__ import main as train_main

    src = tmp / f"photos{n_images}"
    src.mkdir()
    rng = np.random.default_rng(n_images)
    for i in range(n_images):
        img = np.full((512, 512, 3), 40, np.uint8)
        for j in range(3):
            x, y = 60 + 150 * j, int(rng.integers(100, 300))
            img[y:y + 80, x:x + 80] = 230
        Image.fromarray(img).save(src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text("three people")
    out = tmp / f"shards{n_images}"
    args = ["prepare", "--input", str(src), "--out", str(out), "--resolution", "512", "--face-encoder",
            "insightface/antelopev2", "--models-root", str(tmp / "models" / "insightface"), "--workers", "1",
            "--no-progress"]
    start = time.perf_counter()
    train_main(args)
    elapsed = time.perf_counter() - start
    done = json.loads((out / "manifest.json").read_text())["samples"]
    if done != n_images:
        raise RuntimeError(f"prepare bench: {done} of {n_images} generated scenes prepared")
    return elapsed


def prepare_rate(n_small: int = 8, n_large: int = 40) -> float:
    """Steady-state images/s of ``train prepare`` (1 worker, the synthetic insightface-shaped face pack):
    two runs of different sizes, so start-up (process spawn, model load) cancels out of the difference."""
    from instantfamily_nodes.models.faces import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic.make_model_pack(tmp / "models" / "insightface", "antelopev2")
        small, large = _prepare_seconds(tmp, n_small), _prepare_seconds(tmp, n_large)
    return (n_large - n_small) / max(large - small, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="picture size (default 256 on CPU, 512 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (smoke test)")
    args = parser.parse_args()
    comfy = find_comfyui()
    if comfy is None:
        sys.exit("bench/train.py needs ComfyUI: set COMFYUI_PATH")
    sys.path.insert(0, str(comfy))
    import comfy.cli_args

    comfy.cli_args.args.cpu = not args.device.startswith("cuda")
    size = args.size or (512 if args.device.startswith("cuda") else 256)

    model = build_model(args.device)
    batches = {"plain": make_batch(size, 0, args.device), f"masked N={N_IDS}": make_batch(size, N_IDS, args.device)}
    controlnet = list(model.controlnet.parameters())
    steps = {"plain": step_fn(model, batches["plain"], controlnet, args.device),
             f"masked N={N_IDS}": step_fn(model, batches[f"masked N={N_IDS}"],
                                          controlnet + list(model.projection.parameters()), args.device)}
    # MoA (issue 12): the same model with MoA layers swapped in for its step only (interleaved fairly).
    from instantfamily_nodes.attention.layer import install_layers
    from instantfamily_nodes.train.moa import MoASettings, MoATraining

    masked_layers = {p: m for p, m in model.unet.named_modules() if p.endswith("attn2")}
    moa = MoATraining(model.unet, MoASettings()).to(args.device)      # installs its layers
    install_layers(model.unet, masked_layers)

    def use_moa(on: bool) -> None:
        install_layers(model.unet, moa.layers if on else masked_layers)
        model.moa = moa if on else None

    def switched(fn, on: bool):
        def step():
            use_moa(on)
            return fn()
        return step

    steps[f"moa N={N_IDS}"] = step_fn(model, batches[f"masked N={N_IDS}"],
                                      controlnet + list(model.projection.parameters()) + list(moa.parameters()),
                                      args.device)
    steps = {name: switched(fn, name.startswith("moa")) for name, fn in steps.items()}
    for fn in steps.values():
        fn()                                          # warm-up, optimizer state allocated
    times = time_interleaved(steps, rounds=1 if args.quick else 3, min_run_time=0.1 if args.quick else 1.0)
    peaks = {name: peak_memory(fn, args.device) for name, fn in steps.items()}
    del steps
    use_moa(False)
    flops = flops_per_sample(model, 512)
    use_moa(True)
    moa_flops = flops_per_sample(model, 512)
    use_moa(False)
    del model, moa
    rate = prepare_rate(4, 12) if args.quick else prepare_rate()

    info = machine(args.device)
    plain = times["plain"]
    rows = [[name, f"{size}x{size}", round(t * 1000, 1), round(t / plain, 3), round(peaks[name] / 2 ** 20, 1)]
            for name, t in times.items()]
    notes = (f"Forward + backward FLOPs per masked N={N_IDS} sample at 512 px: {flops / 1e12:.2f} TFLOP "
             f"(FlopCounterMode). prepare: {rate:.2f} images/s steady state (1 worker, synthetic face pack, "
             "512 px scenes with 3 faces).")
    moa_step = times[f"moa N={N_IDS}"] / times[f"masked N={N_IDS}"]
    notes += (f" MoA (issue 12): moa N={N_IDS} step {moa_step:.3f}x masked N={N_IDS} (target <= 1.4), FLOPs "
              f"{moa_flops / flops:.3f}x ({moa_flops / 1e12:.2f} TFLOP per sample at 512 px).")
    path = write_results("train", args.device, info, ["variant", "size", "step ms", "vs plain", "peak MiB"], rows, notes)
    result_json = path.with_suffix(".json")
    data = json.loads(result_json.read_text())
    data["summary"] = {"masked_vs_plain_step": round(times[f"masked N={N_IDS}"] / plain, 3),
                       "flops_per_sample_512": flops, "prepare_images_per_s": round(rate, 3),
                       "moa_vs_masked_step": round(moa_step, 3), "moa_vs_masked_flops": round(moa_flops / flops, 3),
                       "size": size, "device": args.device}
    result_json.write_text(json.dumps(data, indent=1) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
