"""``python -m instantfamily_nodes.synthetic COMMAND``: the synthetic world's commands.

- ``recognizer``: train the world's recognition net and write the insightface-shaped face pack
  (``<out>/models/<name>/``) that ``train prepare``, the nodes and the benchmark load as
  ``insightface/<name>`` with ``--models-root <out>``.
- ``scenes``: write world scenes as a ``train prepare`` input folder (image + caption + pose JSON).
- ``base``: train the world's base model (VAE + UNet, :mod:`.base`), the stand-in for SD1.5.
- ``experiment``: all of it through the pack's tools: recognizer -> scenes -> ``train prepare`` ->
  ``train fit`` on ``--base`` -> ``train export`` -> ``bench/synthetic.py`` (see :mod:`.experiment`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _recognizer(args: argparse.Namespace) -> int:
    from .recognizer import DEFAULT_PACK, export_pack, train_recognizer
    from .world import World

    world = World(args.identities, args.seed)
    trained = train_recognizer(world, steps=args.steps, train_size=args.train_size, test_size=args.test_size,
                               seed=args.seed, threads=args.threads, map_side=args.map_side)
    folder = export_pack(trained, world, args.out, args.name or DEFAULT_PACK)
    print(json.dumps({"pack": str(folder), "identities": len(world), "heldout_accuracy": trained.heldout_accuracy,
                      "seconds": round(trained.seconds, 1)}))
    return 0


def _scenes(args: argparse.Namespace) -> int:
    from .dataset import write_prepare_input
    from .world import World

    people = [int(p) for p in args.people.split(",")]
    n = write_prepare_input(World(args.identities, args.seed), args.out, args.count, (args.size, args.size),
                            split=args.split, people=people)
    print(json.dumps({"folder": str(Path(args.out)), "scenes": n}))
    return 0


def _sheet(args: argparse.Namespace) -> int:
    from PIL import Image

    from .sheet import scenes_sheet
    from .world import World

    ns = [int(n) for n in args.people.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scenes_sheet(World(args.identities, args.seed), ns, args.size)).save(args.out)
    print(json.dumps({"sheet": str(Path(args.out)), "people": ns}))
    return 0


def _base(args: argparse.Namespace) -> int:
    from ..train.host import import_comfy
    from .base import BaseConfig, build_world_base

    import_comfy(args.comfyui)
    cfg = BaseConfig(size=args.size, identities=args.identities, seed=args.seed, vae_steps=args.vae_steps,
                     unet_steps=args.unet_steps, unet_scenes=args.unet_scenes, threads=args.threads,
                     unet_noise_weight_cap=args.unet_noise_weight_cap, latent_std=args.latent_std,
                     prediction=args.prediction, mixed_precision=args.mixed_precision,
                     vae_face_weight=args.vae_face_weight, unet_channels=args.unet_channels)
    print(json.dumps({"checkpoint": str(build_world_base(args.out, cfg))}))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(base=args.base, scenes=args.scenes, people=args.people, size=args.size, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                           face_loss_weight=args.face_loss_weight, ema_decay=args.ema_decay,
                           ns=args.ns, bench_scenes=args.bench_scenes, sample_steps=args.sample_steps,
                           sample_cfg=args.sample_cfg,
                           identities=args.identities, seed=args.seed, base_vae_steps=args.base_vae_steps,
                           base_unet_steps=args.base_unet_steps,
                           base_unet_channels=args.base_unet_channels, base_prediction=args.base_prediction,
                           base_vae_face_weight=args.base_vae_face_weight,
                           mixed_precision=args.mixed_precision,
                           recognizer_steps=args.recognizer_steps, recognizer_map_side=args.recognizer_map_side,
                           unmasked_baseline=not args.no_unmasked)
    path = run_experiment(args.out, cfg, comfyui=args.comfyui, force=args.force)
    print(f"results: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of every ``synthetic`` subcommand (each sets ``func``)."""
    from ..train.prediction import PREDICTIONS
    from .base import BASE_MIXED_PRECISION
    from .base import BaseConfig as BaseDefaults
    from .experiment import MIXED_PRECISION
    from .experiment import ExperimentConfig as ExperimentDefaults
    from .recognizer import MAP_SIDES

    p = argparse.ArgumentParser(prog="python -m instantfamily_nodes.synthetic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recognizer", help="train the world's recognition net and write its face pack")
    r.add_argument("--out", required=True, help="models root: the pack goes to OUT/models/NAME/")
    r.add_argument("--name", default=None, help="pack name (default synthetic_world)")
    r.add_argument("--identities", type=int, default=24)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--map-side", type=int, choices=MAP_SIDES, default=7,
                   help="side of the net's last feature map: ID tokens per face = side * side + 1")
    r.add_argument("--train-size", type=int, default=12000, help="training crops")
    r.add_argument("--test-size", type=int, default=2000, help="held-out crops for the reported accuracy")
    r.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    r.set_defaults(func=_recognizer)
    s = sub.add_parser("scenes", help="write world scenes as a `train prepare` input folder")
    s.add_argument("--out", required=True)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--people", default="1,2,3,4", help="people per scene, cycled")
    s.add_argument("--split", default="train")
    s.add_argument("--identities", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_scenes)
    t = sub.add_parser("sheet", help="a PNG of held-out scenes above their control images")
    t.add_argument("--out", required=True, help="PNG path")
    t.add_argument("--people", default="1,2,4,7", help="people per scene, one column each")
    t.add_argument("--size", type=int, default=128)
    t.add_argument("--identities", type=int, default=24)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_sheet)
    b = sub.add_parser("base", help="train the world's base model (VAE + UNet: the stand-in for SD1.5)")
    b.add_argument("--out", required=True, help="models root: the checkpoint goes to OUT/checkpoints/")
    b.add_argument("--size", type=int, default=128)
    b.add_argument("--identities", type=int, default=24)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae-steps", type=int, default=BaseDefaults.vae_steps)
    b.add_argument("--vae-face-weight", type=float, default=BaseDefaults.vae_face_weight,
                   help="extra L1 weight on face pixels while the VAE trains (0: plain L1)")
    b.add_argument("--unet-steps", type=int, default=BaseDefaults.unet_steps)
    b.add_argument("--unet-channels", type=int, default=BaseDefaults.unet_channels,
                   help="the UNet's model_channels, a multiple of 32 (SD1.5: 320); 32 takes ~0.55x the time, scores lower")
    b.add_argument("--unet-scenes", type=int, default=3000, help="scenes in the UNet's latent pool")
    b.add_argument("--unet-noise-weight-cap", type=float, default=BaseDefaults.unet_noise_weight_cap,
                   help="UNet loss weight 1/SNR is capped here (1: plain eps-MSE)")
    b.add_argument("--latent-std", type=float, default=BaseDefaults.latent_std,
                   help="std of the VAE's latents (above 1: more signal at each noise level)")
    b.add_argument("--prediction", choices=PREDICTIONS, default=BaseDefaults.prediction,
                   help="what the UNet predicts: eps (SD1.5) or v (better at high noise for a small UNet)")
    b.add_argument("--mixed-precision", choices=BASE_MIXED_PRECISION, default=BaseDefaults.mixed_precision,
                   help="bf16: train under bf16 autocast (faster on CPUs with native bf16, e.g. avx512_bf16)")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    b.add_argument("--comfyui", default=None)
    b.set_defaults(func=_base)
    d = ExperimentDefaults()
    e = sub.add_parser("experiment", help="base -> recognizer -> scenes -> prepare -> fit (masked, unmasked) -> "
                                          "export -> bench")
    e.add_argument("--out", required=True, help="experiment folder (rerun to resume; --force to redo)")
    e.add_argument("--base", default=d.base, help="'world' (train the world's base here, default), 'tiny' (random "
                                                  "tiny set: plumbing only) or an SD1.5-shaped checkpoint")
    e.add_argument("--scenes", type=int, default=d.scenes)
    e.add_argument("--people", default=d.people, help="people per training scene, cycled (a fit conditions up "
                                                      "to 4 of them, like group photos)")
    e.add_argument("--size", type=int, default=d.size)
    e.add_argument("--steps", type=int, default=d.steps, help="train fit steps per model")
    e.add_argument("--batch-size", type=int, default=d.batch_size)
    e.add_argument("--lr", type=float, default=d.lr, help="projection and ControlNet learning rate")
    e.add_argument("--lr-decay", type=float, default=d.lr_decay, help="last fraction of the fit steps over which the "
                   "rate falls (cosine) to a tenth, in both fits (0: constant, ControlNet's schedule)")
    e.add_argument("--face-loss-weight", type=float, default=d.face_loss_weight,
                   help="eps-MSE weight inside the ID masks is 1 + this, in both fits (0: the paper's loss)")
    e.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="train fit's EMA of the trained tensors, in both fits; the exported files are the EMA "
                        "(0: off)")
    e.add_argument("--ns", default=d.ns)
    e.add_argument("--bench-scenes", type=int, default=d.bench_scenes)
    e.add_argument("--sample-steps", type=int, default=d.sample_steps)
    e.add_argument("--sample-cfg", type=float, default=d.sample_cfg, help="the bench's guidance scale (the negative "
                                                                          "has null IDs, so it scales identity too)")
    e.add_argument("--identities", type=int, default=d.identities)
    e.add_argument("--seed", type=int, default=d.seed)
    e.add_argument("--base-vae-steps", type=int, default=d.base_vae_steps)
    e.add_argument("--base-unet-steps", type=int, default=d.base_unet_steps)
    e.add_argument("--base-unet-channels", type=int, default=d.base_unet_channels,
                   help="the world UNet's model_channels (the ControlNet copies it); a multiple of 32")
    e.add_argument("--base-vae-face-weight", type=float, default=d.base_vae_face_weight,
                   help="the base VAE's extra L1 weight on face pixels (0: plain L1)")
    e.add_argument("--base-prediction", choices=PREDICTIONS, default=d.base_prediction,
                   help="what the world base's UNet predicts (eps or v)")
    e.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                   help="base and fits under bf16 autocast; auto: bf16 where the CPU has native bf16 "
                        "(avx512_bf16 / amx_bf16), else fp32")
    e.add_argument("--recognizer-steps", type=int, default=d.recognizer_steps)
    e.add_argument("--recognizer-map-side", type=int, choices=MAP_SIDES, default=d.recognizer_map_side,
                   help="side of the recognizer's local map: ID tokens per face = side * side + 1")
    e.add_argument("--no-unmasked", action="store_true", help="skip the model trained without masks")
    e.add_argument("--comfyui", default=None)
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_experiment)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
