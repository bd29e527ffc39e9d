"""The pack in a real browser: ComfyUI (0.3.64 with its pinned frontend) on 127.0.0.1 with the pack and the
tiny models, driven in Debian's Chromium by Playwright for Python (never ``playwright install``).

(a) every shipped workflow loads from the template browser: no missing node types, every widget value valid
    for its node (checked against /object_info), the live frontend's own conversion to an API prompt equals
    the shipped API file, and no two nodes overlap;
(b) two regions drawn with mouse events on the region editor survive save + page reload, and the masks the
    backend used for them (saved by the run) match the drawn boxes to 1 picture pixel;
(c) Run on a workflow as loaded (no photos, public model names) shows ComfyUI's error dialog.

Screenshots go to bench/out/browser/ (git-ignored). The whole module takes about 2-3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="ComfyUI and the tiny models need torch")
pytest.importorskip("onnxruntime", reason="the synthetic face pack is exported/checked with onnx tooling")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright for Python is not installed (pip install playwright; CI does)")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                         "(apt-get install chromium; CI does)")

PACK = Path(__file__).resolve().parent.parent
SHOTS = PACK / "bench" / "out" / "browser"
# file-backed combos: a shipped workflow names the usual public file (the Note says to pick your own)
PUBLIC_FILES = {"v1-5-pruned-emaonly.safetensors", "control_v11p_sd15_openpose_fp16.safetensors",
                "instantfamily_sd15.safetensors"}
MASK_TOLERANCE_PX = 1   # drawn box (mouse position) vs mask edge, in picture pixels


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    from instantfamily_nodes.demo import headless, tiny

    root = tmp_path_factory.mktemp("browser_models")
    tiny.register_tiny_model_type()
    models = tiny.build_tiny_models(root, custom_nodes=[headless.pack_custom_nodes_dir()])
    srv = headless.ComfyServer(models.extra_model_paths, comfyui=comfyui, workdir=tmp_path_factory.mktemp("browser"))
    srv.start(timeout=240)
    srv.models = models
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg = browser.new_page(viewport={"width": 1600, "height": 1000})
    pg.errors = []
    # errors raised by the pack's own script (the frontend has a few harmless ones of its own at start-up)
    pg.on("pageerror", lambda e: pg.errors.append(f"{e}\n{e.stack}") if "instantfamily" in (e.stack or "") else None)
    _open(pg, server.url)
    yield pg
    pg.close()


def _open(pg, url: str) -> None:
    pg.goto(url)
    pg.wait_for_function("window.app && app.graph && app.extensionManager && "
                         "app.extensions.some(e => e.name === 'instantfamily.nodes')", timeout=90_000)
    # no first-run template dialog popping up over what a test does
    pg.evaluate("() => app.extensionManager.setting.set('Comfy.TutorialCompleted', true)")


def _shot(pg, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path))
    return path


def _open_template_browser(pg) -> None:
    """The template browser at the pack's list. (On a fresh profile the frontend may open the browser by
    itself a moment after start-up, and the command toggles it: so look, and ask again if needed.)"""
    pack = pg.get_by_text("instantfamily_nodes", exact=True).first
    for _ in range(3):
        if not pack.is_visible():
            pg.keyboard.press("Escape")
            pg.evaluate("() => { app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
        try:
            pack.wait_for(state="visible", timeout=8_000)
            break
        except sync_api.TimeoutError:
            continue
    pack.click()


def _load_template(pg, title: str) -> None:
    """Open the template browser, pick the pack, click the card: what a user does."""
    _open_template_browser(pg)
    pg.get_by_test_id(f"template-workflow-{title}").click()
    pg.wait_for_function("t => app.graph.nodes.some(n => n.type === 'Note' && n.widgets?.[0]?.value?.startsWith(t))",
                         arg=title, timeout=30_000)
    pg.wait_for_timeout(500)


def _combo_ok(value, options, name: str) -> bool:
    return value in options or (isinstance(value, str) and value in PUBLIC_FILES)


def _check_widget(node_type: str, name: str, value, spec) -> str | None:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if options is not None:
        if node_type in ("LoadImage", "LoadImageMask") and name == "image":
            return None if isinstance(value, str) and value.endswith(".png") else f"{name}={value!r}"
        return None if _combo_ok(value, options, name) else f"{name}={value!r} not in {options[:8]}"
    if kind in ("INT", "FLOAT"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (kind == "FLOAT" or float(value).is_integer())
        ok = ok and opts.get("min", -np.inf) <= value <= opts.get("max", np.inf)
        return None if ok else f"{name}={value!r} ({kind}, min {opts.get('min')}, max {opts.get('max')})"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} (BOOLEAN)"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} (STRING)"
    return None


def _titles():
    from instantfamily_nodes.demo import workflow_files, workflows

    return [(n, workflow_files.title(n)) for n in workflows.list_workflows()]


# ---------------------------------------------------------------- (a) every shipped workflow loads

def test_template_browser_lists_the_workflows_in_order(page):
    from instantfamily_nodes.demo import workflow_files

    _open_template_browser(page)
    cards = page.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for(timeout=20_000)
    shown = [cards.nth(i).get_attribute("data-testid").removeprefix("template-workflow-") for i in range(cards.count())]
    _shot(page, "a_template_browser")
    assert shown == sorted((t for t, _ in workflow_files.WORKFLOWS.values()), key=lambda t: int(t.split(".")[0]))
    assert shown[0].startswith("1. Four people")   # the main workflow first
    # the extension is registered once (WEB_DIRECTORY only)
    assert page.evaluate("app.extensions.filter(e => e.name === 'instantfamily.nodes').length") == 1


@pytest.mark.parametrize("name, title", _titles())
def test_shipped_workflow_loads_with_valid_values(page, object_info, name, title):
    from instantfamily_nodes.demo import workflows

    _load_template(page, title)
    _shot(page, f"a_loaded_{name}")
    nodes = page.evaluate("""() => app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: !!LiteGraph.registered_node_types[n.type], pos: [...n.pos],
        size: [...n.size], title_h: LiteGraph.NODE_TITLE_HEIGHT,
        widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => [w.name, w.value])}))""")
    assert not [n["type"] for n in nodes if not n["known"]], "missing node types"
    bad = []
    for n in nodes:
        spec = object_info.get(n["type"])
        if spec is None:
            continue   # UI-only (Note)
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for wname, value in n["widgets"]:
            if wname in inputs:
                err = _check_widget(n["type"], wname, value, inputs[wname])
                if err:
                    bad.append(f"node {n['id']} ({n['type']}): {err}")
    assert not bad, bad
    # the live frontend's own API conversion of the loaded file is the shipped API file, value for value
    out = page.evaluate("async () => (await app.graphToPrompt()).output")
    api = workflows.load_workflow(name)
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in out.items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want
    # room for previews: no two nodes overlap (title bar included)
    boxes = [(n["pos"][0], n["pos"][1] - n["title_h"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    overlaps = [(nodes[i]["id"], nodes[j]["id"]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i][0] < boxes[j][2] and boxes[j][0] < boxes[i][2]
                and boxes[i][1] < boxes[j][3] and boxes[j][1] < boxes[i][3]]
    assert not overlaps, f"overlapping nodes: {overlaps}"
    groups = page.evaluate("app.graph.groups.map(g => g.title)")
    assert len(groups) >= 2 and page.errors == []


def test_node_search_finds_the_pack_by_plain_words(page):
    """This frontend searches node names and display names only (no alias field), so the display names
    carry the words users type."""
    page.keyboard.press("Escape")
    page.evaluate("() => app.graph.clear()")
    # the node search box (what a double click on empty canvas opens)
    page.evaluate("() => { app.extensionManager.command.execute('Workspace.SearchBox.Toggle'); }")
    box = page.get_by_placeholder("Search Nodes...")
    found = {}
    for query, expect in [("identity", "InstantFamily Encode Faces"), ("face", "InstantFamily Face Encoder Loader"),
                          ("multi person", "InstantFamily Apply"), ("region", "InstantFamily ID Regions")]:
        box.fill(query)
        page.wait_for_timeout(800)
        found[query] = page.evaluate("Array.from(document.querySelectorAll('[role=option]'))"
                                     ".map(e => e.innerText.split('\\n')[0].trim()).filter(Boolean).slice(0, 8)")
        assert any(t.startswith(expect) for t in found[query]), (query, found[query])
    _shot(page, "a_node_search")


# ---------------------------------------------------------------- (c) Run on an incomplete graph

def test_run_on_a_workflow_as_loaded_shows_the_error_dialog(page, server):
    _load_template(page, "1. Four people on a pose template")
    before = server.get("/history")
    page.get_by_test_id("queue-button").click()
    dialog = page.get_by_role("dialog").filter(has_text="Prompt outputs failed validation")
    dialog.wait_for(timeout=30_000)
    _shot(page, "c_error_dialog")
    text = dialog.inner_text()
    assert "person_1.png" in text and "ckpt_name" in text
    time.sleep(1)
    assert server.get("/history") == before   # nothing ran: not even the pose branch


# ---------------------------------------------------------------- (b) draw, save, reload, run

REGIONS_JS = "() => JSON.parse(app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions').widgets.find(w => w.name === 'regions').value)"


def _editor_geometry(pg):
    """The editor canvas on screen and its picture area (fractions of the canvas), after centring the node."""
    pg.evaluate("""() => { const n = app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions');
        app.canvas.ds.scale = 1.2; app.canvas.centerOnNode(n); app.canvas.setDirty(true, true); }""")
    pg.wait_for_timeout(800)
    return pg.evaluate("""() => { const c = document.querySelector('canvas[data-instantfamily-regions]');
        const r = c.getBoundingClientRect();
        return {x: r.x, y: r.y, w: r.width, h: r.height, area: c.dataset.area.split(',').map(Number)}; }""")


def _screen(g, nx: float, ny: float) -> tuple[float, float]:
    ax, ay, aw, ah = g["area"]
    return round(g["x"] + (ax + nx * aw) * g["w"]), round(g["y"] + (ay + ny * ah) * g["h"])


def _picture(g, sx: float, sy: float) -> tuple[float, float]:
    ax, ay, aw, ah = g["area"]
    return ((sx - g["x"]) / g["w"] - ax) / aw, ((sy - g["y"]) / g["h"] - ay) / ah


def _drag(pg, a, b):
    pg.mouse.move(*a)
    pg.mouse.down()
    pg.mouse.move((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, steps=4)
    pg.mouse.move(*b, steps=4)
    pg.mouse.up()


def test_draw_two_regions_save_reload_run_and_the_masks_follow(page, server):
    from PIL import Image

    from instantfamily_nodes.demo import workflows
    from instantfamily_nodes.demo.__main__ import _prepare_inputs
    from instantfamily_nodes.pose import regions as rg

    m = server.models
    _load_template(page, "2. Two people, regions you draw")
    # this machine's files: tiny models, synthetic photos in the server's input folder, a small picture, 1 step
    assert _prepare_inputs(workflows.load_workflow("draw_regions"), server.workdir / "input", [], [],
                           synthetic_ok=True) == []
    W, H = 384, 256
    page.evaluate("""([ckpt, cn, weights, pack, W, H]) => {
        const set = (type, name, v) => app.graph.nodes.filter(n => n.type === type)
            .forEach(n => { n.widgets.find(w => w.name === name).value = v; });
        set('CheckpointLoaderSimple', 'ckpt_name', ckpt); set('InstantFamilyControlNetLoader', 'control_net_name', cn);
        set('InstantFamilyWeightsLoader', 'weights_name', weights); set('InstantFamilyFaceEncoderLoader', 'model_name', pack);
        set('KSampler', 'steps', 1);
        for (const n of app.graph.nodes.filter(n => n.type === 'PrimitiveInt'))
            n.widgets[0].value = n.title.includes('width') ? W : H;
    }""", [m.checkpoint, m.controlnet, m.weights, m.face_pack, W, H])

    g = _editor_geometry(page)
    _shot(page, "b1_editor_as_shipped")
    shipped = page.evaluate(REGIONS_JS)["regions"]
    assert len(shipped) == 2
    # delete both shipped regions: click inside each, press Delete (the node itself must stay)
    for r in reversed(shipped):
        page.mouse.click(*_screen(g, r["x"] + r["w"] / 2, r["y"] + r["h"] / 2))
        page.keyboard.press("Delete")
    assert page.evaluate(REGIONS_JS)["regions"] == []
    assert page.evaluate("app.graph.nodes.some(n => n.type === 'InstantFamilyIDRegions')")
    # draw two boxes (ID 0 left, ID 1 right); a third one is undone with Ctrl+Z; then ID 1 is resized
    drags = [(_screen(g, 0.12, 0.10), _screen(g, 0.40, 0.70)), (_screen(g, 0.58, 0.22), _screen(g, 0.86, 0.90))]
    for a, b in drags:
        _drag(page, a, b)
    _drag(page, _screen(g, 0.45, 0.75), _screen(g, 0.55, 0.95))
    assert len(page.evaluate(REGIONS_JS)["regions"]) == 3
    page.keyboard.press("Control+z")   # ComfyUI's own undo: the editor reports each edit to its change tracker
    page.wait_for_function(REGIONS_JS + ".regions.length === 2", timeout=10_000)
    # resize ID 1 by its lower-right corner
    corner = _screen(g, 0.90, 0.85)
    _drag(page, drags[1][1], corner)
    drags[1] = (drags[1][0], corner)
    drawn = page.evaluate(REGIONS_JS)
    _shot(page, "b2_two_regions_drawn")
    assert [r["id"] for r in drawn["regions"]] == [0, 1]
    expected = []
    for (a, b), r in zip(drags, drawn["regions"]):
        (x0, y0), (x1, y1) = _picture(g, *a), _picture(g, *b)
        expected.append((x0, y0, x1, y1))
        # the stored box is where the mouse went (to 0.2% of the picture: rounding of screen pixels)
        np.testing.assert_allclose([r["x"], r["y"], r["x"] + r["w"], r["y"] + r["h"]], [x0, y0, x1, y1], atol=2e-3)

    # save (the frontend's own Save, as a user names it), reload the page, open the saved file
    page.evaluate("() => { app.extensionManager.command.execute('Comfy.SaveWorkflow'); }")
    name_box = page.get_by_role("dialog").locator("input")
    name_box.fill("browser_regions")
    name_box.press("Enter")
    saved = server.workdir / "user" / "default" / "workflows" / "browser_regions.json"
    for _ in range(50):
        if saved.is_file():
            break
        time.sleep(0.2)
    assert saved.is_file()
    saved_node = next(n for n in json.loads(saved.read_text())["nodes"] if n["type"] == "InstantFamilyIDRegions")
    assert json.loads(saved_node["widgets_values"][0]) == drawn   # the regions are in the saved file
    page.reload()
    _open(page, server.url)
    page.keyboard.press("Escape")
    page.evaluate("""async () => { const r = await fetch('/api/userdata/' + encodeURIComponent('workflows/browser_regions.json'));
                                   await app.loadGraphData(await r.json()); }""")
    page.wait_for_function("app.graph.nodes.some(n => n.type === 'InstantFamilyIDRegions')", timeout=20_000)
    assert page.evaluate(REGIONS_JS) == drawn
    g2 = _editor_geometry(page)
    _shot(page, "b3_after_reload")
    # the editor draws them again: each region's centre shows its ID colour
    for n, r in enumerate(drawn["regions"]):
        sx, sy = _screen(g2, r["x"] + r["w"] / 2, r["y"] + r["h"] / 2)
        rgb = page.evaluate("""([sx, sy]) => { const c = document.querySelector('canvas[data-instantfamily-regions]');
            const b = c.getBoundingClientRect(); const x = (sx - b.x) * c.width / b.width, y = (sy - b.y) * c.height / b.height;
            return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)); }""", [sx, sy])
        from instantfamily_nodes.palette import id_color
        dominant = int(np.argmax(id_color(n)))
        assert int(np.argmax(rgb)) == dominant, (n, rgb)

    # run it; save what the region node gave Apply (its id_masks) with two core nodes added for the test
    page.evaluate("""() => { const r = app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions');
        const m = LiteGraph.createNode('MaskToImage'); app.graph.add(m); r.connect(0, m, 0);
        const s = LiteGraph.createNode('SaveImage'); app.graph.add(s); m.connect(0, s, 0);
        s.widgets.find(w => w.name === 'filename_prefix').value = 'browser_test/masks'; }""")
    before = set(server.get("/history"))
    page.get_by_test_id("queue-button").click()
    deadline = time.monotonic() + 240
    entry = None
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before}
        if new and all(v.get("status", {}).get("completed") or v.get("status", {}).get("status_str") == "error"
                       for v in new.values()):
            (entry,) = new.values()
            break
        time.sleep(1)
    assert entry is not None, "the run did not finish in 240 s"
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_timeout(1500)
    _editor_geometry(page)
    _shot(page, "b4_after_run")
    # after the run the editor shows the pose control image under the boxes
    assert page.evaluate("!!app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions').instantfamilyEditor.background()")

    files = sorted((server.workdir / "output" / "browser_test").glob("masks_*.png"))
    assert len(files) == 2
    for n, (f, box) in enumerate(zip(files, expected)):
        mask = np.asarray(Image.open(f).convert("L")) > 127
        assert mask.shape == (H, W)
        # exactly the masks of the saved text (the API path) ...
        want = rg.region_masks(rg.parse_regions(json.dumps(drawn)), (H, W))[n] > 0.5
        np.testing.assert_array_equal(mask, want)
        # ... and their edges where the mouse went, to MASK_TOLERANCE_PX picture pixels
        rows, cols = np.nonzero(mask)
        got = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], float)
        drawn_px = np.array([box[0] * W, box[1] * H, box[2] * W, box[3] * H])
        assert np.abs(got - drawn_px).max() <= MASK_TOLERANCE_PX, (n, got, drawn_px)
    assert page.errors == []


def test_a_box_dropped_on_a_detected_face_snaps_to_it(page, server):
    """After a run with FACES detected in the editor's own image, a box dragged over a face snaps to the
    face box grown by the paper's 25% margin. The photo: a 320 x 400 synthetic image with one bright 96-px
    square (the synthetic detector's "face") centred at (160, 200), i.e. the picture's centre."""
    from PIL import Image

    from instantfamily_nodes.models.faces import synthetic

    Image.fromarray(synthetic.square_faces_image([(160, 200)], size=96, hw=(400, 320))).save(
        server.workdir / "input" / "snap_face.png")
    page.keyboard.press("Escape")
    page.evaluate("""(pack) => {
        app.graph.clear();
        const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
        const img = add('LoadImage', 0, 0); img.widgets.find(w => w.name === 'image').value = 'snap_face.png';
        const enc = add('InstantFamilyFaceEncoderLoader', 0, 500);
        enc.widgets.find(w => w.name === 'model_name').value = pack;
        const faces = add('InstantFamilyEncodeFaces', 400, 0);
        enc.connect(0, faces, 0); img.connect(0, faces, 1);
        const reg = add('InstantFamilyIDRegions', 800, 0);
        reg.widgets.find(w => w.name === 'regions').value =
            JSON.stringify({version: 1, regions: [{id: 0, shape: 'rect', x: 0.02, y: 0.02, w: 0.2, h: 0.2}]});
        img.connect(0, reg, reg.findInputSlot('image')); faces.connect(0, reg, reg.findInputSlot('faces'));
        const prev = add('PreviewImage', 1300, 0); reg.connect(1, prev, 0);
    }""", server.models.face_pack)
    before = set(server.get("/history"))
    page.get_by_test_id("queue-button").click()
    page.wait_for_function("(app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions')"
                           ".instantfamilyEditor.faces || []).length === 1", timeout=120_000)
    # The editor gets the faces from the node's "executed" message, which ComfyUI sends before it writes
    # the prompt's history entry: wait for the entry instead of racing it.
    deadline = time.monotonic() + 60
    new = {}
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before and v.get("status")}
        if new:
            break
        time.sleep(0.2)
    assert [v["status"]["status_str"] for v in new.values()] == ["success"]
    face = page.evaluate("app.graph.nodes.find(n => n.type === 'InstantFamilyIDRegions').instantfamilyEditor.faces[0]")
    # the reported face is the bright square (independent: the photo itself)
    sq = (112 / 320, 152 / 400, 208 / 320, 248 / 400)
    fb = (face["x"], face["y"], face["x"] + face["w"], face["y"] + face["h"])
    inter = max(0, min(sq[2], fb[2]) - max(sq[0], fb[0])) * max(0, min(sq[3], fb[3]) - max(sq[1], fb[1]))
    union = (sq[2] - sq[0]) * (sq[3] - sq[1]) + face["w"] * face["h"] - inter
    assert inter / union > 0.5, (face, sq)
    g = _editor_geometry(page)
    _shot(page, "b5_snap_before")
    # drag the small box from the corner so that it ends over the face (not aligned with it)
    _drag(page, _screen(g, 0.12, 0.12), _screen(g, 0.45, 0.47))
    r = page.evaluate(REGIONS_JS)["regions"][0]
    _shot(page, "b6_snapped")
    m = 0.25 / 2
    want = [face["x"] - m * face["w"], face["y"] - m * face["h"], face["w"] * 1.25, face["h"] * 1.25]
    np.testing.assert_allclose([r["x"], r["y"], r["w"], r["h"]], want, atol=1e-4)
    assert page.errors == []
