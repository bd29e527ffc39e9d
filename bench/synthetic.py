"""Identity accuracy by position in the synthetic world, through the pack's nodes in ComfyUI's executor.

For each N (people per picture) and scene: N held-out reference portraits of world identities -> the
pack's *Encode Faces* (the world's insightface-shaped pack) -> *Project IDs* -> *Embedding Stack*; the
scene's pose (a keypoint JSON) -> *Pose Control + ID Masks*; *InstantFamily Apply* with the ControlNet;
KSampler; VAE decode. Each asked-for face box of the picture is cropped and classified by the world's
recognition net (synthetic/score.py) among the picture's N identities. Variants: masked (the pose's ID
masks) and unmasked stacking (the same model with all-ones masks: every identity attends everywhere);
optionally a second model trained unmasked (``--weights-unmasked``/``--controlnet-unmasked``).

    python bench/synthetic.py --checkpoint BASE --weights W --controlnet C [--ns 1,2,3,4,7,10] [--scenes 8]
    python bench/synthetic.py --plumbing     # tiny UNTRAINED models: proves the harness, scores ~chance
    python bench/synthetic.py --quick        # the same, N = 1, 2, 10, one scene, 2 steps (run_all --quick)

Writes ``bench/results/synthetic-<device>.json`` (``summary``: ``accuracy_masked``, ``accuracy_unmasked``,
``masked_minus_unmasked``, dicts keyed by N as strings) and a contact sheet PNG (refs | world render |
masked | unmasked). ``--plumbing`` writes ``synthetic-plumbing-<device>.json`` instead, flagged untrained.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, machine  # noqa: E402

from instantfamily_nodes.synthetic.workflow import PACK, roundtrip_prompt, world_prompt  # noqa: E402



def _link(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    shutil.copyfile(src, dst)
    return dst.name


def models_root(args: argparse.Namespace, cache: Path) -> tuple[Path, dict[str, str]]:
    """A ComfyUI models folder (own extra_model_paths.yaml) holding the world pack and the models."""
    from instantfamily_nodes.demo.tiny import build_tiny_models, write_extra_model_paths
    from instantfamily_nodes.synthetic.recognizer import DEFAULT_PACK, export_pack, train_recognizer
    from instantfamily_nodes.synthetic.world import World

    root = cache / "bench_models"
    pack = root / "insightface" / "models" / PACK
    if not (pack / "world.safetensors").is_file():
        world = World(args.identities, args.seed)
        print(f"training the world's recognizer once into {pack} ...", flush=True)
        export_pack(train_recognizer(world, threads=1), world, root / "insightface", DEFAULT_PACK)
    names: dict[str, str] = {}
    if args.plumbing:
        tiny = build_tiny_models(cache / "tiny_models")
        args.checkpoint = str(tiny.root / "checkpoints" / tiny.checkpoint)
        args.controlnet = str(tiny.root / "controlnet" / tiny.controlnet)
        args.weights = str(untrained_world_weights(root / "untrained_world.safetensors"))
    names["checkpoint"] = _link(Path(args.checkpoint), root / "checkpoints" / Path(args.checkpoint).name)
    names["controlnet"] = _link(Path(args.controlnet), root / "controlnet" / Path(args.controlnet).name)
    names["weights"] = _link(Path(args.weights), root / "instantfamily" / Path(args.weights).name)
    if args.weights_unmasked:
        names["weights_unmasked"] = _link(Path(args.weights_unmasked), root / "instantfamily" / ("unmasked_" + Path(args.weights_unmasked).name))
        names["controlnet_unmasked"] = _link(Path(args.controlnet_unmasked), root / "controlnet" / ("unmasked_" + Path(args.controlnet_unmasked).name))
    write_extra_model_paths(root, name="instantfamily_world_bench")
    return root, names


def untrained_world_weights(path: Path) -> Path:
    """Random pack weights for the world encoder (64-d global, 7x7x128 local): plumbing only."""
    import torch

    from instantfamily_nodes.models import IDProjection, WeightMeta, save_weights

    meta = WeightMeta(face_encoder=f"insightface/{PACK}", L=7, d_gf=64, d_lf=128, d_k=768, attention_mode="hard",
                      train_n_ids=4)
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, meta, IDProjection(meta.projection_config))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint"), ap.add_argument("--weights"), ap.add_argument("--controlnet")
    ap.add_argument("--weights-unmasked"), ap.add_argument("--controlnet-unmasked")
    ap.add_argument("--plumbing", action="store_true", help="tiny untrained models (scores ~chance)")
    ap.add_argument("--ns", default="1,2,3,4,7,10",
                    help="people per scene; those the square --size cannot hold get a wider canvas (canvas_for)")
    ap.add_argument("--scenes", type=int, default=8, help="scenes per N")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--cfg", type=float, default=5.0,
                    help="guidance scale (the negative has null IDs: it scales identity too)")
    ap.add_argument("--identities", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path("~/.cache/instantfamily_nodes/world").expanduser()))
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/synthetic[-plumbing]-cpu.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --plumbing with N = 1, 2, 10, one scene, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.plumbing, args.ns, args.scenes, args.steps = True, "1,2,10", 1, 2
    if args.scenes < 1:
        ap.error(f"--scenes {args.scenes}: give at least 1 scene per N")
    from instantfamily_nodes.synthetic.world import check_bench_ns

    try:
        ns = check_bench_ns(args.ns, args.size, args.identities)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.plumbing and not (args.checkpoint and args.weights and args.controlnet):
        # bench/run_all.py runs every script without arguments: say why nothing is measured, not fail
        print("bench/synthetic.py: no model trained on the synthetic world was given (--checkpoint, --weights, "
              "--controlnet), so there is nothing to measure; --plumbing runs the harness on untrained tiny "
              "models. See README, 'Synthetic world'.")
        return 0
    if bool(args.weights_unmasked) != bool(args.controlnet_unmasked):
        ap.error("--weights-unmasked and --controlnet-unmasked go together")
    cache = Path(args.cache)
    from PIL import Image

    from instantfamily_nodes.demo.headless import run_prompt, setup_comfyui

    work = cache / "bench_run"
    shutil.rmtree(work, ignore_errors=True)
    setup_comfyui(args.comfyui, [], cpu=True, output_dir=work / "output", input_dir=work / "input", quiet=True)
    root, names = models_root(args, cache)
    from instantfamily_nodes.evaluate.score import aggregate
    from instantfamily_nodes.models.faces import InsightFaceEncoder
    from instantfamily_nodes.synthetic.recognizer import load_classes
    from instantfamily_nodes.synthetic.score import (PositionScores, picture_scores, reference_embeddings,
                                                     score_positions)
    from instantfamily_nodes.synthetic.world import World, canvas_for

    setup_comfyui(args.comfyui, [root / "extra_model_paths.yaml"])     # now the models folder too
    from instantfamily_nodes.demo.tiny import is_tiny_checkpoint, register_tiny_model_type

    if is_tiny_checkpoint(root / "checkpoints" / names["checkpoint"]):
        register_tiny_model_type()
    pack = root / "insightface" / "models" / PACK
    classes, pack_meta = load_classes(pack)
    enc = InsightFaceEncoder(pack, provider="CPU", cache_dir=cache / "onnx_cache")
    world = World(args.identities, args.seed)
    variants = ["masked", "unmasked"] + (["trained_unmasked"] if args.weights_unmasked else [])
    scores = {v: {} for v in variants + ["vae_roundtrip"]}
    pictures = {v: {} for v in scores}     # evaluate/'s ImageScore per picture (MultiSim, greedy-min)
    sheet_rows = []
    for n in ns:
        for v in scores:
            scores[v][n] = PositionScores()
            pictures[v][n] = []
        for k in range(args.scenes):
            scene = world.scene(n, canvas_for(n, args.size), "test", 10_000 * n + k)
            refs = []
            portraits = [world.portrait(i, (128, 128), "reference", k).image for i in scene.identities]
            ref_emb = reference_embeddings(enc, portraits)
            for ident, portrait in zip(scene.identities, portraits):
                name = f"ref_{n}_{k}_{ident}.png"
                Image.fromarray(portrait).save(work / "input" / name)
                refs.append(name)
            pose_file = work / "input" / f"pose_{n}_{k}.json"
            pose_file.write_text(json.dumps(scene.pose_keypoint()))
            Image.fromarray(scene.image).save(work / "input" / f"scene_{n}_{k}.png")
            # a fresh executor: on the kept one this other graph would evict the world graph's loaders
            # (ComfyUI's cache keeps only the nodes of the prompt it last ran; trained_unmasked, with its
            # own files, still reloads them once per scene)
            res = run_prompt(roundtrip_prompt(f"scene_{n}_{k}.png", names))
            img = np.asarray(Image.open(res.image_files("20")[-1]).convert("RGB"))
            score_positions(enc, classes, [img], [scene.boxes], [scene.identities], scores["vae_roundtrip"][n])
            pictures["vae_roundtrip"][n].append(picture_scores(enc, ref_emb, img, scene.boxes))
            row = [np.concatenate(portraits, 1), scene.image]
            for v in variants:
                prompt = world_prompt(refs, str(pose_file), scene.hw, scene.caption, names, unmasked=(v in ("unmasked", "trained_unmasked")),
                                      second_model=(v == "trained_unmasked"), steps=args.steps, seed=args.seed + k,
                                      cfg=args.cfg)
                res = run_prompt(prompt, keep_cache=True)
                img = np.asarray(Image.open(res.image_files("20")[-1]).convert("RGB"))
                score_positions(enc, classes, [img], [scene.boxes], [scene.identities], scores[v][n])
                pictures[v][n].append(picture_scores(enc, ref_emb, img, scene.boxes))
                row.append(img)
            if k == 0:
                sheet_rows.append(row)
            print(f"N={n} scene {k + 1}/{args.scenes}: " + ", ".join(
                f"{v} {scores[v][n].accuracy('n'):.2f}" for v in scores), flush=True)
    acc = {v: {str(n): scores[v][n].accuracy("n") for n in ns} for v in variants}
    summary = {"accuracy_masked": acc["masked"], "accuracy_unmasked": acc["unmasked"],
               "masked_minus_unmasked": {k: acc["masked"][k] - acc["unmasked"][k] for k in acc["masked"]},
               "accuracy_masked_among_all": {str(n): scores["masked"][n].accuracy("k") for n in ns},
               "chance": {str(n): 1.0 / n for n in ns}}
    if "trained_unmasked" in acc:
        summary["accuracy_trained_unmasked"] = acc["trained_unmasked"]
    # the world's own render through the VAE: what any model sampling in this latent space can reach
    summary["accuracy_vae_roundtrip"] = {str(n): scores["vae_roundtrip"][n].accuracy("n") for n in ns}
    # evaluate/'s run-level numbers, as `python -m instantfamily_nodes.evaluate` reports them, per variant and N
    blocks = {v: {n: aggregate(pictures[v][n], [str(i) for i in range(n)])["overall"] for n in ns} for v in pictures}
    for key in ("multi_sim", "fastcomposer", "single_sim"):
        summary[key] = {v: {str(n): blocks[v][n][key]["mean"] for n in ns} for v in pictures}
    summary["face_missing_rate"] = {v: {str(n): blocks[v][n]["face_missing_rate"] for n in ns} for v in pictures}
    out = Path(args.out) if args.out else RESULTS_DIR / f"synthetic{'-plumbing' if args.plumbing else ''}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"summary": summary, "untrained": bool(args.plumbing), "models": names, "recognizer": pack_meta,
            "scenes_per_n": args.scenes, "size": args.size,
            "canvas": {str(n): list(canvas_for(n, args.size)) for n in ns}, "steps": args.steps, "cfg": args.cfg,
            "machine": machine("cpu"),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "per_position": {v: {str(n): {"asked": scores[v][n].asked, "found": scores[v][n].found_among_n}
                                 for n in ns} for v in scores}}
    out.write_text(json.dumps(data, indent=2) + "\n")
    sheet = _contact_sheet(sheet_rows)
    Image.fromarray(sheet).save(out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _contact_sheet(rows: list[list[np.ndarray]]) -> np.ndarray:
    """One row per N: references | world render | each variant's picture (padded to one height)."""
    h = max(max(im.shape[0] for im in row) for row in rows)
    lines = []
    for row in rows:
        cells = [np.pad(im, ((0, h - im.shape[0]), (0, 4), (0, 0)), constant_values=255) for im in row]
        lines.append(np.concatenate(cells, 1))
    w = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, 4), (0, w - line.shape[1]), (0, 0)), constant_values=255)
                           for line in lines], 0)


if __name__ == "__main__":
    sys.exit(main())
