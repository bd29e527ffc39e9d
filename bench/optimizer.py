"""One training step of the synthetic world's base UNet, AdamW's three CPU implementations side by side.

Interleaved rounds (best round kept) of a full step: forward under bf16 autocast where the CPU has it
natively (fp32 otherwise), loss, backward, AdamW update, on the world base's shapes (16-channel 16 x 16
latents of a 128 px scene, batch 16, 77 text tokens; ``synthetic/base.py``), for UNet widths 32 and 64:
  single-tensor   ``foreach=False``: one small kernel per parameter (``train fit`` and the world base)
  foreach         ``foreach=True``: parameters updated in batched lists
  fused           ``fused=True``: one fused kernel per parameter group
The same update in all three, up to float rounding; only the speed differs. Measured 2026-12-08 on the
2-core Intel Xeon AMX VM: fused 0.94x at width 64, 1.00x at 32, foreach slower (1.05-1.09x). Not adopted:
6 % of a base step would change the last bits of every recorded world run (README's tables reproduce
exactly from the command) for minutes of a 2.7 h run.

    python bench/optimizer.py [--quick]

Writes bench/results/optimizer-cpu.{md,json} (not with ``--quick``: a smoke run keeps the recorded
table). Needs ComfyUI (found like the tests find it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_steps, machine, write_results  # noqa: E402

VARIANTS = {"single-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_fn(channels: int, variant: str, batch: int, side: int, bf16: bool):
    from instantfamily_nodes.demo.tiny import UNET_CONFIG, WORLD_LATENT_CHANNELS
    from instantfamily_nodes.synthetic.base import world_unet

    torch.manual_seed(0)
    unet = world_unet(channels, seed=0).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, **VARIANTS[variant])
    z = torch.randn(batch, WORLD_LATENT_CHANNELS, side, side)
    ctx = torch.randn(batch, 77, UNET_CONFIG["context_dim"])
    t = torch.randint(0, 1000, (batch,)).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(z, timesteps=t, context=ctx).float()
        loss = (out - z).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 32 only, 1 round of 2 steps (smoke test)")
    args = parser.parse_args()
    from instantfamily_nodes.comfy_path import find_comfyui

    try:
        sys.path.insert(0, str(find_comfyui()))
    except FileNotFoundError as exc:
        sys.exit(str(exc))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from instantfamily_nodes.train.host import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16()
    rounds, per_round = (1, 2) if args.quick else (3, 5)
    rows = []
    for channels in (32,) if args.quick else (32, 64):
        steps = {v: step_fn(channels, v, 16, 16, bf16) for v in VARIANTS}
        for fn in steps.values():
            fn()                                       # warm-up: optimizer state allocated
        best = interleaved_steps(steps, rounds, per_round)
        base = best["single-tensor"]
        rows += [[channels, v, round(t * 1000, 1), round(t / base, 3)] for v, t in best.items()]
        print("\n".join(f"width {channels:3d}  {v:14s} {t * 1000:8.1f} ms/step  {t / base:.3f}x"
                        for v, t in best.items()), flush=True)
    if args.quick:
        print("--quick: a smoke run, results not written")
        return
    notes = (f"Forward under {'bf16 autocast' if bf16 else 'fp32 (no native bf16 on this CPU)'}; batch 16 of "
             "16 x 16 latents (the world base at 128 px). Interleaved rounds of "
             f"{per_round} steps, best of {rounds} kept.")
    path = write_results("optimizer", "cpu", machine("cpu"), ["UNet width", "AdamW", "step ms", "vs single-tensor"],
                         rows, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
