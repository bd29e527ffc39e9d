"""Evaluation backends that need weights we cannot download here: FaceNet (vggface2), insightface
packs and CLIP ViT-L/14. The loading code runs on models the tests build (random weights, saved to
disk and loaded through the same path a user's files take); the parts that ship real weights
(MTCNN) run on a real photo. What is absent gets a message that says what to install."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="facenet, CLIP and the synthetic models need torch")
from PIL import Image  # noqa: E402

from instantfamily_nodes.evaluate import EvaluationInputError  # noqa: E402
from instantfamily_nodes.models.faces.errors import ModelFileError, ModelFolderError  # noqa: E402


def _astronaut() -> np.ndarray:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image is not installed; it ships the astronaut photo")
    return np.asarray(Image.open(Path(list(spec.submodule_search_locations)[0]) / "data" / "astronaut.png").convert("RGB"))


# ---------------------------------------------------------------- FaceNet


@pytest.fixture()
def no_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("INSTANTFAMILY_FACENET", raising=False)


def test_facenet_without_weights_says_where_and_how(no_torch_home, tmp_path):
    from instantfamily_nodes.evaluate.identity import FACENET_URL, find_facenet_weights, make_encoder

    with pytest.raises(ModelFolderError) as err:
        find_facenet_weights()
    msg = str(err.value)
    assert FACENET_URL in msg and str(tmp_path / "torch_home" / "checkpoints") in msg and "--backend dlib" in msg
    with pytest.raises(ModelFolderError, match="does not exist"):
        make_encoder("facenet", facenet_weights=tmp_path / "nope.pt")


@pytest.fixture(scope="module")
def facenet_weights(tmp_path_factory):
    """A random InceptionResnetV1 with a classifier head, saved like the vggface2 file."""
    fp = pytest.importorskip("facenet_pytorch", reason="pip install --no-deps facenet-pytorch")
    torch.manual_seed(0)
    net = fp.InceptionResnetV1(pretrained=None, classify=False, num_classes=10).eval()
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(net.state_dict(), path)
    return path


def test_facenet_backend_on_a_real_photo(facenet_weights, no_torch_home):
    from facenet_pytorch import InceptionResnetV1
    from facenet_pytorch.models.mtcnn import extract_face, fixed_image_standardization

    from instantfamily_nodes.evaluate.identity import detect_faces, make_encoder

    img = _astronaut()
    enc = make_encoder("facenet", facenet_weights=facenet_weights)
    assert enc.name == "facenet/vggface2" and not enc.has_local
    faces = detect_faces(enc, img, want=1)
    # MTCNN's weights ship in the wheel: the real face is found (Eileen Collins, top middle of the photo)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < (x0 + x1) / 2 < 260 and 60 < (y0 + y1) / 2 < 160 and 60 < x1 - x0 < 140
    assert faces[0].crop.shape == (112, 112, 3) and faces[0].embedding.shape == (512,)
    # FastComposer's pipeline written out: 160-px box crop, no margin, (x - 127.5) / 128, the network
    state = {k: v for k, v in torch.load(facenet_weights, weights_only=True).items() if not k.startswith("logits")}
    ref_net = InceptionResnetV1(pretrained=None).eval()
    ref_net.load_state_dict(state)
    crop = fixed_image_standardization(extract_face(Image.fromarray(img), faces[0].box, 160, 0))
    with torch.no_grad():
        expect = ref_net(crop[None])[0].numpy()
    np.testing.assert_allclose(faces[0].embedding, expect / np.linalg.norm(expect), atol=1e-5)


def test_facenet_refuses_other_files(tmp_path, no_torch_home):
    pytest.importorskip("facenet_pytorch", reason="pip install --no-deps facenet-pytorch")
    from instantfamily_nodes.evaluate.identity import make_encoder

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="cannot be read"):
        make_encoder("facenet", facenet_weights=junk)
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not InceptionResnetV1 weights"):
        make_encoder("facenet", facenet_weights=other)


# ---------------------------------------------------------------- insightface


def test_insightface_backend_through_the_scoring_path(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="insightface models run on onnxruntime")
    pytest.importorskip("insightface", reason="the insightface backend needs insightface")
    from instantfamily_nodes.evaluate.identity import detect_faces, encode_references, make_encoder
    from instantfamily_nodes.evaluate.score import score_image
    from instantfamily_nodes.models.faces import synthetic

    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # no ~/.insightface models leak in
    with pytest.raises(ModelFolderError, match="antelopev2' not found"):
        make_encoder("insightface", insightface_root=tmp_path / "empty")
    synthetic.make_model_pack(tmp_path / "insightface", "antelopev2")
    enc = make_encoder("insightface", insightface_root=tmp_path / "insightface")
    assert enc.name == "insightface/antelopev2"
    # the synthetic detector sees bright squares; random weights, so only the plumbing is checked:
    # a face scored against its own reference image gives exactly 1, two squares give two faces.
    refs = encode_references(enc, [synthetic.square_faces_image([(200, 240)]),
                                   synthetic.square_faces_image([(450, 240)])], ["a", "b"])
    gen = synthetic.square_faces_image([(200, 240), (450, 240)])
    faces = detect_faces(enc, gen, want=2)
    assert len(faces) == 2
    sc = score_image("g", [f.embedding for f in refs], [0, 1], faces)
    assert sc.missing == 0 and sc.multi_sim is not None


# ---------------------------------------------------------------- CLIP TextSim


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised CLIP (2 layers, width 32) with a byte-level tokenizer, saved as a folder."""
    tr = pytest.importorskip("transformers", reason="TextSim uses transformers' CLIP")
    from tokenizers import pre_tokenizers

    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in alpha:
            vocab[c + suffix] = len(vocab)
    tok = tr.CLIPTokenizer(vocab=vocab, merges=[])
    cfg = tr.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    tr.CLIPModel(cfg).save_pretrained(path)
    tr.CLIPProcessor(image_processor=tr.CLIPImageProcessor(), tokenizer=tok).save_pretrained(path)
    return path


