"""The synthetic-world experiment as one command, through the pack's own tools end to end:

1. the world's base model (:mod:`.base`: VAE + UNet trained on world scenes, the stand-in for SD1.5;
   ``<out>/base``), unless ``--base`` names another SD1.5-shaped checkpoint;
2. the world's recognizer pack (``<out>/models``);
3. world scenes (1-7 people) as a ``train prepare`` input folder, then ``train prepare`` with that pack,
   caching the base's VAE latents and CLIP encodings;
4. ``train fit`` twice on the base (ControlNet from the base, ID projection, base frozen, N = 4 slots in
   random order): with masked attention in UNet and ControlNet (the method) and with every ID visible
   everywhere (``mask_ids=false``: the unmasked-stacking baseline); ``train export`` for both;
5. ``bench/synthetic.py`` on the exported files: identity accuracy by position for the masked model, the
   same model with its masks off, and the model trained unmasked.

With ``--base tiny`` the demo's tiny *random* SD1.5-shaped set is used instead of step 1: every step runs,
the numbers are chance, and the results say ``untrained base``.

Each step is an ordinary subprocess (the same commands a user types); finished steps are skipped on a
rerun (``--force`` redoes them; a rerun with more ``--steps`` resumes both fits from their last
checkpoint). Seconds per step go into the results.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
# the base's precisions (synthetic/base.py), or auto: bf16 where the CPU has it natively
MIXED_PRECISION = ("auto", "no", "bf16")


@dataclass
class ExperimentConfig:
    base: str = "world"              # "world" (trained here), "tiny" (random: plumbing) or a checkpoint path
    scenes: int = 4000               # training scenes for `train prepare`
    people: str = "1,2,3,4,5,6,7"    # people per training scene, cycled; a fit conditions up to 4 of them
    size: int = 128
    steps: int = 2000                # `train fit` steps, per model
    batch_size: int = 16
    lr: float = 3e-4                 # projection and ControlNet
    lr_decay: float = 0.0            # train fit's lr_decay (0: constant; a fall at the end measured no gain)
    face_loss_weight: float = 3.0    # train fit's face_loss_weight (both fits); 0 = the paper's plain MSE
    ema_decay: float = 0.0           # train fit's ema_decay (both fits; export then writes the EMA); 0 = off
    ns: str = "1,2,3,4,7,10"         # bench: people per picture (10 on a 128 x 192 canvas: canvas_for)
    bench_scenes: int = 16           # per N
    sample_steps: int = 20
    sample_cfg: float = 5.0          # the bench's guidance scale
    identities: int = 24
    seed: int = 0
    base_vae_steps: int = 1500
    base_unet_steps: int = 3500
    base_unet_channels: int = 64     # the world UNet's model_channels (and so the ControlNet's); 32 before 2026-12-07
    base_vae_face_weight: float = 0.0    # the base VAE's extra L1 weight on face pixels
    base_prediction: str = "v"       # the base UNet's target: "v" or "eps" (SD1.5's; worse here: README)
    recognizer_steps: int = 600
    recognizer_map_side: int = 7     # the recognizer's local map: 7 x 7 (50 tokens per ID) or 4 x 4 (17)
    recognizer_train_size: int = 12000
    base_unet_scenes: int = 3000
    unmasked_baseline: bool = True   # also train the mask_ids=false model
    mixed_precision: str = "auto"    # base and fits: "bf16" autocast, "no", or auto (bf16 on native-bf16 CPUs)


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


class _Clock:
    """Seconds per finished step (skipped steps are not listed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, needed: bool, fn) -> None:
        if not needed:
            return
        t0 = time.time()
        fn()
        self.seconds[name] = round(time.time() - t0, 1)


