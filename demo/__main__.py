"""``python -m instantfamily_nodes.demo``: run a shipped workflow headless through ComfyUI's real executor.

With the user's models present (an SD1.5 checkpoint, an OpenPose ControlNet, and, for workflows that use
them, InstantFamily weights and antelopev2, all found through ComfyUI's folder_paths) it uses them. With any
missing, and the model trained on the synthetic world cached (``demo/world.py``), it shows that model
placing four world people. Otherwise it builds the tiny SD1.5-shaped set (``demo/tiny.py``) in a cache
folder and says plainly that the picture comes from untrained tiny models. Writes the image, the pack's
pose/mask preview and an overlay of the two into ``--out``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import headless, workflows
from . import world as world_demo

DEFAULT_WORKFLOWS = ("4_people_pose_template", "pose_controlnet_plumbing")  # first one shipped is the default
TINY_MAX_SIDE = 384
TINY_STEPS = 2
UNTRAINED = ("NOTE: this picture comes from UNTRAINED TINY models built on the spot (random weights, "
             "SD1.5-shaped but about 1% of its size). It shows the graph runs end to end, not what InstantFamily looks like. "
             "Put an SD1.5 checkpoint, an OpenPose ControlNet, InstantFamily weights and antelopev2 in ComfyUI's "
             "models folders for a real picture.")
SD15_NAME = re.compile(r"(sd[-_ .]?1[-_ .]?5|v1[-_ .]?5|sd15|1\.5)", re.I)
OPENPOSE_NAME = re.compile(r"openpose", re.I)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "instantfamily_nodes" / "tiny_models"


def _pick(names: list[str], wanted: str | None, pattern: re.Pattern | None, exclude: set[str]) -> str | None:
    names = [n for n in names if os.path.basename(n) not in exclude]
    if wanted in names:
        return wanted
    if pattern is not None:
        hits = [n for n in names if pattern.search(n)]
        return hits[0] if hits else None
    return names[0] if names else None


def find_real_models(prompt: dict) -> tuple[workflows.ModelChoice, list[str]]:
    """The user's own files for what ``prompt`` loads, and a list of what is missing (as sentences)."""
    import folder_paths

    from . import tiny

    wanted = {}
    for node in prompt.values():
        k = workflows.MODEL_INPUTS.get(node["class_type"])
        if k:
            wanted[k[0]] = node["inputs"].get(k[1])
    exclude = {tiny.TINY_CHECKPOINT, tiny.TINY_CONTROLNET, tiny.TINY_WEIGHTS}
    found: dict[str, str | None] = {}
    missing: list[str] = []

    def names(key: str) -> list[str]:
        try:
            return list(folder_paths.get_filename_list(key))
        except Exception:  # folder kind unknown to this ComfyUI
            return []

    if "checkpoint" in wanted:
        found["checkpoint"] = _pick(names("checkpoints"), wanted["checkpoint"], SD15_NAME, exclude)
        if not found["checkpoint"]:
            missing.append("an SD1.5 checkpoint in models/checkpoints (a name with 'sd15' / 'v1-5' in it)")
    if "controlnet" in wanted:
        found["controlnet"] = _pick(names("controlnet"), wanted["controlnet"], OPENPOSE_NAME, exclude)
        if not found["controlnet"]:
            missing.append("an SD1.5 OpenPose ControlNet in models/controlnet (a name with 'openpose' in it)")
    if "weights" in wanted:
        from ..nodes.instantfamily import _weight_files   # the Weights Loader's own list: one rule

        found["weights"] = _pick(_weight_files(), wanted["weights"], None, exclude)
        if not found["weights"]:
            missing.append("InstantFamily weights (*.safetensors) in models/instantfamily")
    if "face_pack" in wanted:
        from ..models.faces.insightface_backend import find_model_dir
        from ..nodes.faces import insightface_roots

        try:
            find_model_dir(wanted["face_pack"] or "antelopev2", insightface_roots())
            found["face_pack"] = wanted["face_pack"]
        except Exception:
            missing.append("antelopev2 in models/insightface/models/antelopev2")
    return workflows.ModelChoice(**{k: v for k, v in found.items() if v}), missing


def _copy_given(node: dict, i: int, given: list[str], flag: str, search: list[Path],
                input_dir: Path) -> Path | None:
    """Copy the i-th file of ``flag`` (else a same-name file from ``search``) to the node's input name.

    Returns the destination when nothing was found there and the caller must supply the file; None
    when a file was copied, or the node's input is not a file name."""
    name = node["inputs"].get("image")
    if not isinstance(name, str):
        return None
    dst = input_dir / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    found = [Path(given[i])] if i < len(given) else [d / name for d in search if (d / name).is_file()]
    if not found:
        return dst
    if not found[0].is_file():
        raise FileNotFoundError(f"{flag}: {found[0]} does not exist")
    shutil.copyfile(found[0], dst)
    return None


