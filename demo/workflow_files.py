"""Writes the shipped UI workflows and thumbnails from the API sources (``workflows/api/<name>.json``).

``python -m instantfamily_nodes.demo.workflow_files`` regenerates ``workflows/<title>.json`` (UI format, what
ComfyUI's template browser lists) and ``workflows/<title>.jpg`` for every API file; a test fails when they
are stale. ComfyUI 0.3.64's frontend shows a pack's template by its file name (title and description) in
file-system order, so the file name is the title, it starts with the rank, and the pack's browser extension
sorts the list by it (main workflow first). Each workflow gets a Note saying which model files to pick.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import ui_format
from .workflows import API_DIR, WORKFLOW_DIR, example_masks

MODELS_NOTE = (
    "Pick your own files in the loader nodes (the names here are the usual public ones):\n"
    "- SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in models/checkpoints\n"
    "- OpenPose ControlNet for SD1.5 (e.g. control_v11p_sd15_openpose_fp16.safetensors) in models/controlnet\n"
    "- InstantFamily weights (instantfamily_sd15.safetensors) in models/instantfamily\n"
    "- face encoder: antelopev2 in models/insightface/models/antelopev2 (or backend dlib, offline)\n"
    "Picture size: the 'Picture width' / 'Picture height' nodes feed the latent, the pose and the masks, so "
    "they always agree.\n"
)
PHOTOS_NOTE = "Photos: one per person in the Load Image nodes; person 1 is ID 0, person 2 is ID 1, ...\n"

# API name -> (title = UI file name, what it is for). The leading number is the order in the browser.
WORKFLOWS: dict[str, tuple[str, str]] = {
    "4_people_pose_template": (
        "1. Four people on a pose template",
        "Four photos, the 4_family pose template; each ID goes to a person left to right (see the pose "
        "preview after a run; change person_ids on Pose Control to move people)."),
    "draw_regions": (
        "2. Two people, regions you draw",
        "Draw where each person goes on the 'ID regions' node: '+ ID' or drag on empty canvas adds a box for "
        "the next ID, drag to move, corners to resize, Delete removes, Ctrl+Z undoes. Run once to see the pose "
        "under the boxes."),
    "2_people_two_photos": (
        "3. Two people from two photos",
        "Two photos, the 2_standing_duo template: ID 0 on the left, ID 1 on the right."),
    "7_people_group": (
        "4. Seven people group picture",
        "Seven photos (more IDs than the four of training: identities hold less well); two Encode Faces "
        "nodes take photos 1-4 and 5-7 and Merge Faces joins them."),
    "custom_masks": (
        "5. Two people with your own mask files",
        "One mask file per person (white = where they go) in the Load Image (as Mask) nodes, in the "
        "picture's aspect ratio."),
    "pose_controlnet_plumbing": (
        "6. Pose ControlNet only, no identities",
        "Core nodes and the pose nodes only: a template -> control image -> core Apply ControlNet. No photos, "
        "no InstantFamily weights."),
    "2_people_prompts": (
        "7. Two people, one prompt line each",
        "Two photos and one prompt line per person on 'Person prompts' (line 1 = ID 0, line 2 = ID 1; lines "
        "after the IDs are people in the pose without a photo). Each line acts only inside that person's body "
        "region (Person regions), in the same pass as the identities: no extra pass per person."),
    "moa_subject_swap": (
        "8. Same scene, other people (MoA)",
        "Mixture-of-Attention subject swap: photos 1-2 (people A) and photos 3-4 (people B) with the same "
        "prompt, pose, masks and fixed seed. The MoA node (mask router) lets the identities act only inside "
        "their grown, feathered masks; everywhere else the base model runs untouched, so both pictures share "
        "the scene and only the people change. Router Map Preview shows where identity went."),
}


def title(name: str) -> str:
    """The UI file name (without .json) of a shipped workflow."""
    if name not in WORKFLOWS:
        raise ValueError(f"workflow {name!r} has no title in demo/workflow_files.py WORKFLOWS; add one")
    return WORKFLOWS[name][0]


def ui_path(name: str, out_dir: Path | None = None) -> Path:
    return (out_dir or WORKFLOW_DIR) / f"{title(name)}.json"


def note_for(name: str, prompt: dict) -> str:
    uses_photos = any(n["class_type"] == "LoadImage" for n in prompt.values())
    models = MODELS_NOTE
    if not any(n["class_type"].startswith("InstantFamily") and "Loader" in n["class_type"] for n in prompt.values()):
        models = "\n".join(line for line in MODELS_NOTE.splitlines()
                           if "instantfamily" not in line.lower() and "face encoder" not in line) + "\n"
    return f"{title(name)}\n\n{WORKFLOWS[name][1]}\n\n{models}" + (PHOTOS_NOTE if uses_photos else "")


def thumbnail_for(prompt: dict) -> Path | None:
    """The first pose template a workflow uses: its shipped preview makes the thumbnail."""
    from ..pose import templates

    for n in prompt.values():
        if n["class_type"] == "InstantFamilyPoseTemplate":
            return templates.preview_path(n["inputs"]["template"])
    return None


def thumbnail_image(prompt: dict):
    """The thumbnail as a PIL image: the pose template preview with the ID circles, plus the masks the
    workflow's user would draw (example mask files, or the drawn regions) in the ID colours."""
    import numpy as np
    from PIL import Image

    from ..pose import regions as region_core
    from ..pose.masks import mask_overlay

    thumb = thumbnail_for(prompt)
    if thumb is None:
        return None
    img = Image.open(thumb).convert("RGB")
    hw = (img.height, img.width)
    masks = example_masks(prompt, hw)
    for n in prompt.values():
        if n["class_type"] == "InstantFamilyIDRegions":
            masks = region_core.region_masks(region_core.parse_regions(n["inputs"]["regions"]), hw)
    if masks is not None:
        img = Image.fromarray(mask_overlay(masks, np.asarray(img), alpha=0.45))
    for n in prompt.values():
        if n["class_type"] == "InstantFamilyPersonPrompts":   # person regions with their prompts' first words
            from ..pose import persons, templates

            src = prompt[str(n["inputs"]["regions"][0])]["inputs"]           # the Person Regions node
            frame = templates.load_template(prompt[str(src["pose"][0])]["inputs"]["template"])
            regions = persons.person_regions(frame, hw, int(src["id_count"]), src["person_ids"], src["margin"],
                                             src["mask_shape"])
            img = Image.fromarray(persons.prompt_preview(regions, persons.prompt_lines(n["inputs"]["prompts"]),
                                                         np.asarray(img)))
    return img


def export_all(api_dir: Path | None = None, out_dir: Path | None = None) -> list[Path]:
    """workflows/api/<name>.json -> workflows/<title>.json (UI) + <title>.jpg thumbnail; returns the files."""
    api_dir, out_dir = api_dir or API_DIR, out_dir or WORKFLOW_DIR
    written = []
    for api in sorted(api_dir.glob("*.json")):
        prompt = json.loads(api.read_text(encoding="utf-8"))
        ui = ui_path(api.stem, out_dir)
        ui.write_text(json.dumps(ui_format.api_to_ui(prompt, note=note_for(api.stem, prompt)), indent=1) + "\n",
                      encoding="utf-8")
        written.append(ui)
        img = thumbnail_image(prompt)
        if img is not None:
            jpg = ui.with_suffix(".jpg")
            img.thumbnail((384, 384))
            img.save(jpg, quality=85)
            written.append(jpg)
    return written


def main(argv: list[str] | None = None) -> int:
    from . import headless

    headless.setup_comfyui(argv[0] if argv else None, cpu=True, quiet=True)
    for p in export_all():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