def _tiny_base(out: Path, comfyui: str | None, py: str) -> str:
    from ..comfy_path import find_comfyui

    cpath = str(find_comfyui(comfyui))
    code = ("import sys; sys.path.insert(0, %r); import comfy.cli_args; comfy.cli_args.args.cpu = True; "
            "from instantfamily_nodes.demo.tiny import build_tiny_models; m = build_tiny_models(%r); "
            "print(m.root / 'checkpoints' / m.checkpoint)") % (cpath, str(out / "tiny_models"))
    return subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def _fit_and_export(py: str, env: dict, cfg: ExperimentConfig, base: str, shards: Path, run: Path, weights: Path,
                    controlnet: Path, force: bool, extra: dict | None = None) -> None:
    if force:
        shutil.rmtree(run, ignore_errors=True)
    sets = {"data": shards, "out": run, "checkpoint": base, "resolution": cfg.size, "n_ids": 4,
            "batch_size": cfg.batch_size, "steps": cfg.steps, "lr_projection": cfg.lr, "lr_controlnet": cfg.lr,
            "lr_warmup": _warmup_steps(cfg, run), "lr_decay": cfg.lr_decay, "num_workers": 0, "validate_every": 0,
            "checkpoint_every": max(1, min(cfg.steps, 500)), "keep_last": 1, "seed": cfg.seed,
            "face_loss_weight": cfg.face_loss_weight, "ema_decay": cfg.ema_decay,
            "mixed_precision": cfg.mixed_precision, **(extra or {})}
    cmd = [py, "-m", "instantfamily_nodes.train", "fit", "--no-progress", "--device", "cpu"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    if (run / "checkpoints").is_dir():
        cmd.append("--resume")
    _run(cmd, env)
    _run([py, "-m", "instantfamily_nodes.train", "export", "--checkpoint-dir", str(run / "checkpoints"),
          "--out-weights", str(weights), "--out-controlnet", str(controlnet)], env)


def _warmup_steps(cfg: ExperimentConfig, run: Path) -> int:
    """A tenth of the fit's steps, at most 100; a resumed fit keeps its checkpoint's warm-up (the trainer
    refuses a resume whose schedule changed, and under 1,000 steps more ``--steps`` would change it)."""
    from ..train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(run / "checkpoints")
    if newest is not None:
        return int(json.loads((newest / "config.json").read_text())["lr_warmup"])
    return min(100, cfg.steps // 10)


def _trained_steps(run: Path) -> int:
    """The step of the run's newest complete checkpoint (0 when none): a rerun with more ``--steps`` resumes."""
    from ..train.checkpoint import checkpoints

    found = checkpoints(run / "checkpoints")
    return found[-1][0] if found else 0


def check_existing_base(base_json: Path, cfg: ExperimentConfig) -> None:
    """Refuse to reuse a world base built with other settings than ``cfg`` asks (a rerun after a change of
    ``--base-prediction`` would otherwise fit on the old base and report it as the new one)."""
    if not base_json.is_file():
        return
    # bases written before these settings existed: eps-prediction, fp32, plain L1 VAE
    built = {"prediction": "eps", "mixed_precision": "no", "vae_face_weight": 0.0, "unet_channels": 32,
             **json.loads(base_json.read_text()).get("config", {})}
    asked = {"size": cfg.size, "identities": cfg.identities, "seed": cfg.seed, "vae_steps": cfg.base_vae_steps,
             "unet_steps": cfg.base_unet_steps, "unet_scenes": cfg.base_unet_scenes, "prediction": cfg.base_prediction,
             "mixed_precision": cfg.mixed_precision, "vae_face_weight": cfg.base_vae_face_weight,
             "unet_channels": cfg.base_unet_channels}
    differ = {k: (built.get(k), v) for k, v in asked.items() if built.get(k) != v}
    if differ:
        what = ", ".join(f"{k}: built {b!r}, asked {a!r}" for k, (b, a) in differ.items())
        raise ValueError(f"{base_json.parent}: the world base there was built with other settings ({what}); "
                         "use another --out, or --force to rebuild everything")


def check_existing_pack(pack: Path, cfg: ExperimentConfig) -> None:
    """Refuse to reuse a world recognizer pack built with other settings than ``cfg`` asks (its ID tokens,
    identities and world would silently differ from the ones the results name)."""
    from .recognizer import load_classes

    if not (pack / "world.safetensors").is_file():
        return
    _, meta = load_classes(pack)
    built = {"identities": meta.get("identities"), "seed": meta.get("seed"),
             "map_side": meta.get("map_side", "7")}       # packs written before map_side existed are 7 x 7
    asked = {"identities": str(cfg.identities), "seed": str(cfg.seed), "map_side": str(cfg.recognizer_map_side)}
    differ = [f"{k}: built {built[k]}, asked {v}" for k, v in asked.items() if built[k] != v]
    if differ:
        raise ValueError(f"{pack}: the world recognizer there was built with other settings ({', '.join(differ)}); "
                         "use another --out, or --force to rebuild everything")


def resolve_mixed_precision(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``mixed_precision`` "auto" made "bf16" on a CPU with native bf16, else "no" (the
    results record the resolved value)."""
    from ..train.host import cpu_has_native_bf16

    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision = {cfg.mixed_precision!r}: use one of {MIXED_PRECISION}")
    if cfg.mixed_precision != "auto":
        return cfg
    return replace(cfg, mixed_precision="bf16" if cpu_has_native_bf16() else "no")


def run_experiment(out: str | os.PathLike, cfg: ExperimentConfig, comfyui: str | None = None,
                   force: bool = False) -> Path:
    """Run (or resume) the experiment in ``out``; returns the bench results JSON."""
    from .world import check_bench_ns, world_fits

    crowded = [n for n in (int(p) for p in cfg.people.split(",")) if not world_fits(n, cfg.size)]
    if crowded:
        raise ValueError(f"people={cfg.people!r}: {crowded} people do not fit a {cfg.size} px scene (faces would "
                         "be under 8 px); use fewer people or a larger size")
    check_bench_ns(cfg.ns, cfg.size, cfg.identities)   # before hours of training, not at the bench
    cfg = resolve_mixed_precision(cfg)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2))}
    comfy_args = ["--comfyui", comfyui] if comfyui else []
    clock = _Clock()
    if not force:   # before minutes of base training, not after
        check_existing_pack(out / "models" / "models" / "synthetic_world", cfg)
    untrained = cfg.base == "tiny"
    if untrained:
        base = _tiny_base(out, comfyui, py)
    elif cfg.base == "world":
        from .base import WORLD_CHECKPOINT

        base = str(out / "base" / "checkpoints" / WORLD_CHECKPOINT)
        if not force:
            check_existing_base(out / "base" / "world_base.json", cfg)
        clock.run("base", force or not Path(base).is_file(), lambda: _run(
            [py, "-m", "instantfamily_nodes.synthetic", "base", "--out", str(out / "base"), "--size", str(cfg.size),
             "--identities", str(cfg.identities), "--seed", str(cfg.seed), "--vae-steps", str(cfg.base_vae_steps),
             "--unet-steps", str(cfg.base_unet_steps), "--unet-scenes", str(cfg.base_unet_scenes),
             "--unet-channels", str(cfg.base_unet_channels),
             "--prediction", cfg.base_prediction, "--mixed-precision", cfg.mixed_precision,
             "--vae-face-weight", str(cfg.base_vae_face_weight)] + comfy_args, env))
    else:
        base = str(Path(cfg.base).resolve())
    models = out / "models"
    pack = models / "models" / "synthetic_world"
    clock.run("recognizer", force or not (pack / "world.safetensors").is_file(), lambda: _run(
        [py, "-m", "instantfamily_nodes.synthetic", "recognizer", "--out", str(models), "--identities",
         str(cfg.identities), "--seed", str(cfg.seed), "--steps", str(cfg.recognizer_steps), "--train-size",
         str(cfg.recognizer_train_size), "--test-size", str(min(2000, cfg.recognizer_train_size // 4)),
         "--map-side", str(cfg.recognizer_map_side)], env))
    clock.run("scenes", force or not (out / "scenes").is_dir(), lambda: _run(
        [py, "-m", "instantfamily_nodes.synthetic", "scenes", "--out", str(out / "scenes"), "--count",
         str(cfg.scenes), "--size", str(cfg.size), "--people", cfg.people, "--identities", str(cfg.identities),
         "--seed", str(cfg.seed)], env))
    shards = out / "shards"
    clock.run("prepare", force or not (shards / "manifest.json").is_file(), lambda: _run(
        [py, "-m", "instantfamily_nodes.train", "prepare", "--input", str(out / "scenes"), "--out", str(shards),
         "--resolution", str(cfg.size), "--min-size", str(min(cfg.size, 64)), "--face-encoder",
         "insightface/synthetic_world", "--models-root", str(models), "--image-format", "png",
         "--checkpoint", base, "--cache-latents", "--cache-text", "--workers", "1", "--no-progress"]
        + comfy_args + (["--overwrite"] if force else []), env))
    weights, controlnet = out / "world.safetensors", out / "world_openpose.safetensors"
    clock.run("fit_masked", force or not weights.is_file() or _trained_steps(out / "run") < cfg.steps, lambda: _fit_and_export(
        py, env, cfg, base, shards, out / "run", weights, controlnet, force))
    bench_extra: list[str] = []
    if cfg.unmasked_baseline:
        w_u, c_u = out / "world_unmasked.safetensors", out / "world_unmasked_openpose.safetensors"
        clock.run("fit_unmasked", force or not w_u.is_file() or _trained_steps(out / "run_unmasked") < cfg.steps,
                  lambda: _fit_and_export(
            py, env, cfg, base, shards, out / "run_unmasked", w_u, c_u, force, {"mask_ids": False}))
        bench_extra = ["--weights-unmasked", str(w_u), "--controlnet-unmasked", str(c_u)]
    bench_cache = out / "bench"
    dst = bench_cache / "bench_models" / "insightface" / "models" / "synthetic_world"
    if force or not dst.is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(pack, dst)
    results = out / ("synthetic-untrained-base.json" if untrained else "synthetic.json")
    cmd = [py, str(PACK_ROOT / "bench" / "synthetic.py"), "--checkpoint", base, "--weights", str(weights),
           "--controlnet", str(controlnet), "--ns", cfg.ns, "--scenes", str(cfg.bench_scenes), "--size",
           str(cfg.size), "--steps", str(cfg.sample_steps), "--cfg", str(cfg.sample_cfg), "--identities",
           str(cfg.identities), "--seed", str(cfg.seed), "--cache", str(bench_cache), "--out", str(results)]
    cmd += bench_extra + comfy_args
    # a resumed experiment adds its steps' seconds to the earlier run's (the bench is redone, not added)
    earlier = json.loads(results.read_text()).get("experiment", {}).get("seconds", {}) if results.is_file() else {}
    clock.run("bench", True, lambda: _run(cmd, env))
    seconds = {k: round(earlier.get(k, 0.0) * (k != "bench") + clock.seconds.get(k, 0.0), 1)
               for k in dict.fromkeys([*earlier, *clock.seconds])}
    data = json.loads(results.read_text())
    data["untrained_base"] = untrained
    base_json = out / "base" / "world_base.json"
    if cfg.base == "world" and base_json.is_file():
        meta = json.loads(base_json.read_text())
        data["base"] = {k: v for k, v in meta.items() if k != "unet_losses"}
        # a base built by its own command before the experiment still counts in the experiment's time
        seconds.setdefault("base", round(float(meta.get("seconds", 0.0)), 1))
    data["experiment"] = {**asdict(cfg), "base_checkpoint": base, "seconds": seconds,
                          "seconds_total": round(sum(seconds.values()), 1)}
    results.write_text(json.dumps(data, indent=2) + "\n")
    return results
