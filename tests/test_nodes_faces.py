"""The face nodes inside the real ComfyUI (imported, not mocked), run through ComfyUI's own executor."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="ComfyUI and the test models need torch")
pytest.importorskip("onnxruntime", reason="onnxruntime runs face models")
pytest.importorskip("insightface", reason="the insightface backend needs the insightface package")


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    from instantfamily_nodes.models.faces import synthetic

    models = tmp_path_factory.mktemp("comfy_models")
    synthetic.make_model_pack(models / "insightface", "antelopev2")
    return models


@pytest.fixture()
def faces_nodes(comfyui, pack, monkeypatch, tmp_path):
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(pack))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.insightface models leak in
    from instantfamily_nodes.nodes import faces

    return faces


def run_node(cls, **inputs):
    """ComfyUI's executor path for one node: validation, class clone, execute, output merge."""
    import execution

    out, _ui, _sub, pending = asyncio.run(
        execution.get_output_data("test", "1", cls, {k: [v] for k, v in inputs.items()}))
    assert not pending
    return [o[0] for o in out]


def _to_tensor(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs).astype(np.float32) / 255.0)


def test_nodes_are_registered_with_v3_schemas(faces_nodes):
    from instantfamily_nodes.nodes import node_classes

    ids = {c.GET_SCHEMA().node_id for c in node_classes()}
    assert {"InstantFamilyFaceEncoderLoader", "InstantFamilyEncodeFaces"} <= ids
    loader = faces_nodes.FaceEncoderLoader.GET_SCHEMA()
    opts = {i.id: getattr(i, "options", None) for i in loader.inputs}
    assert opts["backend"] == ["insightface", "dlib"]
    assert opts["provider"] == ["auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML"]
    assert {"antelopev2", "buffalo_l"} <= set(opts["model_name"])
    enc = faces_nodes.EncodeFaces.GET_SCHEMA()
    assert [o.io_type for o in enc.outputs] == ["INSTANTFAMILY_FACES", "IMAGE"]


def test_insightface_loader_and_encode_node(faces_nodes, pack):
    import comfy.utils
    from instantfamily_nodes.models.faces import synthetic
    from instantfamily_nodes.palette import id_color

    (encoder,) = run_node(faces_nodes.FaceEncoderLoader, backend="insightface", model_name="antelopev2",
                          provider="auto", det_sizes="640, 480, 320")
    assert encoder.has_local and encoder.ladder == (640, 480, 320)
    assert any((pack / "instantfamily" / "cache").glob("*.local.onnx"))  # the edit went to the cache

    a = synthetic.square_faces_image([(500, 240), (150, 300)])
    b = synthetic.square_faces_image([(320, 240)])
    c = synthetic.square_faces_image([(200, 200)], hw=(400, 400))  # another size: the second input
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        faces, preview = run_node(faces_nodes.EncodeFaces, face_encoder=encoder, images=_to_tensor(a, b),
                                  faces_per_image="all", id_order="left_to_right", index_list="",
                                  images_2=_to_tensor(c))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert calls[-1] == (3, 3) and [v for v, _ in calls] == [1, 2, 3]
    assert [f.image_index for f in faces] == [0, 0, 1, 2]
    assert faces[0].center[0] < faces[1].center[0]
    assert faces.has_local and faces[0].local.shape == encoder.recognizer.local_shape
    # preview: one image per input image, padded to the largest, each box in its ID colour
    assert tuple(preview.shape) == (3, 480, 640, 3) and preview.dtype == torch.float32
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    for n, f in enumerate(faces):
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        px = (preview[f.image_index, (y0 + y1) // 2, x0].numpy() * 255).round().astype(int)
        assert tuple(px) == id_color(n)

    picked, _ = run_node(faces_nodes.EncodeFaces, face_encoder=encoder, images=_to_tensor(a), faces_per_image="auto",
                         id_order="index_list", index_list="1, 0")
    assert picked[0].center[0] > picked[1].center[0]


def test_loader_missing_models_says_where_to_put_them(faces_nodes, pack):
    from instantfamily_nodes.models.faces.errors import ModelFolderError

    with pytest.raises(ModelFolderError) as e:
        run_node(faces_nodes.FaceEncoderLoader, backend="insightface", model_name="buffalo_l", provider="auto",
                 det_sizes="640")
    assert str(pack / "insightface" / "models" / "buffalo_l") in str(e.value)
    with pytest.raises(ValueError, match="det_sizes"):
        run_node(faces_nodes.FaceEncoderLoader, backend="insightface", model_name="antelopev2", provider="auto",
                 det_sizes="big")


def test_dlib_loader_and_encode_node_on_a_real_photo(faces_nodes):
    pytest.importorskip("dlib", reason="the dlib backend needs dlib-bin")
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photo = np.asarray(Image.open(path).convert("RGB"))
    (encoder,) = run_node(faces_nodes.FaceEncoderLoader, backend="dlib", model_name="antelopev2", provider="auto",
                          det_sizes="640")
    faces, preview = run_node(faces_nodes.EncodeFaces, face_encoder=encoder, images=_to_tensor(photo),
                              faces_per_image="auto", id_order="left_to_right", index_list="")
    assert len(faces) == 1 and faces.encoder == "dlib" and faces[0].local is None
    assert tuple(preview.shape) == (1, *photo.shape)
    from instantfamily_nodes.models.faces.errors import NoFaceError

    with pytest.raises(NoFaceError, match="image 2 of 2"):
        run_node(faces_nodes.EncodeFaces, face_encoder=encoder, images=_to_tensor(photo, np.zeros_like(photo)),
                 faces_per_image="auto", id_order="left_to_right", index_list="")
