"""UI-format (LiteGraph) workflow JSON <-> API-format prompt, using the live node definitions.

The UI format stores widget values as a positional list (``widgets_values``) in the order the frontend
creates widgets: the node's required inputs, then its optional ones, skipping link-type inputs; an INT with
``control_after_generate`` (seeds, PrimitiveInt) is followed by its control value ("fixed"), and a node with
an ``image_upload`` combo (Load Image, Load Image (as Mask)) gets the upload button's value ("image") LAST,
after all its other widgets (the frontend adds the button as an extra input at the end). Links are
``[id, from_node, from_slot, to_node, to_slot, type]``. Both directions need ComfyUI's node classes (after
:func:`headless.setup_comfyui`). The browser test (tests/test_browser.py) checks these rules against the live
frontend: each shipped UI file, loaded in Chromium, converts back to exactly its API file.

This module only converts and lays out; writing the shipped files is :mod:`.workflow_files`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute"}
NODE_W, GAP = 340, 40
PREVIEW_H = 300          # room under a node that shows an image after a run (or a region editor)
GROUP_PAD, GROUP_TITLE = 20, 40
# class types that show an image on the node (so the layout leaves room for it)
PREVIEW_NODES = {"LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "InstantFamilyEncodeFaces",
                 "InstantFamilyPoseTemplate", "InstantFamilyPoseFromJSON", "InstantFamilyPoseFromImage",
                 "InstantFamilyPoseControl", "InstantFamilyIDMasks", "InstantFamilyKps5Control",
                 "InstantFamilyIDRegions", "InstantFamilyScoreIdentities"}
# groups, left to right / top to bottom, and the class types in them (anything else: "Sample and save")
GROUPS: list[tuple[str, str, set[str]]] = [
    ("Models and picture size", "#3f789e", {"CheckpointLoaderSimple", "ControlNetLoader", "PrimitiveInt",
                                            "InstantFamilyControlNetLoader", "InstantFamilyWeightsLoader",
                                            "InstantFamilyFaceEncoderLoader", "CLIPTextEncode"}),
    ("Identities: one photo per person", "#8A8", {"LoadImage", "InstantFamilyEncodeFaces",
                                                  "InstantFamilyMergeFaces", "InstantFamilyProjectIDs",
                                                  "InstantFamilyEmbeddingStack"}),
    ("Pose and where each person goes", "#a1309b", {"InstantFamilyPoseTemplate", "InstantFamilyPoseFromJSON",
                                                    "InstantFamilyPoseFromImage", "InstantFamilyPoseControl",
                                                    "InstantFamilyIDMasks", "InstantFamilyIDRegions",
                                                    "InstantFamilyKps5Control", "LoadImageMask", "MaskToImage",
                                                    "ImageBatch", "ImageToMask", "ImageBlend"}),
    ("Sample and save", "#b58b2a", set()),
]


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
            # forceInput: a socket in the frontend, never a widget (e.g. a STRING fed by another node)
            out.append((name, kind, opts, kind in WIDGET_TYPES and not opts.get("forceInput")))
    return out


def _outputs(class_type: str) -> list[tuple[str, str]]:
    cls = _node_class(class_type)
    types = [str(getattr(t, "value", t)) if not isinstance(t, list) else "COMBO" for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def _control_values(opts: dict, name: str, kind: str) -> list[Any]:
    """The value slot that follows a widget right after it (the 'control after generate' combo)."""
    if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return ["fixed"]
    return []


def _upload_values(class_type: str) -> list[Any]:
    """Value slots the frontend adds after ALL of a node's widgets (the image upload button)."""
    return ["image"] if any(o.get("image_upload") for _, _, o, _ in _inputs(class_type)) else []


def group_of(class_type: str, upstream: list[str]) -> int:
    """Index into GROUPS; a Save/Preview node joins the group of the node it saves."""
    for i, (_, _, members) in enumerate(GROUPS):
        if class_type in members:
            return i
    if class_type in ("SaveImage", "PreviewImage") and upstream:
        return min(group_of(u, []) for u in upstream)
    return len(GROUPS) - 1


