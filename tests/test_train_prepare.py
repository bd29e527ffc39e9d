"""``train prepare`` on real photos (dlib) and generated ones (the synthetic insightface-shaped pack): every
written sample is decoded with train.shards and compared with a direct call of the face module on the same
resized photo; skipped files, reruns, rank splits, a truncated img2dataset tar and the VAE/CLIP caches."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantfamily_nodes.models.faces.encode import encode_faces
from instantfamily_nodes.train import prepare
from instantfamily_nodes.train.shards import Manifest, decode_sample

wds = pytest.importorskip("webdataset", reason="the [train] extra (webdataset) is not installed")

SITE = Path(np.__file__).resolve().parent.parent
PHOTOS = {
    "astronaut.png": SITE / "skimage" / "data" / "astronaut.png",
    "grace_hopper.jpg": SITE / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg",
    "t1.jpg": SITE / "insightface" / "data" / "images" / "t1.jpg",
}


def run_prepare(*argv) -> int:
    p = argparse.ArgumentParser()
    prepare.add_arguments(p)
    return prepare.run(p.parse_args([str(a) for a in argv] + ["--no-progress"]))


def read_samples(out: Path) -> dict[str, object]:
    """Every sample the manifest lists, decoded with the shard contract (webdataset reads the tars)."""
    manifest = Manifest.load(out)
    samples = {}
    for raw in wds.WebDataset(manifest.shard_paths(out), shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        samples[s.source] = s
    assert len(samples) == manifest.samples
    return samples


def report_rows(out: Path) -> list[dict]:
    with (out / "report.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def reference(path: Path, encoder, R: int):
    """Independent of prepare's code path: PIL resize (short side -> R), center crop, then the face module
    called directly on the resized photo; faces whose keypoints leave the crop are dropped."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        s = R / min(w, h)
        size = (R, round(h * s)) if w <= h else (round(w * s), R)
        a = np.asarray(im if size == (w, h) else im.resize(size, Image.Resampling.LANCZOS))
    ox, oy = (size[0] - R) // 2, (size[1] - R) // 2
    faces = encode_faces(encoder, a, faces_per_image="all")
    shift = np.array([ox, oy], np.float32)
    kept = [f for f in faces if ((f.kps - shift) >= 0).all() and ((f.kps - shift) <= R).all()]
    return a[oy:oy + R, ox:ox + R], kept, shift, len(faces) - len(kept)


def check_against_reference(sample, path: Path, encoder, R: int, local: bool) -> int:
    crop, faces, shift, cut = reference(path, encoder, R)
    np.testing.assert_array_equal(sample.image, crop)          # png: lossless, so exactly the training pixels
    assert sample.n_faces == len(faces) > 0
    np.testing.assert_allclose(sample.face_boxes, np.stack([f.box - np.tile(shift, 2) for f in faces]), atol=1e-4)
    np.testing.assert_allclose(sample.face_kps, np.stack([f.kps - shift for f in faces]), atol=1e-4)
    np.testing.assert_allclose(sample.face_embedding, np.stack([f.embedding for f in faces]), atol=2e-3)
    if local:
        ref = np.stack([f.local for f in faces])
        np.testing.assert_allclose(sample.face_local, ref, atol=2e-3 * float(np.abs(ref).max()))
    else:
        assert sample.face_local is None
    return cut


# ---------------------------------------------------------------- real photos, dlib

def pose_json(people_px: list[dict[int, tuple[float, float]]], w: int, h: int) -> list[dict]:
    """POSE_KEYPOINT, normalised, one frame; joints given in pixels of the source photo."""
    people = []
    for joints in people_px:
        flat = []
        for j in range(18):
            x, y = joints.get(j, (0.0, 0.0))
            flat += [float(x) / w, float(y) / h, 1.0 if j in joints else 0.0]
        people.append({"pose_keypoints_2d": flat})
    return [{"people": people, "canvas_width": w, "canvas_height": h}]


@pytest.fixture(scope="module")
def dlib_encoder():
    pytest.importorskip("dlib", reason="the dlib backend (pip install dlib-bin face_recognition_models) is not installed")
    from instantfamily_nodes.models.faces.dlib_backend import DlibEncoder

    return DlibEncoder()


