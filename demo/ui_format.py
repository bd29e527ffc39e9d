"""UI-format (LiteGraph) workflow JSON <-> API-format prompt, using the live node definitions.

The UI format stores widget values as a positional list (``widgets_values``) in the order the frontend
creates widgets: the node's required inputs, then its optional ones, skipping link-type inputs; an INT with
``control_after_generate`` (seeds) is followed by the control value ("fixed"), and an ``image_upload`` combo
(Load Image) by the upload button's value ("image"). Links are ``[id, from_node, from_slot, to_node,
to_slot, type]``. Both directions need ComfyUI's node classes (after :func:`headless.setup_comfyui`).

``python -m instantfamily_nodes.demo.ui_format`` regenerates ``workflows/<name>.json`` (UI format, what the
template browser lists) and its ``.jpg`` thumbnail from each ``workflows/api/<name>.json``.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute"}
COLUMN_W, NODE_W = 360, 320


def _node_class(class_type: str):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        raise ValueError(f"node type {class_type!r} is not registered in this ComfyUI (is its custom node pack "
                         "installed?)")
    return cls


def _inputs(class_type: str) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, is_widget) in the frontend's order: required, then optional."""
    spec = _node_class(class_type).INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 and isinstance(value[1], dict) else {})
            if isinstance(kind, (list, tuple)):
                kind = "COMBO"
            kind = str(getattr(kind, "value", kind))
            out.append((name, kind, opts, kind in WIDGET_TYPES))
    return out


def _outputs(class_type: str) -> list[tuple[str, str]]:
    cls = _node_class(class_type)
    types = [str(getattr(t, "value", t)) if not isinstance(t, list) else "COMBO" for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def _extra_widget_values(opts: dict, name: str, kind: str) -> list[Any]:
    if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return ["fixed"]
    if opts.get("image_upload"):
        return ["image"]
    return []


def api_to_ui(prompt: dict) -> dict:
    """An API-format prompt as a UI workflow laid out in columns by graph depth; ``_meta.title`` -> title."""
    ids = {nid: int(nid) for nid in prompt}
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[nid] = 1 + max((d(str(u)) for u in ups), default=-1)
        return depth[nid]

    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = defaultdict(list)
    nodes_ui = []
    column_y: dict[int, float] = defaultdict(lambda: 40.0)
    for order, nid in enumerate(sorted(prompt, key=lambda n: (d(n), ids[n]))):
        node = prompt[nid]
        ctype, given = node["class_type"], node["inputs"]
        inputs_ui, widgets = [], []
        for name, kind, opts, is_widget in _inputs(ctype):
            value = given.get(name, opts.get("default"))
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                link_id = len(links) + 1
                src_type = _outputs(prompt[src]["class_type"])[slot][1]
                links.append([link_id, ids[src], slot, ids[nid], len(inputs_ui), src_type])
                out_links[(src, slot)].append(link_id)
                entry = {"name": name, "type": kind, "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                inputs_ui.append(entry)
                if is_widget:  # a widget turned into an input keeps a value slot
                    widgets.append(opts.get("default"))
                    widgets += _extra_widget_values(opts, name, kind)
                continue
            if not is_widget:
                inputs_ui.append({"name": name, "type": kind, "link": None})
                continue
            widgets.append(value)
            widgets += _extra_widget_values(opts, name, kind)
        col = d(nid)
        height = 60 + 26 * (len(widgets) + max(len(inputs_ui), len(_outputs(ctype))))
        entry = {"id": ids[nid], "type": ctype, "pos": [40 + col * COLUMN_W, column_y[col]],
                 "size": [NODE_W, height], "flags": {}, "order": order, "mode": 0, "inputs": inputs_ui,
                 "outputs": [], "properties": {"Node name for S&R": ctype}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            entry["title"] = node["_meta"]["title"]
        column_y[col] += height + 40
        nodes_ui.append(entry)
    for entry in nodes_ui:
        nid = str(entry["id"])
        entry["outputs"] = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                            for i, (n, t) in enumerate(_outputs(entry["type"]))]
    return {"last_node_id": max(ids.values(), default=0), "last_link_id": len(links), "nodes": nodes_ui,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow: dict) -> dict:
    """A UI workflow as an API prompt. Notes/reroutes are dropped (reroutes followed); muted nodes are
    dropped; bypassed nodes and primitive nodes are refused with a message saying what to do."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {lk[0]: lk for lk in workflow.get("links", [])}

    def source(link_id: int) -> list | None:
        lk = links.get(link_id)
        while lk is not None and by_id[lk[1]]["type"] == "Reroute":
            up = by_id[lk[1]]["inputs"][0].get("link")
            lk = links.get(up) if up is not None else None
        return None if lk is None else [str(lk[1]), lk[2]]

    prompt: dict[str, dict] = {}
    for n in sorted(workflow["nodes"], key=lambda n: n["id"]):
        ctype = n["type"]
        if ctype in UI_ONLY or n.get("mode", 0) == 2:  # 2 = muted
            continue
        if n.get("mode", 0) == 4:
            raise ValueError(f"node {n['id']} ({ctype}) is bypassed; un-bypass or delete it before converting")
        if ctype == "PrimitiveNode":
            raise ValueError(f"node {n['id']} is a Primitive node; convert its value back to a widget first")
        linked = {i["name"]: i.get("link") for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values") or [])
        if isinstance(n.get("widgets_values"), dict):
            raise ValueError(f"node {n['id']} ({ctype}): dict-style widgets_values are not supported")
        inputs: dict[str, Any] = {}
        for name, kind, opts, is_widget in _inputs(ctype):
            if is_widget:
                value = values.pop(0) if values else opts.get("default")
                for _ in _extra_widget_values(opts, name, kind):
                    if values:
                        values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                src = source(linked[name])
                if src is not None:
                    inputs[name] = src
        entry = {"class_type": ctype, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        prompt[str(n["id"])] = entry
    return prompt


def thumbnail_for(prompt: dict) -> Path | None:
    """The first pose template a workflow uses: its shipped preview makes the thumbnail (a workflow that
    loads user masks gets its example masks tinted over it, see :func:`thumbnail_image`)."""
    from ..pose import templates

    for n in prompt.values():
        if n["class_type"] == "InstantFamilyPoseTemplate":
            return templates.preview_path(n["inputs"]["template"])
    return None


def thumbnail_image(prompt: dict):
    """The thumbnail as a PIL image: the pose template preview with the ID circles, plus, for a workflow
    that loads masks drawn by the user, its example masks in the ID colours; None without a template."""
    import numpy as np
    from PIL import Image

    from ..pose.masks import mask_overlay
    from .workflows import example_masks

    thumb = thumbnail_for(prompt)
    if thumb is None:
        return None
    img = Image.open(thumb).convert("RGB")
    masks = example_masks(prompt, (img.height, img.width))
    if masks is not None:
        img = Image.fromarray(mask_overlay(masks, np.asarray(img), alpha=0.45))
    return img


def export_all(api_dir: Path | None = None, out_dir: Path | None = None) -> list[Path]:
    """workflows/api/<name>.json -> workflows/<name>.json (UI) + <name>.jpg thumbnail; returns the files."""
    from .workflows import API_DIR, WORKFLOW_DIR

    api_dir, out_dir = api_dir or API_DIR, out_dir or WORKFLOW_DIR
    written = []
    for api in sorted(api_dir.glob("*.json")):
        prompt = json.loads(api.read_text(encoding="utf-8"))
        ui = out_dir / api.name
        ui.write_text(json.dumps(api_to_ui(prompt), indent=1) + "\n", encoding="utf-8")
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
