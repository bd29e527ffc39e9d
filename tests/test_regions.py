"""ID regions (pose/regions.py): the editor's JSON -> masks, checked pixel by pixel against hand-computed
boxes; bad JSON refused with the region and field named; the JS palette equals palette.py; the node in
ComfyUI's real executor gives the same masks as the core for the same text (the API path)."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest

from instantfamily_nodes.palette import ID_COLORS
from instantfamily_nodes.pose import regions as rg

PACK = Path(__file__).resolve().parent.parent


def test_js_palette_equals_python_palette():
    text = (PACK / "web" / "palette.js").read_text()
    body = text[text.index("ID_COLORS = ["):text.index("];")]
    js = [tuple(int(v) for v in m) for m in re.findall(r"\[(\d+),\s*(\d+),\s*(\d+)\]", body)]
    assert js == [tuple(c) for c in ID_COLORS]


def test_rect_and_ellipse_masks_by_hand():
    text = json.dumps({"version": 1, "regions": [
        {"id": 1, "shape": "ellipse", "x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0},
        {"id": 0, "shape": "rect", "x": 0.125, "y": 0.25, "w": 0.25, "h": 0.5, "prompt": "in a red hat"},
    ]})
    regions = rg.parse_regions(text)
    assert [r.id for r in regions] == [0, 1] and regions[0].prompt == "in a red hat" and regions[1].prompt == ""
    m = rg.region_masks(regions, (8, 16))
    assert m.shape == (2, 8, 16) and m.dtype == np.float32
    # rect: x 2..6 px, y 2..6 px -> columns 2..5, rows 2..5 exactly
    want0 = np.zeros((8, 16), np.float32)
    want0[2:6, 2:6] = 1
    np.testing.assert_array_equal(m[0], want0)
    # ellipse centred (12, 4) with semi-axes 4 x 4: pixel centres inside or on it
    ys, xs = np.mgrid[0:8, 0:16] + 0.5
    want1 = (((xs - 12) / 4) ** 2 + ((ys - 4) / 4) ** 2 <= 1).astype(np.float32)
    np.testing.assert_array_equal(m[1], want1)
    # the same text gives the same masks at another size, scaled
    m2 = rg.region_masks(rg.parse_regions(text), (16, 32))
    assert m2[0].sum() == 4 * m[0].sum()
    # round trip keeps the prompt
    assert rg.parse_regions(rg.dump_regions(regions)) == regions


def test_regions_are_clipped_to_the_picture():
    regions = rg.parse_regions('{"version": 1, "regions": [{"id": 0, "x": -0.5, "y": 0.5, "w": 1.0, "h": 1.0}]}')
    m = rg.region_masks(regions, (4, 4))
    want = np.zeros((4, 4), np.float32)
    want[2:, :2] = 1
    np.testing.assert_array_equal(m[0], want)


def test_feather_falls_off_outside():
    regions = rg.parse_regions('[{"id": 0, "x": 0.25, "y": 0.25, "w": 0.5, "h": 0.5}]')
    m = rg.region_masks(regions, (16, 16), feather=3)[0]
    assert m[8, 8] == 1 and 0 < m[8, 3] < 1 and m[0, 0] == 0


@pytest.mark.parametrize("text, message", [
    ("{nope", r"not valid JSON"),
    ('{"version": 2, "regions": []}', r"format version 2 is not supported"),
    ('{"regions": [{"id": 0, "x": 0, "y": 0, "w": 0.5}]}', r"regions\[0\]: missing h"),
    ('{"regions": [{"id": 0, "x": 0, "y": 0, "w": 0.5, "h": 0.5, "widht": 1}]}', r"unknown key\(s\) \['widht'\]"),
    ('{"regions": [{"id": 0, "x": "a", "y": 0, "w": 0.5, "h": 0.5}]}', r"regions\[0\]\.x: expected a finite number"),
    ('{"regions": [{"id": 0, "x": 0, "y": 0, "w": 0, "h": 0.5}]}', r"width and height must be > 0"),
    ('{"regions": [{"id": 0, "x": 1.5, "y": 0, "w": 0.5, "h": 0.5}]}', r"outside the picture"),
    ('{"regions": [{"id": 0, "shape": "star", "x": 0, "y": 0, "w": 0.5, "h": 0.5}]}', r"shape: expected one of"),
    ('[{"id": 0, "x": 0, "y": 0, "w": 0.5, "h": 0.5}, {"id": 0, "x": 0.5, "y": 0, "w": 0.5, "h": 0.5}]',
     r"ID\(s\) \[0\] have more than one region"),
    ('[{"id": 0, "x": 0, "y": 0, "w": 0.5, "h": 0.5}, {"id": 2, "x": 0.5, "y": 0, "w": 0.5, "h": 0.5}]',
     r"ID\(s\) \[1\] have no region"),
    ('[{"id": true, "x": 0, "y": 0, "w": 0.5, "h": 0.5}]', r"\.id: expected an identity number"),
    ('[{"id": 0, "x": 0, "y": 0, "w": 0.5, "h": 0.5, "prompt": 3}]', r"\.prompt: expected text"),
])
def test_bad_regions_name_what_is_wrong(text, message):
    with pytest.raises(rg.RegionError, match=message):
        rg.parse_regions(text)


def test_a_region_smaller_than_a_pixel_is_refused():
    regions = rg.parse_regions('[{"id": 0, "x": 0.01, "y": 0.01, "w": 0.001, "h": 0.001}]')
    with pytest.raises(rg.RegionError, match="covers no pixel centre of the 64 x 64 picture"):
        rg.region_masks(regions, (64, 64))


# ---------------------------------------------------------------- the node, in ComfyUI's real executor

class _Server:
    client_id = None
    last_node_id = None

    def send_sync(self, *a, **k):
        pass

    def queue_updated(self):
        pass


def test_node_in_comfyui_gives_the_core_masks_and_checks_sizes(comfyui):
    import execution
    import nodes
    import torch

    from instantfamily_nodes.nodes import regions as node_mod

    nodes.NODE_CLASS_MAPPINGS.setdefault("InstantFamilyIDRegions", node_mod.IDRegions)
    text = '[{"id": 0, "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}, {"id": 1, "shape": "ellipse", "x": 0.5, "y": 0.1, "w": 0.4, "h": 0.6}]'
    prompt = {
        "1": {"class_type": "InstantFamilyIDRegions", "inputs": {"regions": text, "width": 96, "height": 64, "feather": 0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    valid = asyncio.run(execution.validate_prompt("r1", prompt, None))
    assert valid[0] is True, valid
    ex = execution.PromptExecutor(_Server())
    ex.execute(prompt, "r1", {}, valid[2])
    assert ex.success, ex.status_messages
    import folder_paths
    from PIL import Image

    from instantfamily_nodes.palette import id_color

    want = rg.region_masks(rg.parse_regions(text), (64, 96))
    (item,) = ex.history_result["outputs"]["3"]["images"]
    png = np.asarray(Image.open(Path(folder_paths.get_temp_directory()) / item["subfolder"] / item["filename"]))
    # mask_preview: each region tinted in its ID colour (alpha 0.55) over black, nothing elsewhere
    only0, only1 = (want[0] > 0) & (want[1] == 0), (want[1] > 0) & (want[0] == 0)
    assert np.abs(png[only0].astype(int) - np.rint(0.55 * np.array(id_color(0)))).max() <= 1
    assert np.abs(png[only1].astype(int) - np.rint(0.55 * np.array(id_color(1)))).max() <= 1
    assert png[(want[0] == 0) & (want[1] == 0)].max() == 0
    out = node_mod.IDRegions.execute(text, 96, 64, 0).args[0]
    np.testing.assert_array_equal(out.numpy(), want)
    # picture size from the image; an image of another aspect than width x height is refused
    img = torch.zeros(1, 64, 96, 3)
    np.testing.assert_array_equal(node_mod.IDRegions.execute(text, 0, 0, 0, image=img).args[0].numpy(), want)
    with pytest.raises(ValueError, match="96x64.*64x64.*does not stretch"):
        node_mod.IDRegions.execute(text, 64, 64, 0, image=img)
    with pytest.raises(ValueError, match="picture size is unknown"):
        node_mod.IDRegions.execute(text, 0, 0, 0)
    with pytest.raises(ValueError, match="none drawn"):
        node_mod.IDRegions.execute(rg.EMPTY, 64, 64, 0)