def test_real_photos_dlib(tmp_path, dlib_encoder, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for name, path in PHOTOS.items():
        (src / name).write_bytes(path.read_bytes())
        (src / name).with_suffix(".txt").write_text(f"a photo of {name.split('.')[0]}\n")
    # the astronaut's head from dlib's own landmarks, as an OpenPose person in the photo's pixels
    ast = np.asarray(Image.open(PHOTOS["astronaut.png"]).convert("RGB"))
    f0 = encode_faces(dlib_encoder, ast, "all")[0]
    (src / "astronaut.pose.json").write_text(json.dumps(pose_json(
        [{0: tuple(f0.kps[2]), 14: tuple(f0.kps[1]), 15: tuple(f0.kps[0]), 1: (f0.center[0], f0.box[3] + 40)}],
        512, 512)))
    # bad inputs, each with its own reason
    (src / "broken.jpg").write_bytes(PHOTOS["t1.jpg"].read_bytes()[:4000])
    (src / "broken.txt").write_text("cut off mid-file")
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(src / "flat.png")
    (src / "flat.txt").write_text("no face at all")
    (src / "nocaption.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    Image.fromarray(ast[:100, :100]).save(src / "tiny.png")
    (src / "tiny.txt").write_text("too small")
    (src / "badpose.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    (src / "badpose.txt").write_text("a pose file with 5 numbers")
    (src / "badpose.pose.json").write_text(json.dumps([{"people": [{"pose_keypoints_2d": [1, 2, 3, 4, 5]}]}]))
    (src / "badcaption.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    (src / "badcaption.txt").write_bytes(b"\xff\xfe\xfa not utf-8")

    out = tmp_path / "shards"
    assert run_prepare("--input", src, "--out", out, "--face-encoder", "dlib", "--workers", 0,
                       "--image-format", "png", "--shard-size", 4) == 0
    assert "prepared 3 samples" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert (manifest.face_encoder, manifest.L, manifest.d_gf, manifest.d_lf) == ("dlib", 0, 128, 0)
    assert manifest.resolution == 512 and not manifest.has_local
    samples = read_samples(out)
    cut = {}
    for name in PHOTOS:
        s = samples[str(src / name)]
        assert s.caption == f"a photo of {name.split('.')[0]}"
        cut[name] = check_against_reference(s, src / name, dlib_encoder, 512, local=False)
    # t1 (1280x886, a group) loses faces to the square crop; they are counted and reported
    assert cut["t1.jpg"] > 0 and cut["astronaut.png"] == 0
    ast_s = samples[str(src / "astronaut.png")]
    assert ast_s.pose.shape == (1, 18, 3) and ast_s.face_person == [0]
    np.testing.assert_allclose(ast_s.pose[0, 0, :2], f0.kps[2], atol=1e-3)   # square photo: crop = photo
    assert samples[str(src / "t1.jpg")].pose.shape == (0, 18, 3)
    assert samples[str(src / "t1.jpg")].face_person == [-1] * samples[str(src / "t1.jpg")].n_faces

    rows = {Path(r["source"]).name: r for r in report_rows(out)}
    assert rows["broken.jpg"]["reason"] == "corrupt image"
    assert rows["flat.png"]["reason"] == "no face"
    assert rows["nocaption.png"]["reason"] == "missing caption"
    assert rows["tiny.png"]["reason"] == "too small"
    assert rows["badpose.png"]["reason"] == "invalid pose JSON"
    assert rows["badcaption.png"]["reason"] == "unreadable caption"
    assert {r["action"] for n, r in rows.items() if n not in PHOTOS} == {"skipped"}
    assert rows["t1.jpg"]["action"] == "kept" and f"{cut['t1.jpg']} face(s) dropped" in rows["t1.jpg"]["detail"]
    assert manifest.config["stats"]["faces_cut"] == cut["t1.jpg"]


# ---------------------------------------------------------------- generated photos, insightface-shaped pack

@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from instantfamily_nodes.models.faces import synthetic

    root = tmp_path_factory.mktemp("insightface")
    synthetic.make_model_pack(root, "antelopev2")
    return root


@pytest.fixture(scope="module")
def synthetic_encoder(synthetic_root):
    from instantfamily_nodes.models.faces.insightface_backend import InsightFaceEncoder, find_model_dir

    return InsightFaceEncoder(find_model_dir("antelopev2", [synthetic_root]), provider="CPU", name="antelopev2")


# Bright squares the synthetic detector reports as faces, in 640x480 photos (resized to 683x512, crop from
# x = 85): x = 620 lands at 576 in the crop, outside it.
LAYOUTS = [[(160, 200)], [(150, 240), (420, 220)], [(170, 160), (330, 300), (620, 200)], [(250, 250)],
           [(200, 120), (450, 330)]]


def generated_folder(folder: Path, n: int = 5, pose_for: tuple[int, ...] = ()) -> list[Path]:
    from instantfamily_nodes.models.faces.synthetic import square_faces_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        centers = LAYOUTS[i % len(LAYOUTS)]
        p = folder / f"gen{i:02d}.png"
        Image.fromarray(square_faces_image(centers, size=64, hw=(480, 640))).save(p)
        p.with_suffix(".txt").write_text(f"{len(centers)} people, picture {i}")
        if i in pose_for:
            people = [{0: (cx, cy), 14: (cx + 10, cy - 8), 15: (cx - 10, cy - 8), 1: (cx, cy + 70)} for cx, cy in centers]
            people.append({1: (300, 450), 2: (270, 450), 5: (330, 450)})   # a body without a head
            (folder / f"gen{i:02d}.pose.json").write_text(json.dumps(pose_json(people, 640, 480)))
        paths.append(p)
    return paths


def test_generated_photos_workers_local_maps_and_rerun(tmp_path, synthetic_root, synthetic_encoder, capsys):
    paths = generated_folder(tmp_path / "in", 5, pose_for=(2,))
    out = tmp_path / "out"
    args = ("--input", tmp_path / "in", "--out", out, "--face-encoder", "insightface/antelopev2",
            "--models-root", synthetic_root, "--provider", "CPU", "--image-format", "png", "--shard-size", 2)
    assert run_prepare(*args, "--workers", 2) == 0
    manifest = Manifest.load(out)
    assert (manifest.face_encoder, manifest.L, manifest.d_gf, manifest.d_lf) == ("insightface/antelopev2", 7, 64, 128)
    assert sorted(manifest.shards) == [f"shard-r000-{n:06d}.tar" for n in range(3)]
    samples = read_samples(out)
    assert sorted(samples) == sorted(str(p) for p in paths)
    for p in paths:
        check_against_reference(samples[str(p)], p, synthetic_encoder, 512, local=True)
        assert samples[str(p)].face_local.shape[1:] == (7, 7, 128)
    # picture 2: its third square (and that person) is cut off by the crop; the two other faces match the
    # two posed heads; the headless body stays in the pose without a face
    s2 = samples[str(paths[2])]
    assert s2.n_faces == 2 and s2.pose.shape == (3, 18, 3) and s2.face_person == [0, 1]
    assert manifest.config["stats"]["faces_cut"] == 1

    # a rerun skips finished shards; a shard lost since is written again, the others untouched
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.tar")}
    capsys.readouterr()
    assert run_prepare(*args, "--workers", 0) == 0
    assert "3 already finished" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.tar")} == mtimes
    (out / "shard-r000-000001.tar").unlink()
    assert run_prepare(*args, "--workers", 0) == 0
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.tar")}
    assert after["shard-r000-000000.tar"] == mtimes["shard-r000-000000.tar"]
    assert after["shard-r000-000002.tar"] == mtimes["shard-r000-000002.tar"]
    assert after["shard-r000-000001.tar"] != mtimes["shard-r000-000001.tar"]
    assert sorted(read_samples(out)) == sorted(samples)
    # a run killed mid-shard leaves a temp file (removed by the next run); one killed between the rename
    # and the part-file update leaves a finished shard the part does not list (counted from the tar)
    (out / ".shard-r000-000001.tar.999.tmp").write_bytes(b"half a shard")
    part = json.loads((out / "parts" / "r000.json").read_text())
    del part["shards"]["shard-r000-000002.tar"]
    (out / "parts" / "r000.json").write_text(json.dumps(part))
    assert run_prepare(*args, "--workers", 0) == 0
    assert not list(out.glob(".*.tmp"))
    assert Manifest.load(out).shards == {"shard-r000-000000.tar": 2, "shard-r000-000001.tar": 2,
                                         "shard-r000-000002.tar": 1}
    assert (out / "shard-r000-000002.tar").stat().st_mtime_ns == mtimes["shard-r000-000002.tar"]
    # the same folder with other settings is refused rather than mixed
    assert run_prepare(*args[:-1], 3, "--workers", 0) == 2
    assert "another plan" in capsys.readouterr().err
    assert run_prepare(*args[:-1], 3, "--workers", 0, "--overwrite") == 0
    assert Manifest.load(out).shards == {"shard-r000-000000.tar": 3, "shard-r000-000001.tar": 2}
    assert sorted(f.name for f in out.glob("shard-*.tar")) == ["shard-r000-000000.tar", "shard-r000-000001.tar"]


def test_rank_world_split_covers_every_input_once(tmp_path, synthetic_root, capsys):
    paths = generated_folder(tmp_path / "in", 7)
    out = tmp_path / "out"
    common = ("--input", tmp_path / "in", "--out", out, "--face-encoder", "insightface/antelopev2",
              "--models-root", synthetic_root, "--provider", "CPU", "--shard-size", 2, "--workers", 0)
    assert run_prepare(*common, "--rank", 1, "--world", 3) == 0
    assert not (out / "manifest.json").exists()            # ranks 0 and 2 have not finished
    assert run_prepare("--out", out, "--merge") == 2
    assert "ranks [0, 2] of 3 have not finished" in capsys.readouterr().err
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "2", "3"  # torchrun's variables
    try:
        assert run_prepare(*common) == 0
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert run_prepare(*common, "--rank", 0, "--world", 3) == 0   # the last rank merges
    manifest = Manifest.load(out)
    # inputs 0, 3, 6 -> rank 0 (two shards of 2), 1, 4 -> rank 1, 2, 5 -> rank 2
    assert manifest.shards == {"shard-r000-000000.tar": 2, "shard-r000-000001.tar": 1, "shard-r001-000000.tar": 2,
                               "shard-r002-000000.tar": 2}
    keys = []
    for raw in wds.WebDataset(manifest.shard_paths(out), shardshuffle=False, empty_check=False):
        keys.append(decode_sample(raw).source)
    assert sorted(keys) == sorted(str(p) for p in paths)     # each input exactly once
    assert run_prepare("--out", out, "--merge") == 0


def test_img2dataset_tar_truncated_mid_file(tmp_path, synthetic_root, synthetic_encoder):
    from instantfamily_nodes.models.faces.synthetic import square_faces_image

    tars = tmp_path / "tars"
    tars.mkdir()
    for t in range(2):
        with wds.TarWriter(str(tars / f"{t:05d}.tar")) as w:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(square_faces_image(LAYOUTS[i], 64, (480, 640))).save(buf, format="JPEG", quality=95)
                key = f"{t:05d}{i:04d}"
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"caption {key}".encode(),
                         "json": json.dumps({"url": f"http://x/{key}.jpg", "key": key, "status": "success"}).encode()})
    whole = (tars / "00001.tar").read_bytes()
    with tarfile.open(tars / "00001.tar") as tf:
        last_jpg = [m for m in tf if m.name.endswith(".jpg")][-1]
    (tars / "00001.tar").write_bytes(whole[:last_jpg.offset_data + last_jpg.size // 2])   # cut inside a photo

    out = tmp_path / "out"
    assert run_prepare("--input", tars, "--out", out, "--face-encoder", "insightface/antelopev2",
                       "--models-root", synthetic_root, "--provider", "CPU", "--workers", 0) == 0
    samples = read_samples(out)
    assert sorted(Path(k).name for k in samples) == ["00000.tar:000000000", "00000.tar:000000001",
                                                     "00000.tar:000000002", "00001.tar:000010000",
                                                     "00001.tar:000010001"]
    s = samples[f"{tars / '00000.tar'}:000000001"]
    assert s.caption == "caption 000000001" and s.n_faces == 2 and s.pose.shape == (0, 18, 3)
    rows = report_rows(out)
    assert any(r["source"] == str(tars / "00001.tar") and r["reason"] == "truncated tar" for r in rows)
    assert any(r["source"] == f"{tars / '00001.tar'}:000010002" and r["reason"] == "unreadable image" for r in rows)


def test_manifest_inputs(tmp_path, synthetic_root):
    paths = generated_folder(tmp_path / "imgs", 3)
    rows = [{"path": f"imgs/{p.name}", "caption": f"row {i}"} for i, p in enumerate(paths)]
    rows.append({"path": "imgs/missing.png", "caption": "gone"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    for name in ("m.jsonl", "m.csv"):
        out = tmp_path / f"out_{name}"
        assert run_prepare("--input", tmp_path / name, "--out", out, "--face-encoder", "insightface/antelopev2",
                           "--models-root", synthetic_root, "--provider", "CPU", "--workers", 0) == 0
        captions = sorted(s.caption for s in read_samples(out).values())
        assert captions == ["row 0", "row 1", "row 2"]     # the manifest's caption wins over the .txt
        assert [(r["reason"], Path(r["source"]).name) for r in report_rows(out) if r["action"] == "skipped"] == [
            ("file not found", "missing.png")]


def test_clear_errors(tmp_path, synthetic_root, capsys):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()   # through the real command line
    cli = subprocess.run([sys.executable, "-m", "instantfamily_nodes.train", "prepare", "--input", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "o1"), "--face-encoder", "dlib"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "no photos found" in cli.stderr, cli.stderr[-2000:]
    # photos, but no face in any of them: a non-zero exit that names the report
    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.fromarray(np.full((300, 300, 3), 40 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
        (tmp_path / "flat" / f"{i}.txt").write_text("nothing")
    out = tmp_path / "o2"
    assert run_prepare("--input", tmp_path / "flat", "--out", out, "--face-encoder", "insightface/antelopev2",
                       "--models-root", synthetic_root, "--provider", "CPU", "--workers", 0) == 1
    assert str(out / "report.csv") in capsys.readouterr().err
    assert [r["reason"] for r in report_rows(out)] == ["no face", "no face"]
    assert not (out / "manifest.json").exists()
    assert run_prepare("--input", tmp_path / "flat", "--out", tmp_path / "o3", "--face-encoder",
                       "insightface/nopack", "--models-root", synthetic_root) == 2
    assert "insightface model 'nopack' not found" in capsys.readouterr().err
    assert run_prepare("--input", tmp_path / "flat", "--out", tmp_path / "o4", "--face-encoder", "dlib",
                       "--workers", 0, "--captioner", tmp_path / "no_such_model") == 2
    assert "--captioner" in capsys.readouterr().err
    assert run_prepare("--input", tmp_path / "flat", "--out", tmp_path / "o7", "--face-encoder", "dlib",
                       "--workers", 0, "--openpose", tmp_path / "no_weights") == 2
    assert "body_pose_model.pth" in capsys.readouterr().err
    (tmp_path / "fake_model").mkdir()
    (tmp_path / "fake_model" / "config.json").write_text("{}")
    assert run_prepare("--input", tmp_path / "flat", "--out", tmp_path / "o5", "--face-encoder", "dlib",
                       "--workers", 0, "--captioner", tmp_path / "fake_model") == 2
    assert "cannot load an image-to-text model" in capsys.readouterr().err
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    code = run_prepare("--input", tmp_path / "m.parquet", "--out", tmp_path / "o6", "--workers", 0,
                       "--face-encoder", "dlib")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert code == 2 and "needs pyarrow" in capsys.readouterr().err


# ---------------------------------------------------------------- VAE latents and CLIP text embeddings

def test_latent_and_text_caches_tiny_checkpoint(tmp_path_factory, comfyui, capsys):
    from instantfamily_nodes.demo.tiny import build_tiny_models, register_tiny_model_type

    register_tiny_model_type()
    tiny = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    tmp = tmp_path_factory.mktemp("caches")
    paths = generated_folder(tmp / "in", 3)
    ckpt = tiny.root / "checkpoints" / tiny.checkpoint
    out = tmp / "out"
    assert run_prepare("--input", tmp / "in", "--out", out, "--face-encoder", "insightface/antelopev2",
                       "--models-root", tiny.root / "insightface", "--provider", "CPU", "--workers", 0,
                       "--resolution", 256, "--min-size", 256, "--image-format", "png", "--checkpoint", ckpt,
                       "--cache-latents", "--cache-text", "--batch-size", 2) == 0
    manifest = Manifest.load(out)
    assert manifest.has_latents and manifest.has_text_embeddings and manifest.resolution == 256
    assert manifest.versions.get("comfyui")

    # the reference: ComfyUI's own checkpoint loader, as the Load Checkpoint / VAE Encode / CLIP Text Encode
    # nodes run it, on the decoded (lossless) training image
    import comfy.sd
    import torch

    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
    samples = read_samples(out)
    assert len(samples) == len(paths)
    with torch.no_grad():
        for s in samples.values():
            assert s.image.shape == (256, 256, 3)
            assert s.latent.shape == (4, 32, 32) and s.text_embedding.shape == (77, 768)
            ref = vae.encode(torch.from_numpy(s.image[None].copy()).float() / 255.0)[0].float().numpy()
            np.testing.assert_allclose(s.latent, ref, atol=2e-3 * float(np.abs(ref).max()) + 1e-4)
            text = clip.encode_from_tokens(clip.tokenize(s.caption))[0].float().numpy()
            np.testing.assert_allclose(s.text_embedding, text, atol=2e-3 * float(np.abs(text).max()) + 1e-4)

    # a checkpoint that is not SD1.5 (a ControlNet file) is refused with a clear message
    assert run_prepare("--input", tmp / "in", "--out", tmp / "o2", "--face-encoder", "dlib", "--workers", 0,
                       "--checkpoint", tiny.root / "controlnet" / tiny.controlnet, "--cache-latents") == 2
    assert "not SD1.5" in capsys.readouterr().err


# ---------------------------------------------------------------- captions from a local captioner

def tiny_captioner(folder: Path) -> Path:
    """A BLIP-shaped image-to-text model (transformers' own classes, tiny, random) saved with save_pretrained;
    its LM bias makes it say 'two smiling people' whatever the image."""
    transformers = pytest.importorskip("transformers", reason="transformers (the [eval] extra) is not installed")
    import torch

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "people", "two", "smiling", "[DEC]"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    cfg = transformers.BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=11, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # position-dependent bias would need more layers; a fixed preference is enough here
        model.text_decoder.cls.predictions.bias[words.index("smiling")] = 50.0
    model.save_pretrained(str(folder))
    transformers.BlipProcessor(image_processor=transformers.BlipImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=tok).save_pretrained(str(folder))
    return folder


def test_captioner_fills_missing_captions(tmp_path, synthetic_root):
    import transformers

    model_dir = tiny_captioner(tmp_path / "blip")
    paths = generated_folder(tmp_path / "in", 2)
    for p in paths:
        p.with_suffix(".txt").unlink()
    out = tmp_path / "out"
    assert run_prepare("--input", tmp_path / "in", "--out", out, "--face-encoder", "insightface/antelopev2",
                       "--models-root", synthetic_root, "--provider", "CPU", "--workers", 0,
                       "--captioner", model_dir, "--image-format", "png") == 0
    samples = read_samples(out)
    assert len(samples) == 2
    # reference: transformers' own processor + generate on the stored training image
    proc = transformers.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True).eval()
    for s in samples.values():
        ids = model.generate(**proc(images=[Image.fromarray(s.image)], return_tensors="pt"), max_new_tokens=40)
        assert s.caption == proc.batch_decode(ids, skip_special_tokens=True)[0].strip()
        assert s.caption.startswith("smiling")
