"""The recognition graph edit (local feature map), the insightface backend's loading path, providers.

No insightface pack can be downloaded here, so the models are built in the test: an ArcFace-shaped
network exported from torch (the reference outputs) and an SCRFD-shaped detector that insightface's own
SCRFD code decodes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch builds the test's ONNX models")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs face models")
onnx = pytest.importorskip("onnx", reason="onnx edits the recognition graph")
pytest.importorskip("insightface", reason="the insightface backend needs the insightface package")

from instantfamily_nodes.models.faces import synthetic  # noqa: E402
from instantfamily_nodes.models.faces import onnx_local, providers  # noqa: E402
from instantfamily_nodes.models.faces.encode import encode_faces  # noqa: E402
from instantfamily_nodes.models.faces.errors import ModelFileError, ModelFolderError, NoFaceError  # noqa: E402
from instantfamily_nodes.models.faces.insightface_backend import (  # noqa: E402
    InsightFaceEncoder, classify_onnx, find_model_dir, list_model_names)

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def arcface(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    path = d / "arcface_like.onnx"
    net = synthetic.export_arcface_like(path, width=16, emb_dim=64)
    return path, net


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    synthetic.make_model_pack(root, "antelopev2")
    return root


def _torch_outputs(net, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: torch's embedding and bn2 map for crops normalised as insightface does."""
    grabbed = {}
    h = net.bn2.register_forward_hook(lambda m, i, o: grabbed.__setitem__("map", o))
    x = torch.from_numpy(((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        emb = net(x).numpy()
    h.remove()
    return emb, grabbed["map"].numpy().transpose(0, 2, 3, 1)


def _crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_graph_edit_exposes_feature_map_matching_torch(arcface):
    path, net = arcface
    m = onnx_local.load_local_feature_model(path, CPU)
    assert m.local_output != m.embedding_output
    assert m.local_shape == (7, 7, 128) and m.embedding_dim == 64
    crops = _crops(3)
    emb, local = m.run(crops)
    ref_emb, ref_map = _torch_outputs(net, crops)
    np.testing.assert_allclose(local, ref_map, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-4)


def test_local_shape_is_read_from_the_model(tmp_path):
    path = tmp_path / "narrow.onnx"
    synthetic.export_arcface_like(path, width=8, emb_dim=32, seed=3)
    m = onnx_local.load_local_feature_model(path, CPU)
    assert m.local_shape == (7, 7, 64) and m.embedding_dim == 32


def test_embedding_unchanged_by_edit_and_user_file_untouched(arcface):
    path, _ = arcface
    before = (onnx_local.file_sha256(path), os.stat(path).st_mtime_ns, sorted(os.listdir(path.parent)))
    m = onnx_local.load_local_feature_model(path, CPU)
    crops = _crops(4, seed=1)
    original = ort.InferenceSession(str(path), providers=CPU)
    blob = m.blob(crops)
    (orig_emb,) = original.run(None, {original.get_inputs()[0].name: blob})
    emb, _ = m.run(crops)
    emb_only, none = m.run(crops, with_local=False)
    np.testing.assert_allclose(emb, orig_emb, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(emb_only, emb)
    assert none is None
    after = (onnx_local.file_sha256(path), os.stat(path).st_mtime_ns, sorted(os.listdir(path.parent)))
    assert after == before


def test_cache_is_keyed_by_hash_and_reused(arcface, tmp_path, monkeypatch):
    path, _ = arcface
    cache = tmp_path / "cache"
    first = onnx_local.load_local_feature_model(path, CPU, cache_dir=cache)
    assert not first.from_cache
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted([f"{first.sha256[:32]}.local.onnx", f"{first.sha256[:32]}.local.json"])

    def no_edit(*a, **k):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(onnx_local, "add_local_output", no_edit)
    second = onnx_local.load_local_feature_model(path, CPU, cache_dir=cache)
    assert second.from_cache and second.local_shape == first.local_shape
    crops = _crops(2, seed=2)
    for a, b in zip(first.run(crops), second.run(crops)):
        np.testing.assert_array_equal(a, b)


def test_broken_cache_entry_is_rebuilt(arcface, tmp_path):
    path, _ = arcface
    cache = tmp_path / "cache"
    first = onnx_local.load_local_feature_model(path, CPU, cache_dir=cache)
    (cache / f"{first.sha256[:32]}.local.onnx").write_bytes(b"garbage")
    again = onnx_local.load_local_feature_model(path, CPU, cache_dir=cache)
    assert not again.from_cache
    np.testing.assert_array_equal(again.run(_crops(1))[1], first.run(_crops(1))[1])


def test_corrupted_onnx_file_is_a_clear_error(arcface, tmp_path):
    path, _ = arcface
    bad = tmp_path / "glintr100.onnx"
    bad.write_bytes(path.read_bytes()[:5000])  # an interrupted download
    with pytest.raises(ModelFileError, match=r"glintr100\.onnx.*(corrupted|download it again)"):
        onnx_local.load_local_feature_model(bad, CPU)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    with pytest.raises(ModelFileError, match="notes.onnx"):
        onnx_local.load_local_feature_model(text, CPU)


def test_wrong_kind_of_onnx_model_is_a_clear_error(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, torch.zeros(1, 10), str(path), dynamo=False)
    with pytest.raises(ModelFileError, match="no 4-D feature map"):
        onnx_local.load_local_feature_model(path, CPU)


def test_model_folder_discovery_and_missing_folder_message(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_model_dir("antelopev2", [pack]) == pack / "models" / "antelopev2"
    assert list_model_names([pack]) == ["antelopev2"]
    # the zip's nested antelopev2/antelopev2/ layout is found too
    nested = tmp_path / "nested"
    (nested / "models" / "antelopev2").mkdir(parents=True)
    os.symlink(pack / "models" / "antelopev2", nested / "models" / "antelopev2" / "antelopev2")
    assert find_model_dir("antelopev2", [nested]).name == "antelopev2"
    empty = tmp_path / "comfy" / "models" / "insightface"
    with pytest.raises(ModelFolderError) as e:
        find_model_dir("buffalo_l", [empty])
    msg = str(e.value)
    assert str(empty / "models" / "buffalo_l") in msg            # where it looked
    assert str(tmp_path / "home" / ".insightface" / "models" / "buffalo_l") in msg
    assert "w600k_r50.onnx" in msg and "det_10g.onnx" in msg      # what to put there
    assert "dlib" in msg                                          # and the offline alternative


def test_classify_mirrors_insightface_router(pack):
    d = pack / "models" / "antelopev2"
    assert classify_onnx(onnx.load(str(d / "scrfd_like_bnkps.onnx"))) == "detection"
    assert classify_onnx(onnx.load(str(d / "arcface_like.onnx"))) == "recognition"


def test_folder_without_detector_says_what_is_missing(arcface, tmp_path):
    path, _ = arcface
    d = tmp_path / "models" / "antelopev2"
    d.mkdir(parents=True)
    (d / "glintr100.onnx").write_bytes(path.read_bytes())
    with pytest.raises(ModelFolderError, match=r"no detection model \(SCRFD\)"):
        InsightFaceEncoder(d, provider="CPU")


def test_insightface_backend_end_to_end(pack, tmp_path):
    enc = InsightFaceEncoder(find_model_dir("antelopev2", [pack]), provider="CPU", cache_dir=tmp_path / "c")
    assert enc.has_local and enc.name == "insightface/antelopev2" and enc.device == "CPU"
    # two "faces" (bright squares the SCRFD-shaped detector fires on), right one listed first in pixels
    img = synthetic.square_faces_image([(500, 240), (150, 300)])
    faces = encode_faces(enc, img)
    assert len(faces) == 2 and faces.has_local and faces.encoder == "insightface/antelopev2"
    for f, (cx, cy) in zip(faces, [(150, 300), (500, 240)]):  # left to right
        x0, y0, x1, y1 = f.box
        assert x0 < cx < x1 and y0 < cy < y1
        assert f.local.shape == (7, 7, 128) and f.crop.shape == (112, 112, 3)
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5
        # embedding and local map are the recognition net's outputs on the aligned crop
        emb, local = enc.recognizer.run(f.crop[None])
        np.testing.assert_allclose(emb[0] / np.linalg.norm(emb[0]), f.embedding, atol=1e-6)
        np.testing.assert_allclose(local[0], f.local, atol=1e-6)
    with pytest.raises(NoFaceError, match=r"image 1 of 1: no face found after det_size 640, 480, 320"):
        encode_faces(enc, np.zeros((480, 640, 3), np.uint8))


def test_auto_provider_picks_cuda_only_when_installed():
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert providers.resolve_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert providers.resolve_providers("auto", [cpu]) == [cpu]
    assert providers.resolve_providers("CoreML", ["CoreMLExecutionProvider", cpu]) == ["CoreMLExecutionProvider", cpu]
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        providers.resolve_providers("CUDA", [cpu])
    with pytest.raises(ValueError, match="not one of"):
        providers.resolve_providers("TPU", [cpu])


def test_cuda_that_does_not_start_falls_back_to_cpu_with_one_warning(arcface, caplog, monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here, so a failing CUDA provider cannot be provoked")
    path, _ = arcface
    monkeypatch.setattr(providers, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="instantfamily.faces"):
        s1 = providers.create_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        s2 = providers.create_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert s1.get_providers() == s2.get_providers() == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if "CUDA was requested but did not start" in r.getMessage()]
    assert len(warnings) == 1
    assert "on CPU" in warnings[0].getMessage()


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("size, centers, hw", [
    (64, [(320, 240)], (480, 640)),
    (96, [(160, 200)], (400, 320)),                     # the demo's face photo
    (96, [(150, 300), (500, 240)], (480, 640)),
    (128, [(211, 173)], (480, 640)),                    # off every cell grid
    (48, [(100, 100), (400, 350)], (480, 640)),
    (200, [(300, 260)], (512, 640)),
])
def test_synthetic_detector_boxes_frame_the_square(pack, tmp_path, size, centers, hw):
    """Issue 9, defect 3: boxes used to sit on a cell corner (-40 px for a 96-px square)."""
    enc = InsightFaceEncoder(find_model_dir("antelopev2", [pack]), provider="CPU", cache_dir=tmp_path / "c")
    img = synthetic.square_faces_image(centers, size=size, hw=hw)
    dets = enc.detect(img, enc.ladder[0])
    assert len(dets) == len(centers), "one box per square"
    for cx, cy in centers:
        square = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
        assert max(_iou(d.box, square) for d in dets) >= 0.9, ([d.box for d in dets], square)