def api_to_ui(prompt: dict, note: str | None = None) -> dict:
    """An API-format prompt as a UI workflow: nodes in groups (models, identities, pose, sampling), inside a
    group in columns by graph depth, with room for image previews; ``_meta.title`` -> title; ``note`` becomes
    a Note node at the top left."""
    ids = {nid: int(nid) for nid in prompt}
    depth: dict[str, int] = {}

    def ups(nid: str) -> list[str]:
        return [str(v[0]) for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]

    def d(nid: str) -> int:
        if nid not in depth:
            depth[nid] = 1 + max((d(u) for u in ups(nid)), default=-1)
        return depth[nid]

    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = defaultdict(list)
    built: dict[str, dict] = {}
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
                    widgets += _control_values(opts, name, kind)
                continue
            if not is_widget:
                inputs_ui.append({"name": name, "type": kind, "link": None})
                continue
            widgets.append(value)
            widgets += _control_values(opts, name, kind)
        widgets += _upload_values(ctype)
        height = 60 + 26 * (len(widgets) + max(len(inputs_ui), len(_outputs(ctype))))
        if ctype in PREVIEW_NODES:
            height += PREVIEW_H
        entry = {"id": ids[nid], "type": ctype, "pos": [0, 0], "size": [NODE_W, height], "flags": {},
                 "order": order, "mode": 0, "inputs": inputs_ui, "outputs": [],
                 "properties": {"Node name for S&R": ctype}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            entry["title"] = node["_meta"]["title"]
        built[nid] = entry
    for nid, entry in built.items():
        entry["outputs"] = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                            for i, (n, t) in enumerate(_outputs(entry["type"]))]

    # layout: groups 0 (models) | 1 (identities) over 2 (pose) | 3 (sampling); columns by depth inside
    members: dict[int, list[str]] = defaultdict(list)
    for nid in sorted(prompt, key=lambda n: (d(n), ids[n])):
        members[group_of(prompt[nid]["class_type"], [prompt[u]["class_type"] for u in ups(nid)])].append(nid)
    groups_ui = []
    note_h = 220.0 if note else 0.0
    y_top = note_h + GAP
    bottoms: dict[int, float] = {}
    rights: dict[int, float] = {}

    def place(g: int, x0: float, y0: float) -> None:
        nids = members.get(g, [])
        if not nids:
            rights[g], bottoms[g] = x0, y0
            return
        base = min(d(n) for n in nids)
        cols: dict[int, list[str]] = defaultdict(list)
        for n in nids:
            cols[d(n) - base].append(n)
        x = x0 + GROUP_PAD
        bottom = y0
        for c in sorted(cols):
            y = y0 + GROUP_TITLE
            for n in cols[c]:
                built[n]["pos"] = [x, y]
                y += built[n]["size"][1] + GAP
            bottom = max(bottom, y)
            x += NODE_W + GAP
        rights[g], bottoms[g] = x - GAP + GROUP_PAD, bottom - GAP + GROUP_PAD
        title, color, _ = GROUPS[g]
        groups_ui.append({"id": len(groups_ui) + 1, "title": title, "color": color, "font_size": 24, "flags": {},
                          "bounding": [x0, y0, rights[g] - x0, bottoms[g] - y0]})

    place(0, 0.0, y_top)
    place(1, rights[0] + GAP, y_top)
    place(2, rights[0] + GAP, (bottoms[1] + GAP) if members.get(1) else y_top)
    place(3, max(rights[1], rights[2]) + GAP, y_top)

    nodes_ui = [built[n] for n in sorted(built, key=lambda n: built[n]["order"])]
    last_id = max(ids.values(), default=0)
    if note:
        last_id += 1
        nodes_ui.insert(0, {"id": last_id, "type": "Note", "pos": [0.0, 0.0], "size": [max(rights[0], 700.0), note_h],
                            "flags": {}, "order": len(nodes_ui), "mode": 0, "inputs": [], "outputs": [],
                            "properties": {}, "widgets_values": [note], "title": "Read me: which files to pick",
                            "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes_ui,
            "links": links, "groups": groups_ui, "config": {}, "extra": {}, "version": 0.4}


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
                for _ in _control_values(opts, name, kind):
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