def _prepare_inputs(prompt: dict, input_dir: Path, photos: list[str], search: list[Path], synthetic_ok: bool,
                    masks: list[str] = ()) -> list[str]:
    """Fill the run's input folder for the workflow's LoadImage nodes, in node order: ``--photos`` first,
    then same-name files from ComfyUI's own input folder, then (tiny runs only) synthetic face images:
    bright squares the synthetic detector reports as faces. Returns what is still missing.

    Mask files (LoadImageMask nodes, one per person) likewise: ``--masks``, then same-name files, then, in
    any run, example masks (:func:`workflows.example_masks`: white head-and-shoulders shapes on black at the
    picture's size, over the people of the workflow's pose template); a mask is a layout, not a person."""
    import numpy as np
    from PIL import Image

    from ..models.faces import synthetic

    missing = []
    loads = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    for i, node in enumerate(loads):
        dst = _copy_given(node, i, photos, "--photos", search, input_dir)
        if dst is None:
            continue
        if synthetic_ok:
            img = synthetic.square_faces_image([(160, 200)], size=96, hw=(400, 320))
            Image.fromarray(np.asarray(img)).save(dst)
        else:
            missing.append(f"{node.get('_meta', {}).get('title', 'LoadImage')} ({node['inputs']['image']})")
    mask_loads = [n for n in prompt.values() if n["class_type"] in workflows.MASK_LOADERS]
    examples = None
    for i, node in enumerate(mask_loads):
        dst = _copy_given(node, i, masks, "--masks", search, input_dir)
        if dst is None:
            continue
        if examples is None:
            examples = workflows.example_masks(prompt)
            print(f"No mask files given: using example masks (head and shoulders of each person in the pose "
                  f"template, {examples.shape[2]}x{examples.shape[1]}); pass your own with --masks.")
        Image.fromarray((examples[i] * 255).round().astype(np.uint8)).save(dst)
    return missing


def overlay(image: Path, preview: Path, out: Path, alpha: float = 0.45) -> Path:
    """The generated image with the pose/mask preview blended over it (preview resized to the image)."""
    from PIL import Image

    a = Image.open(image).convert("RGB")
    b = Image.open(preview).convert("RGB").resize(a.size, Image.BILINEAR)
    Image.blend(a, b, alpha).save(out)
    return out


