"""The scoring node inside the real ComfyUI (imported, not mocked), through ComfyUI's executor path,
on real photos with the offline dlib encoder."""
from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="ComfyUI needs torch")
pytest.importorskip("dlib", reason="the offline face encoder needs dlib-bin")
pytest.importorskip("insightface", reason="face alignment uses insightface.utils.face_align")
from PIL import Image  # noqa: E402


def run_node(cls, **inputs):
    import execution

    out, _ui, _sub, pending = asyncio.run(
        execution.get_output_data("test", "1", cls, {k: [v] for k, v in inputs.items()}))
    assert not pending
    return [o[0] for o in out]


def _photo(pkg_dir: Path) -> np.ndarray:
    if not pkg_dir.is_file():
        pytest.skip(f"test photo {pkg_dir} is not installed")
    return np.asarray(Image.open(pkg_dir).convert("RGB"))


@pytest.fixture(scope="module")
def photos():
    import matplotlib

    sk = Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0])
    a = _photo(sk / "data" / "astronaut.png")
    g = _photo(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    fit = lambda x: np.asarray(Image.fromarray(x).resize((round(x.shape[1] * 400 / x.shape[0]), 400)))  # noqa: E731
    a4, g4 = fit(a), fit(g)[:, :400]
    pair = np.concatenate([a4[:, ::-1], g4], 1)                 # 400 x 800, astronaut left
    alone = np.concatenate([a4, np.full_like(g4, 128)], 1)      # grace missing on the right
    return a, g, pair, alone


@pytest.fixture()
def node(comfyui):
    from instantfamily_nodes.nodes import evaluate

    return evaluate


def test_score_node_with_masks(node, photos):
    import comfy.utils

    from instantfamily_nodes.evaluate.identity import encode_references, make_encoder
    from instantfamily_nodes.nodes import node_classes
    from instantfamily_nodes.palette import id_color

    assert "InstantFamilyScoreIdentities" in {c.GET_SCHEMA().node_id for c in node_classes()}
    schema = node.ScoreIdentities.GET_SCHEMA()
    assert all(i.tooltip for i in schema.inputs)
    a, g, pair, alone = photos
    enc = make_encoder("dlib")
    refs = encode_references(enc, [a, g], ["a", "g"])
    images = torch.from_numpy(np.stack([pair, alone]).astype(np.float32) / 255.0)
    masks = torch.zeros(2, 400, 800)
    masks[0, :, :400] = 1
    masks[1, :, 400:] = 1
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: calls.append((v, t)))
    try:
        text, js, preview = run_node(node.ScoreIdentities, face_encoder=enc, references=refs, images=images,
                                     match="auto", id_masks=masks, prompt="", clip_model="none", min_overlap=0.3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert calls[-1] == (2, 2)
    data = json.loads(js)
    first, second = data["images"]
    assert first["match"] == "regions" and first["multi_sim"] > 1 and first["faces_missing"] == 0
    assert all(i["single_sim"] > 0.95 for i in first["ids"])
    assert second["ids"][1]["single_sim"] == 0.0 and second["faces_missing"] == 1 and second["fastcomposer"] == 0
    assert "image 1:" in text and "ID1 missing" in text and "backend dlib" in text
    assert preview.shape[0] == 2 and preview.shape[-1] == 3
    # the preview draws ID 0 in its palette colour
    px = (preview[0].numpy() * 255).round().astype(int).reshape(-1, 3)
    assert (np.abs(px - np.array(id_color(0))).sum(1) == 0).sum() > 100


def test_score_node_bad_inputs(node, photos):
    from instantfamily_nodes.evaluate.errors import EvaluationInputError
    from instantfamily_nodes.evaluate.identity import encode_references, make_encoder
    from instantfamily_nodes.models.faces.types import Faces

    a, g, pair, _ = photos
    enc = make_encoder("dlib")
    refs = encode_references(enc, [a, g], ["a", "g"])
    images = torch.from_numpy(pair[None].astype(np.float32) / 255.0)
    with pytest.raises(EvaluationInputError, match="references: no faces"):
        node.ScoreIdentities.execute(enc, Faces(encoder="dlib"), images, "auto")
    with pytest.raises(EvaluationInputError, match="3 masks for 2 IDs and 1 images"):
        node.ScoreIdentities.execute(enc, refs, images, "auto", id_masks=torch.zeros(3, 400, 800))
    with pytest.raises(EvaluationInputError, match="2 lines for 1 images"):
        node.ScoreIdentities.execute(enc, refs, images, "auto", prompt="one\ntwo")
    with pytest.raises(EvaluationInputError, match="match=regions needs"):
        node.ScoreIdentities.execute(enc, refs, images, "regions")
