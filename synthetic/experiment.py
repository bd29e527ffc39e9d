"""The synthetic-world experiment as one command, through the pack's own tools end to end:

1. the world's recognizer pack (trained once; ``<out>/models``);
2. world scenes (1-4 people) as a ``train prepare`` input folder, then ``train prepare`` with that pack;
3. ``train fit`` on a given SD1.5-shaped base checkpoint (ControlNet from the base, ID projection, base
   frozen, N = 4 slots in random order, masked attention in UNet and ControlNet), then ``train export``;
4. ``bench/synthetic.py`` on the exported files: identity accuracy by position, masked vs unmasked.

The base model must be one that can draw the world (a base trained on world scenes); none is built by
the pack yet. With ``--base tiny`` the demo's tiny *random* SD1.5-shaped set is used: every step runs,
the numbers are chance, and the results say ``untrained base``.

Each step is an ordinary subprocess (the same commands a user types); finished steps are skipped on a
rerun (``--force`` redoes them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def run_experiment(out: str | os.PathLike, base: str, scenes: int = 2000, size: int = 128, steps: int = 500,
                   batch_size: int = 4, lr: float = 1e-4, ns: str = "1,2,3,4,7", bench_scenes: int = 8,
                   sample_steps: int = 20, identities: int = 24, seed: int = 0, comfyui: str | None = None,
                   force: bool = False) -> Path:
    """Run (or resume) the experiment in ``out``; returns the bench results JSON."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    untrained = base == "tiny"
    if untrained:
        from ..demo.headless import find_comfyui

        cpath = str(find_comfyui(comfyui))
        code = ("import sys; sys.path.insert(0, %r); import comfy.cli_args; comfy.cli_args.args.cpu = True; "
                "from instantfamily_nodes.demo.tiny import build_tiny_models; m = build_tiny_models(%r); "
                "print(m.root / 'checkpoints' / m.checkpoint)") % (cpath, str(out / "tiny_models"))
        base = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    models = out / "models"
    pack = models / "models" / "synthetic_world"
    if force or not (pack / "world.safetensors").is_file():
        _run([py, "-m", "instantfamily_nodes.synthetic", "recognizer", "--out", str(models),
              "--identities", str(identities), "--seed", str(seed)], env)
    if force or not (out / "scenes").is_dir():
        _run([py, "-m", "instantfamily_nodes.synthetic", "scenes", "--out", str(out / "scenes"), "--count",
              str(scenes), "--size", str(size), "--people", "1,2,3,4", "--identities", str(identities),
              "--seed", str(seed)], env)
    shards = out / "shards"
    if force or not (shards / "manifest.json").is_file():
        _run([py, "-m", "instantfamily_nodes.train", "prepare", "--input", str(out / "scenes"), "--out", str(shards),
              "--resolution", str(size), "--min-size", str(min(size, 64)), "--face-encoder",
              "insightface/synthetic_world", "--models-root", str(models), "--image-format", "png",
              "--workers", "1", "--no-progress"] + (["--overwrite"] if force else []), env)
    run = out / "run"
    weights, controlnet = out / "world.safetensors", out / "world_openpose.safetensors"
    if force or not weights.is_file():
        if force:
            shutil.rmtree(run, ignore_errors=True)
        sets = {"data": shards, "out": run, "checkpoint": base, "resolution": size, "n_ids": 4,
                "batch_size": batch_size, "steps": steps, "lr_projection": lr, "lr_controlnet": lr,
                "num_workers": 0, "validate_every": 0, "checkpoint_every": max(1, steps), "seed": seed}
        cmd = [py, "-m", "instantfamily_nodes.train", "fit", "--no-progress", "--device", "cpu"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        if (run / "checkpoints").is_dir():
            cmd.append("--resume")
        _run(cmd, env)
        _run([py, "-m", "instantfamily_nodes.train", "export", "--checkpoint-dir", str(run / "checkpoints"),
              "--out-weights", str(weights), "--out-controlnet", str(controlnet)], env)
    bench_cache = out / "bench"
    dst = bench_cache / "bench_models" / "insightface" / "models" / "synthetic_world"
    if not dst.is_dir():
        shutil.copytree(pack, dst)
    results = out / ("synthetic-untrained-base.json" if untrained else "synthetic.json")
    cmd = [py, str(PACK_ROOT / "bench" / "synthetic.py"), "--checkpoint", base, "--weights", str(weights),
           "--controlnet", str(controlnet), "--ns", ns, "--scenes", str(bench_scenes), "--size", str(size),
           "--steps", str(sample_steps), "--identities", str(identities), "--seed", str(seed),
           "--cache", str(bench_cache), "--out", str(results)]
    if comfyui:
        cmd += ["--comfyui", comfyui]
    _run(cmd, env)
    data = json.loads(results.read_text())
    data["untrained_base"] = untrained
    data["experiment"] = {"base": base, "scenes": scenes, "size": size, "fit_steps": steps, "batch_size": batch_size,
                          "lr": lr}
    results.write_text(json.dumps(data, indent=2) + "\n")
    return results
