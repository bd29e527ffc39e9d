"""The demo's picture from the model trained on the synthetic world (issue 11, ``synthetic/``).

Without a user's SD1.5 models the demo can only show untrained noise, unless the world model exists: the
world's base (VAE + UNet, the stand-in for SD1.5), the InstantFamily weights and ControlNet trained on it
by the pack's trainer, and the world's face pack. One command trains all of it once into the cache
(:func:`default_dir`), see :data:`TRAIN_COMMAND`. Then the demo runs the world workflow
(:func:`..synthetic.workflow.world_prompt`) through ComfyUI's executor on a held-out scene of four world
people, and writes the picture, the pose/ID-mask preview, their overlay, a sheet (references | the
world's own render of the scene | the generated picture | overlay, enlarged) and which identity the
world's recogniser finds at each place.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORLD_PEOPLE = 4
SHEET_SCALE = 3          # the world is 128 px: the sheet is enlarged (nearest) so faces can be seen


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "instantfamily_nodes" / "world"


# --no-unmasked: the demo needs the masked model only; the model trained unmasked is the results table's
# baseline (the same command without it adds that fit, ~40 min, and keeps everything already trained)
TRAIN_COMMAND = f"python -m instantfamily_nodes.synthetic experiment --out {default_dir()} --no-unmasked"
# measured: 121.7 min on a 2-core Intel Xeon VM with bf16 (README, Synthetic world)
TRAIN_TIME = "about 2 hours on 2 CPU cores"


@dataclass(frozen=True)
class WorldFiles:
    """The files of a finished world experiment folder (``synthetic experiment --out DIR``)."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        from ..synthetic.base import WORLD_CHECKPOINT

        return self.root / "base" / "checkpoints" / WORLD_CHECKPOINT

    @property
    def weights(self) -> Path:
        return self.root / "world.safetensors"

    @property
    def controlnet(self) -> Path:
        return self.root / "world_openpose.safetensors"

    @property
    def face_pack(self) -> Path:
        from ..synthetic.workflow import PACK

        return self.root / "models" / "models" / PACK      # the experiment's recognizer --out models

    def missing(self) -> list[str]:
        return [str(p) for p in (self.checkpoint, self.weights, self.controlnet, self.face_pack / "world.safetensors")
                if not p.is_file()]


def models_root(files: WorldFiles) -> tuple[Path, dict[str, str]]:
    """A ComfyUI models folder (with its extra_model_paths.yaml) of links to the world files; loader names."""
    from ..synthetic.workflow import PACK
    from .tiny import write_extra_model_paths

    root = files.root / "comfy_models"
    names = {}
    for key, folder, src in (("checkpoint", "checkpoints", files.checkpoint), ("controlnet", "controlnet", files.controlnet),
                             ("weights", "instantfamily", files.weights)):
        dst = root / folder / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            shutil.copyfile(src, dst)
        names[key] = src.name
    pack = root / "insightface" / "models" / PACK
    if not pack.is_dir() or (pack / "world.safetensors").stat().st_mtime < (files.face_pack / "world.safetensors").stat().st_mtime:
        shutil.rmtree(pack, ignore_errors=True)
        shutil.copytree(files.face_pack, pack)
    write_extra_model_paths(root, name="instantfamily_world")
    return root, names


def run_world_demo(files: WorldFiles, out_dir: Path, input_dir: Path, seed: int = 0, steps: int = 20) -> list[Path]:
    """Run the world workflow on held-out scene ``seed`` (ComfyUI already set up); returns files written."""
    from PIL import Image

    from ..models.faces import InsightFaceEncoder
    from ..synthetic.recognizer import load_classes
    from ..synthetic.score import score_positions
    from ..synthetic.workflow import world_prompt
    from ..synthetic.world import World
    from . import headless
    from .tiny import register_tiny_model_type

    root, names = models_root(files)
    register_tiny_model_type()          # the world base is the tiny SD1.5 layout with 16 latent channels
    headless.setup_comfyui(extra_model_paths=[root / "extra_model_paths.yaml"])
    meta = json.loads((files.root / "synthetic.json").read_text()) if (files.root / "synthetic.json").is_file() else {}
    exp = meta.get("experiment", {})
    world = World(int(exp.get("identities", 24)), int(exp.get("seed", 0)))
    size = int(exp.get("size", 128))
    scene = world.scene(WORLD_PEOPLE, (size, size), "test", 900_000 + seed)
    refs = []
    for k, ident in enumerate(scene.identities):
        name = f"world_person_{k + 1}.png"
        Image.fromarray(world.portrait(ident, (128, 128), "reference", seed).image).save(input_dir / name)
        refs.append(name)
    pose = input_dir / "world_pose.json"
    pose.write_text(json.dumps(scene.pose_keypoint()))
    prompt = world_prompt(refs, str(pose), scene.hw, scene.caption, names, steps=steps, seed=seed)
    result = headless.run_prompt(prompt)
    image_file, preview_file = result.image_files("20")[-1], result.image_files("21")[-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src, dst in ((image_file, "world.png"), (preview_file, "world_pose_masks.png")):
        shutil.copyfile(src, out_dir / dst)
        written.append(out_dir / dst)
    picture = np.asarray(Image.open(image_file).convert("RGB"))
    preview = np.asarray(Image.open(preview_file).convert("RGB").resize(picture.shape[1::-1], Image.BILINEAR))
    over = (0.55 * picture + 0.45 * preview).round().astype(np.uint8)
    Image.fromarray(over).save(out_dir / "world_overlay.png")
    written.append(out_dir / "world_overlay.png")
    (out_dir / "world_workflow_api.json").write_text(json.dumps(prompt, indent=1))
    written.append(out_dir / "world_workflow_api.json")

    classes, _ = load_classes(files.face_pack)
    enc = InsightFaceEncoder(files.face_pack, provider="CPU", cache_dir=files.root / "onnx_cache")
    scores = score_positions(enc, classes, [picture], [scene.boxes], [scene.identities])
    refs_row = np.concatenate([world.portrait(i, (size, size), "reference", seed).image for i in scene.identities], 1)
    sheet = np.concatenate([refs_row, np.concatenate([scene.image, picture, over, np.full_like(picture, 255)], 1)], 0)
    sheet = sheet.repeat(SHEET_SCALE, 0).repeat(SHEET_SCALE, 1)
    Image.fromarray(sheet).save(out_dir / "world_sheet.png")
    written.append(out_dir / "world_sheet.png")
    lines = []
    for k, (asked, found) in enumerate(zip(scores.asked[0], scores.found_among_n[0])):
        ok = "right person" if asked == found else f"WRONG: looks like person {scene.identities.index(found) + 1}"
        lines.append(f"  place {k + 1} (left to right): person {k + 1} asked, {ok}")
    print("Synthetic world, not SD1.5: four world people placed by the trained world model "
          f"({sum(a == f for a, f in zip(scores.asked[0], scores.found_among_n[0]))}/{WORLD_PEOPLE} in their place, "
          "judged by the world's recogniser):\n" + "\n".join(lines))
    return written
