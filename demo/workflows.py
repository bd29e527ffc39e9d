"""Shipped workflows: where they live, how they are loaded, and how models and sizes are bound to them.

Layout (one name per workflow):

- ``workflows/<title>.json``: UI format (titles in ``workflow_files.WORKFLOWS``), what ComfyUI's template
  browser lists (ComfyUI serves a pack's ``workflows/`` folder like ``example_workflows/``; see
  ``app/custom_node_manager.py``) and what a user opens; ``workflows/<title>.jpg`` is its thumbnail. Both are
  written by ``workflow_files``, which imports this module (never the other way round).
- ``workflows/api/<name>.json``: the same graph in API format, what the headless runner, the demo and the
  tests execute. Kept in a sub-folder so the template browser does not list it twice.

Binding: model file names in a shipped workflow are the usual public names (e.g.
``v1-5-pruned-emaonly.safetensors``); :func:`bind` swaps in the files actually found, and for the tiny
model set also shrinks sizes and steps. Nodes are found by class type, so the workflows stay plain JSON.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from .headless import PACK_ROOT

WORKFLOW_DIR = PACK_ROOT / "workflows"
API_DIR = WORKFLOW_DIR / "api"

# class_type -> input holding a model file name, by kind
MODEL_INPUTS: dict[str, tuple[str, str]] = {
    "CheckpointLoaderSimple": ("checkpoint", "ckpt_name"),
    "ControlNetLoader": ("controlnet", "control_net_name"),
    "InstantFamilyControlNetLoader": ("controlnet", "control_net_name"),
    "InstantFamilyWeightsLoader": ("weights", "weights_name"),
    "InstantFamilyFaceEncoderLoader": ("face_pack", "model_name"),
}
# class_type -> (width input, height input) of nodes that fix the picture size
SIZE_INPUTS: dict[str, tuple[str, str]] = {
    "EmptyLatentImage": ("width", "height"),
    "InstantFamilyPoseControl": ("width", "height"),
    "InstantFamilyIDMasks": ("width", "height"),
    "InstantFamilyKps5Control": ("width", "height"),
    "InstantFamilyIDRegions": ("width", "height"),
}
SAMPLERS = ("KSampler", "KSamplerAdvanced")
MASK_LOADERS = ("LoadImageMask",)  # user-drawn masks, one file per person (ID order = node order)


@dataclass(frozen=True)
class ModelChoice:
    """File names as ComfyUI's loaders list them (None: leave the workflow's own name)."""
    checkpoint: str | None = None
    controlnet: str | None = None
    weights: str | None = None
    face_pack: str | None = None

    def get(self, kind: str) -> str | None:
        return getattr(self, kind)


def list_workflows() -> list[str]:
    """Names of the shipped workflows that can run headless (they have an API-format file)."""
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def workflow_path(name: str) -> Path:
    path = API_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown workflow {name!r}; shipped: {', '.join(list_workflows()) or 'none'}")
    return path


def load_workflow(name_or_path: str | Path) -> dict:
    """An API-format prompt: a shipped name, or a path to a workflow JSON file in API format or in UI
    format (converted with the live node definitions, so ComfyUI must be set up first)."""
    p = Path(name_or_path)
    path = p if p.suffix == ".json" and p.is_file() else workflow_path(str(name_or_path))
    prompt = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list) and "links" in prompt:
        from .ui_format import ui_to_api

        return ui_to_api(prompt)
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise ValueError(f"{path}: not an API-format workflow (expected {{node_id: {{class_type, inputs}}}}); "
                         "in ComfyUI use 'Export (API)' to save one")
    return prompt


def kinds_needed(prompt: dict) -> list[str]:
    """Which model kinds a workflow loads (checkpoint, controlnet, weights, face_pack)."""
    kinds = []
    for node in prompt.values():
        k = MODEL_INPUTS.get(node["class_type"])
        if k and k[0] not in kinds:
            kinds.append(k[0])
    return kinds


def _size_value(prompt: dict, value) -> tuple[int | None, dict | None]:
    """(value, node holding it): an int set on the node itself, or one linked from a PrimitiveInt node (the
    shipped workflows' single 'Picture width' / 'Picture height')."""
    if isinstance(value, int):
        return value, None
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        src = prompt[str(value[0])]
        if src["class_type"] == "PrimitiveInt" and isinstance(src["inputs"].get("value"), int):
            return src["inputs"]["value"], src
    return None, None


def scaled_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """(w, h) shrunk so the longer side is at most ``max_side``, both multiples of 8 and, when possible, the
    aspect ratio EXACTLY kept (768 x 512 -> 240 x 160 for 256, not 256 x 168): nodes that check that two
    sizes have one aspect (pose vs picture) must still agree after shrinking."""
    import math

    if w % 8 == 0 and h % 8 == 0:
        g = math.gcd(w // 8, h // 8)
        uw, uh = w // g, h // g           # smallest multiple-of-8 size with this aspect
        k = max_side // max(uw, uh)
        if k >= 1:
            return uw * k, uh * k
    s = max_side / max(w, h)
    return max(8, int(w * s) // 8 * 8), max(8, int(h * s) // 8 * 8)


def bind(prompt: dict, models: ModelChoice, max_side: int | None = None, steps: int | None = None) -> dict:
    """A copy of ``prompt`` with the chosen model files, the picture scaled so its longer side is at most
    ``max_side`` (multiples of 8, aspect kept exactly when possible: :func:`scaled_size`; a size linked from
    PrimitiveInt nodes is scaled there, once)
    and sampler steps set to ``steps``."""
    out = copy.deepcopy(prompt)
    scaled: set[int] = set()
    for node in out.values():
        ctype, inputs = node["class_type"], node["inputs"]
        if ctype in MODEL_INPUTS:
            kind, key = MODEL_INPUTS[ctype]
            if models.get(kind):
                inputs[key] = models.get(kind)
        if max_side and ctype in SIZE_INPUTS:
            wk, hk = SIZE_INPUTS[ctype]
            (w, w_src), (h, h_src) = _size_value(out, inputs.get(wk)), _size_value(out, inputs.get(hk))
            if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 and max(w, h) > max_side:
                nw, nh = scaled_size(w, h, max_side)
                for src, key, v in ((w_src, wk, nw), (h_src, hk, nh)):
                    if src is None:
                        inputs[key] = v
                    elif id(src) not in scaled:
                        src["inputs"]["value"] = v
                        scaled.add(id(src))
        if steps and ctype in SAMPLERS and isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
    return out


def save_image_nodes(prompt: dict) -> dict[str, str]:
    """SaveImage node id -> its filename_prefix (the demo tells image from pose/mask preview by it)."""
    return {nid: str(n["inputs"].get("filename_prefix", "")) for nid, n in prompt.items()
            if n["class_type"] == "SaveImage"}


def picture_size(prompt: dict) -> tuple[int, int] | None:
    """(height, width) of the picture a workflow makes: its first size-fixing node with both set."""
    for ctype in SIZE_INPUTS:  # EmptyLatentImage first
        for node in prompt.values():
            if node["class_type"] == ctype:
                wk, hk = SIZE_INPUTS[ctype]
                w, h = _size_value(prompt, node["inputs"].get(wk))[0], _size_value(prompt, node["inputs"].get(hk))[0]
                if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
                    return h, w
    return None


def example_masks(prompt: dict, canvas_hw: tuple[int, int] | None = None):
    """Masks as a user might draw them for a workflow's mask-loading nodes (``MASK_LOADERS``), in node order:
    float32 (N, H, W), or None when the workflow loads no masks. Mask n covers the head and shoulders of the
    n-th person from the left in the workflow's pose template (an ellipse around the head grown to take the
    hair, one over the shoulders); without a template, or with fewer people than masks, the canvas is cut
    into N vertical strips with one head-and-shoulders blob each. Used by the demo and the tests to fill
    the input folder, and for the workflow's thumbnail."""
    import numpy as np

    from ..pose import assign, faceboxes, templates
    from ..pose import masks as mask_core

    n = sum(node["class_type"] in MASK_LOADERS for node in prompt.values())
    if n == 0:
        return None
    hw = canvas_hw or picture_size(prompt) or (512, 512)
    h, w = int(hw[0]), int(hw[1])
    boxes = None
    tpl = next((node["inputs"].get("template") for node in prompt.values()
                if node["class_type"] == "InstantFamilyPoseTemplate"), None)
    if isinstance(tpl, str) and tpl in templates.list_templates():
        frame = templates.load_template(tpl)
        found = faceboxes.face_boxes_from_pose(frame.people, (h, w))
        if sum(b is not None for b in found) >= n:
            ids = assign.assign_ids(found, n)
            boxes = [found[i] for i in assign.people_for_ids(ids, n)]
    if boxes is None:  # strips: a face box in the upper part of each
        fw = min(w / n * 0.4, h * 0.25)
        boxes = [np.array([(k + 0.5) * w / n - fw / 2, 0.15 * h, (k + 0.5) * w / n + fw / 2, 0.15 * h + 1.25 * fw])
                 for k in range(n)]
    out = np.zeros((n, h, w), np.float32)
    for k, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        bw, bh = x1 - x0, y1 - y0
        head = mask_core.box_mask(mask_core.expand_box(box, 0.8), (h, w), "ellipse")
        cx, top = (x0 + x1) / 2, y1 + 0.2 * bh
        shoulders = mask_core.box_mask((cx - 1.5 * bw, top, cx + 1.5 * bw, top + 1.6 * bh), (h, w), "ellipse")
        out[k] = np.maximum(head, shoulders)
    return out
