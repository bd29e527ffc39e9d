"""One `train fit` step on the synthetic world (the experiment's base and shards), fp32 vs bf16 autocast.

Side by side in one run (interleaved rounds of 6 steps each, best round kept): the trainer's own
``TrainModel`` built from an experiment folder's world base and ``train prepare`` shards, one optimizer
step (forward, backward, AdamW) on the same real batch of 16 with N = 4 slots, masked attention in UNet
and ControlNet:
  fp32         mixed_precision = "no" (the trainer's CPU default)
  bf16         mixed_precision = "bf16" (autocast; trained weights and the loss stay fp32)
The loss of both on the same noise is printed too, to show they compute the same step.

    python bench/world_fit.py [--experiment ~/.cache/instantfamily_nodes/world] [--quick]

Needs a world experiment folder (``python -m instantfamily_nodes.synthetic experiment``: ``base/`` and
``shards/`` are used) and ComfyUI (found like the tests find it). Writes
bench/results/world-fit-cpu.{md,json}; the json's ``summary`` holds ``bf16_vs_fp32_step``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_steps, machine, write_results  # noqa: E402

PRECISIONS = ("no", "bf16")
DEFAULT_EXPERIMENT = Path.home() / ".cache" / "instantfamily_nodes" / "world"


def build(experiment: Path, precision: str, batch_size: int):
    from instantfamily_nodes.synthetic.base import WORLD_CHECKPOINT
    from instantfamily_nodes.train.config import TrainConfig
    from instantfamily_nodes.train.fit import Collate, setup_comfy
    from instantfamily_nodes.train.shards import Manifest

    cfg = TrainConfig(data=str(experiment / "shards"), out=str(experiment / "bench_fit"),
                      checkpoint=str(experiment / "base" / "checkpoints" / WORLD_CHECKPOINT), resolution=128,
                      n_ids=4, batch_size=batch_size, num_workers=0, face_loss_weight=3.0,
                      mixed_precision=precision).validate()
    setup_comfy(cfg, torch.device("cpu"))
    from instantfamily_nodes.train.model import TrainModel

    manifest = Manifest.load(cfg.data)
    if not manifest.has_latents:
        raise SystemExit(f"{cfg.data}: the shards hold no cached latents; run the experiment (it prepares with "
                         "--cache-latents --cache-text)")
    model = TrainModel.build(cfg, manifest, "cpu")
    model.train()
    return cfg, model, Collate(cfg)


def first_batch(cfg, collate):
    from instantfamily_nodes.train.data import open_stream

    stream = open_stream(cfg, 0, 1, 0, collate=collate, pin_memory=False)
    return next(stream).batch


def step_fn(model, batch):
    opt = torch.optim.AdamW([p for ps in model.param_groups().values() for p in ps], lr=3e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", type=Path, default=DEFAULT_EXPERIMENT,
                        help=f"a synthetic world experiment folder (default {DEFAULT_EXPERIMENT}, README's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (smoke test)")
    args = parser.parse_args()
    missing = [need for need in ("base", "shards") if not (args.experiment / need).is_dir()]
    if missing:
        # not an error under bench/run_all.py: this bench needs a world trained first (~1 h on 2 cores)
        print(f"world_fit skipped: --experiment {args.experiment} has no {' or '.join(missing)}/ folder; run "
              f"`python -m instantfamily_nodes.synthetic experiment --out {args.experiment}` first")
        return
    from instantfamily_nodes.train.host import cpu_has_native_bf16

    steps, losses = {}, {}
    for precision in PRECISIONS:
        cfg, model, collate = build(args.experiment, precision, args.batch_size)
        batch = first_batch(cfg, collate)
        with torch.no_grad():
            losses[precision] = float(model.loss(batch, torch.Generator().manual_seed(1)))
        steps[precision] = step_fn(model, batch)
    for fn in steps.values():
        fn()                                          # warm-up, optimizer state allocated
    times = interleaved_steps(steps, rounds=1 if args.quick else 3, per_round=2 if args.quick else 6)
    fp32 = times["no"]
    rows = [[{"no": "fp32", "bf16": "bf16 autocast"}[p], args.batch_size, round(t * 1000, 1), round(t / fp32, 3),
             round(losses[p], 5)] for p, t in times.items()]
    native = cpu_has_native_bf16()
    notes = (f"CPU native bf16 (avx512_bf16 / amx_bf16): {native}. Loss column: both models on the same batch "
             "and noise before any step (the same computation at two precisions).")
    path = write_results("world-fit", "cpu", machine("cpu"), ["variant", "batch", "step ms", "vs fp32", "loss"],
                         rows, notes)
    result_json = path.with_suffix(".json")
    data = json.loads(result_json.read_text())
    data["summary"] = {"bf16_vs_fp32_step": round(times["bf16"] / fp32, 3), "native_bf16": native,
                       "batch_size": args.batch_size, "experiment": str(args.experiment)}
    result_json.write_text(json.dumps(data, indent=1) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