def _progress(prompt: dict):
    order: list[str] = []

    def on_message(event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            nid = str(data["node"])
            if nid not in order:
                order.append(nid)
                node = prompt.get(nid, {})
                title = node.get("_meta", {}).get("title") or node.get("class_type", nid)
                print(f"  [{len(order)}/{len(prompt)}] {title} ({node.get('class_type', '?')})", flush=True)

    return on_message


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instantfamily_nodes.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=None,
                    help=f"shipped workflow name or an API-format JSON path (shipped: {', '.join(workflows.list_workflows())})")
    ap.add_argument("--out", default="instantfamily_demo", help="folder for the image, preview and overlay")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, ../.., /opt/ComfyUI)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny untrained models even if real ones exist")
    ap.add_argument("--world", nargs="?", const=str(world_demo.default_dir()), default=None, metavar="DIR",
                    help="the model trained on the synthetic world (default folder: "
                         f"{world_demo.default_dir()}; used anyway when no SD1.5 models are found and it exists)")
    ap.add_argument("--seed", type=int, default=0, help="world demo: which held-out scene")
    ap.add_argument("--cache", default=None, help=f"where the tiny models are built (default {cache_dir()})")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the workflow's; tiny: 2)")
    ap.add_argument("--cpu", action="store_true", help="force CPU")
    ap.add_argument("--photos", nargs="+", default=[], metavar="IMAGE",
                    help="photos for the workflow's Load Image nodes, in order (person 1 = ID 0, ...)")
    ap.add_argument("--masks", nargs="+", default=[], metavar="IMAGE",
                    help="mask files for the workflow's Load Image (as Mask) nodes, in order (white = that person's "
                         "region; default: files of the same name in ComfyUI's input folder, else example masks)")
    ap.add_argument("--verbose", action="store_true", help="show ComfyUI's start-up warnings")
    ap.add_argument("--list", action="store_true", help="list the shipped workflows and exit")
    a = ap.parse_args(argv)

    if a.list:
        print("\n".join(workflows.list_workflows()))
        return 0
    if a.world:
        absent = world_demo.WorldFiles(Path(a.world)).missing()
        if absent:   # before ComfyUI is loaded: nothing to run
            print(f"--world: {a.world} has no finished world model (missing {absent[0]}); train it once "
                  f"({world_demo.TRAIN_TIME}) with:\n"
                  f"  python -m instantfamily_nodes.synthetic experiment --out {a.world} --no-unmasked", file=sys.stderr)
            return 2
    name = a.workflow or next((w for w in DEFAULT_WORKFLOWS if w in workflows.list_workflows()),
                              (workflows.list_workflows() or [None])[0])
    if name is None:
        print("no shipped workflows found in", workflows.API_DIR, file=sys.stderr)
        return 2
    try:
        prompt = workflows.load_workflow(name)
    except ValueError as e:
        print(f"--workflow: {e}", file=sys.stderr)
        return 2
    label = Path(name).stem
    out_dir = Path(a.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        comfy_path = headless.find_comfyui(a.comfyui)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"ComfyUI: {comfy_path}")
    work = Path(tempfile.mkdtemp(prefix="instantfamily_demo_"))
    (work / "output").mkdir()
    (work / "input").mkdir()
    previous_dirs = None
    try:
        print("Loading ComfyUI and the pack ...", flush=True)
        headless.setup_comfyui(comfy_path, cpu=True if a.cpu else None, quiet=not a.verbose)
        import folder_paths

        previous_dirs = (folder_paths.get_output_directory(), folder_paths.get_input_directory())
        headless.setup_comfyui(comfy_path, cpu=True if a.cpu else None, output_dir=work / "output",
                               input_dir=work / "input", quiet=not a.verbose)
        choice, missing = (workflows.ModelChoice(), ["--tiny given"]) if a.tiny else find_real_models(prompt)
        if a.world or (missing and not a.tiny and not a.workflow):
            files = world_demo.WorldFiles(Path(a.world or world_demo.default_dir()))
            absent = files.missing()
            if not absent:
                if missing:
                    print("Real models not found: " + "; ".join(missing) + ".")
                print(f"Using the model trained on the synthetic world in {files.root} ...", flush=True)
                written = world_demo.run_world_demo(files, out_dir, work / "input", seed=a.seed,
                                                    steps=a.steps or 20)
                print(f"Done in {time.perf_counter() - t0:.1f} s. Wrote:\n" + "\n".join(f"  {p}" for p in written))
                return 0
            print("No model trained on the synthetic world either; for a picture from a trained model train it "
                  f"once ({world_demo.TRAIN_TIME}):\n  {world_demo.TRAIN_COMMAND}")
        use_tiny = bool(missing)
        if use_tiny:
            from . import tiny

            if not a.tiny:
                print("Real models not found: " + "; ".join(missing) + ".")
            root = Path(a.cache) if a.cache else cache_dir()
            print(f"Building/using the tiny model set in {root} ...", flush=True)
            tiny.register_tiny_model_type()
            models = tiny.build_tiny_models(root)
            headless.setup_comfyui(extra_model_paths=[models.extra_model_paths])
            choice = workflows.ModelChoice(checkpoint=models.checkpoint, controlnet=models.controlnet,
                                           weights=models.weights, face_pack=models.face_pack)
            print(UNTRAINED)
            prompt = workflows.bind(prompt, choice, max_side=TINY_MAX_SIDE, steps=a.steps or TINY_STEPS)
        else:
            print("Using your models: " + ", ".join(f"{k}={v}" for k, v in vars(choice).items() if v))
            prompt = workflows.bind(prompt, choice, steps=a.steps)
        still = _prepare_inputs(prompt, work / "input", a.photos, [Path(previous_dirs[1])], synthetic_ok=use_tiny,
                                masks=a.masks)
        if still:
            print("Photos needed: " + "; ".join(still) + ". Pass them with --photos (one per person, in "
                  "order) or put files with these names in ComfyUI's input folder.", file=sys.stderr)
            return 2
        print(f"Running workflow {label!r} ({len(prompt)} nodes) ...", flush=True)
        result = headless.run_prompt(prompt, on_message=_progress(prompt))
        saved = workflows.save_image_nodes(prompt)
        written: list[Path] = []
        image = preview = None
        for nid, prefix in saved.items():
            files = result.image_files(nid)
            if not files:
                continue
            # the prefix's last part names the file: ".../image" -> <workflow>.png, ".../pose_masks" -> ..._pose_masks.png
            role = re.sub(r"[^A-Za-z0-9_-]+", "_", prefix.replace("\\", "/").rsplit("/", 1)[-1]) or f"node{nid}"
            for i, f in enumerate(files):
                dst = out_dir / (f"{label}_{role}" if role != "image" else label)
                dst = dst.with_name(dst.name + (f"_{i}" if len(files) > 1 else "") + f.suffix)
                shutil.copyfile(f, dst)
                written.append(dst)
                if role == "image" and image is None:
                    image = dst
                if role == "pose_masks" and preview is None:
                    preview = dst
        if image is not None and preview is not None:
            written.append(overlay(image, preview, out_dir / f"{label}_overlay.png"))
        print(f"Done in {time.perf_counter() - t0:.1f} s (workflow {result.seconds:.1f} s). Wrote:")
        for p in written:
            print(f"  {p}")
        if use_tiny:
            print(UNTRAINED)
        return 0
    except headless.WorkflowError as e:
        print(f"Workflow {label!r} failed:\n{e}", file=sys.stderr)
        return 1
    finally:
        if previous_dirs is not None:  # leave ComfyUI's folders as found (the demo can run inside a process)
            import folder_paths

            folder_paths.set_output_directory(previous_dirs[0])
            folder_paths.set_input_directory(previous_dirs[1])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