def _by_hand(folder: Path, image: np.ndarray, prompt: str) -> float:
    """Eq. 9 from the towers themselves: CLIP's preprocessing written out (shortest side to 224,
    bicubic; centre crop; CLIP mean/std), pooled outputs through the projections, cosine."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    ids = CLIPTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    im = Image.fromarray(image)
    s = 224 / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
    left, top = (im.width - 224) // 2, (im.height - 224) // 2
    px = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    px = (px - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        t = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
        v = model.visual_projection(model.vision_model(pixel_values=torch.tensor(px, dtype=torch.float32)
                                                       .permute(2, 0, 1)[None]).pooler_output)[0]
    return float(t @ v / (t.norm() * v.norm()))


def test_textsim_matches_clip_by_hand(tiny_clip):
    from instantfamily_nodes.evaluate.textsim import load_textsim

    status = load_textsim(tiny_clip)
    assert status.scorer is not None and "not ViT-L/14" in status.message and "ViT-" in status.message
    img = _astronaut()
    prompts = ["a photo of an astronaut", "a bowl of soup on a table"]
    got = status.scorer([img, img], prompts)
    for g, p in zip(got, prompts):
        assert g == pytest.approx(_by_hand(tiny_clip, img, p), abs=2e-3)
    assert got[0] != pytest.approx(got[1], abs=1e-4)       # the prompt matters
    # batching does not change a pair's score
    assert status.scorer([img], prompts[1:])[0] == pytest.approx(got[1], abs=1e-5)
    with pytest.raises(EvaluationInputError, match="2 images but 1 prompts"):
        status.scorer([img, img], prompts[:1])


def test_textsim_absent_or_off_is_a_message(tmp_path):
    pytest.importorskip("transformers", reason="TextSim uses transformers' CLIP")
    from instantfamily_nodes.evaluate.textsim import DEFAULT_CLIP, load_textsim

    skipped = load_textsim(None, cache_dir=tmp_path / "empty_cache")
    assert skipped.scorer is None
    assert "TextSim skipped" in skipped.message and DEFAULT_CLIP in skipped.message and "--clip" in skipped.message
    assert load_textsim("none").scorer is None
    with pytest.raises(EvaluationInputError, match="no such folder"):
        load_textsim(tmp_path / "missing")
    (tmp_path / "notclip").mkdir()
    with pytest.raises(EvaluationInputError, match="not a usable CLIP folder"):
        load_textsim(tmp_path / "notclip")


def test_cli_with_clip_writes_text_sim(tiny_clip, tmp_path):
    pytest.importorskip("dlib", reason="the CLI's default face backend is dlib")
    import json

    from instantfamily_nodes.evaluate.__main__ import main

    img = _astronaut()
    (tmp_path / "refs").mkdir()
    (tmp_path / "gen").mkdir()
    Image.fromarray(img).save(tmp_path / "refs" / "collins.png")
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(tmp_path / "gen" / "0.png")
    (tmp_path / "prompts.json").write_text(json.dumps({"0.png": "an astronaut"}))
    assert main([str(tmp_path), "--clip", str(tiny_clip), "--no-sheet"]) == 0
    data = json.loads((tmp_path / "eval" / "scores.json").read_text())
    ts = data["images"][0]["text_sim"]
    assert ts == pytest.approx(_by_hand(tiny_clip, np.ascontiguousarray(img[:, ::-1]), "an astronaut"), abs=2e-3)
    assert data["summary"]["overall"]["text_sim"]["n"] == 1 and "TextSim: CLIP" in data["meta"]["text_sim"]
