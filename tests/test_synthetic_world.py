"""The synthetic world: reproducible identities and scenes, its detector through insightface's own SCRFD
decoding, and its recognition net through the pack's normal insightface path (models/faces)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from instantfamily_nodes.synthetic.world import (FACE_MIN_MAX_CHANNEL, MIN_ATTRIBUTE_DISTANCE, SCENE_MAX_CHANNEL,
                                                 World, canvas_for, face_kps)

SIZES = [(128, 128), (96, 160), (256, 256)]


def _face_mask(scene) -> np.ndarray:
    m = np.zeros(scene.hw, bool)
    for x0, y0, x1, y1 in scene.boxes.astype(int):
        m[y0:y1, x0:x1] = True
    return m


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_scenes_are_reproducible_and_splits_differ():
    a = World(24, seed=3).scene(4, (128, 128), "train", 7)
    b = World(24, seed=3).scene(4, (128, 128), "train", 7)
    assert np.array_equal(a.image, b.image) and a.identities == b.identities and a.caption == b.caption
    c = World(24, seed=3).scene(4, (128, 128), "test", 7)
    assert not np.array_equal(a.image, c.image)
    other_world = World(24, seed=4).scene(4, (128, 128), "train", 7)
    assert not np.array_equal(a.image, other_world.image)


def test_identities_differ_in_several_attributes_not_one_colour():
    world = World(32, seed=0)
    attrs = lambda i: (i.skin, i.hair if i.hair_style != "none" else None, i.hair_style, i.pattern,  # noqa: E731
                       i.eyes)
    for p, q in itertools.combinations(world.identities, 2):
        diff = sum(x != y for x, y in zip(attrs(p), attrs(q)))
        assert diff >= MIN_ATTRIBUTE_DISTANCE, (p.index, q.index)
    # more identities than skin colours: identity is not the colour
    assert len({i.skin for i in world.identities}) < len(world.identities)


def test_appearances_of_one_identity_vary():
    world = World()
    tiles = [world.render_face(5, 24, 30, world.rng("train", i)).astype(float) for i in range(4)]
    for t1, t2 in itertools.combinations(tiles, 2):
        assert np.abs(t1 - t2).mean() > 3.0


@pytest.mark.parametrize("hw", SIZES)
def test_brightness_contract_and_pose_boxes(hw):
    from instantfamily_nodes.pose.faceboxes import face_boxes_from_pose

    world = World()
    for n in range(1, 8):
        scene = world.scene(n, hw, "test", n)
        face = _face_mask(scene)
        peak = scene.image.max(-1)
        assert peak[face].min() > FACE_MIN_MAX_CHANNEL
        assert peak[~face].max() < SCENE_MAX_CHANNEL
        assert len(scene.people) == n == len(set(scene.identities))
        est = np.array(face_boxes_from_pose(scene.people, scene.hw))
        # the pose's head keypoints give back the world's box (height rounded to whole pixels)
        assert np.abs(est - scene.boxes).max() <= 0.51, (n, est, scene.boxes)
        x0s = scene.boxes[:, 0]
        assert np.all(np.diff(x0s) > 0)                         # left to right
        gaps = scene.boxes[1:, 0] - scene.boxes[:-1, 2]
        assert np.all(gaps >= 3)                               # faces never touch


def test_control_image_from_the_pack_renderer_has_id_circles():
    from instantfamily_nodes.palette import id_color
    from instantfamily_nodes.pose.render import render_control

    scene = World().scene(3, (128, 128), "test", 1)
    control = render_control(scene.people, [0, 1, 2], scene.hw)
    for i, (x0, y0, x1, y1) in enumerate(scene.boxes):
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        assert tuple(control[cy, cx]) == id_color(i)


def test_keypoints_align_the_box_height_square():
    from instantfamily_nodes.models.faces.base import aligned_crop
    from instantfamily_nodes.synthetic.recognizer import _fast_crop

    scene = World().scene(2, (256, 256), "test", 3)
    for box, kps in zip(scene.boxes, scene.kps):
        assert np.allclose(kps, face_kps(box))
        crop = aligned_crop(scene.image, kps, 112)
        # insightface's norm_crop maps the square of side = box height onto the crop: the face tile fills
        # the middle 112 * w / h columns
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        inner = int(56 * w / h) - 3
        assert crop[4:-4, 56 - inner:56 + inner].max(-1).min() > FACE_MIN_MAX_CHANNEL - 10
        assert np.abs(crop.astype(int) - _fast_crop(scene.image, box, None)).max() <= 1


def test_bad_inputs_are_named():
    world = World()
    with pytest.raises(ValueError, match="n_people"):
        world.scene(0)
    with pytest.raises(ValueError, match="too small"):
        world.scene(7, (64, 64))
    with pytest.raises(ValueError, match="identities"):
        world.scene(2, identities=[1, 1])
    with pytest.raises(ValueError, match="split"):
        world.scene(2, split="val")


def test_canvas_for_widens_only_what_the_square_cannot_hold():
    """Faces are 0.6 of a person's slot (canvas width / N) and at least 8 px: on 128 px, 9 people get
    0.6 * 128 / 9 = 8.5 px (square), 10 get 7.7, so 10 go on the next width in steps of 64: 192 (11.5 px);
    on 64 px 4 people get 9.6 px (square), 5 get 7.7 and go on 128 (15.4)."""
    assert [canvas_for(n, 128) for n in range(1, 10)] == [(128, 128)] * 9
    assert canvas_for(10, 128) == (128, 192)
    assert canvas_for(4, 64) == (64, 64) and canvas_for(5, 64) == (64, 128) and canvas_for(10, 64) == (64, 192)
    scene = World().scene(10, canvas_for(10, 128), "test", 3)
    assert scene.hw == (128, 192) and len(scene.boxes) == 10
    widths = scene.boxes[:, 2] - scene.boxes[:, 0]
    assert widths.min() >= 0.93 * 0.6 * 192 / 10 - 1 and widths.max() <= 1.07 * 0.6 * 192 / 10 + 1
    assert canvas_for(2, 100) == (100, 100)           # fits: any square
    with pytest.raises(ValueError, match="multiple of 64"):
        canvas_for(10, 100)
    with pytest.raises(ValueError, match="n_people"):
        canvas_for(11, 128)
    with pytest.raises(ValueError, match="at least 64"):
        canvas_for(1, 32)           # 0.24 * 32 = 7.7 px: no width helps


def test_bench_ns_are_checked_against_size_and_identities():
    from instantfamily_nodes.synthetic.world import check_bench_ns

    assert check_bench_ns("1,2,3,4,7,10", 128, 24) == [1, 2, 3, 4, 7, 10]
    with pytest.raises(ValueError, match=r"ns='2,10'.*multiple of 64"):
        check_bench_ns("2,10", 96, 24)
    with pytest.raises(ValueError, match=r"ns='1,10'.*10 distinct identities.*has 8"):
        check_bench_ns("1,10", 128, 8)
    with pytest.raises(ValueError, match=r"ns='1,x'"):
        check_bench_ns("1,x", 128, 24)


# ---------------------------------------------------------------- the face pack through models/faces

@pytest.fixture(scope="module")
def world_pack(tmp_path_factory):
    """A CI-sized recognizer (~35 s on one shared core) exported as an insightface-shaped pack."""
    from instantfamily_nodes.synthetic.recognizer import export_pack, train_recognizer

    world = World(16, seed=0)
    trained = train_recognizer(world, steps=120, train_size=2000, test_size=600, threads=1, log_every=0)
    root = tmp_path_factory.mktemp("world_models")
    folder = export_pack(trained, world, root, "synthetic_world")
    return world, trained, root, folder


def _encoder(root, folder):
    from instantfamily_nodes.models.faces import InsightFaceEncoder
    from instantfamily_nodes.models.faces.insightface_backend import find_model_dir

    assert find_model_dir("synthetic_world", [root]) == folder
    return InsightFaceEncoder(folder, provider="CPU", cache_dir=root / "cache")


def test_detector_boxes_world_faces_through_insightface(world_pack):
    from instantfamily_nodes.models.faces.encode import detect_with_ladder

    world, _, root, folder = world_pack
    enc = _encoder(root, folder)
    worst = 1.0
    for hw in SIZES:
        for n in range(1, 8):
            scene = world.scene(n, hw, "test", 50 + n)
            search = detect_with_ladder(enc, scene.image, 0, 1)
            assert search.offset == (0, 0)                 # found at a ladder rung, not the padded retry
            dets = sorted(search.dets, key=lambda d: d.box[0])
            assert len(dets) == n, (hw, n)
            for d, gt, gk in zip(dets, scene.boxes, scene.kps):
                worst = min(worst, _iou(d.box, gt))
                assert np.abs(d.kps - gk).max() < 0.06 * (gt[3] - gt[1])
    assert worst >= 0.9, worst
    # bodies and background alone: nothing
    scene = world.scene(4, (128, 128), "test", 9)
    blank = scene.image.copy()
    blank[_face_mask(scene)] = 40
    assert enc.detect(blank, 640) == []


def test_recognizer_through_the_pack_path(world_pack):
    from instantfamily_nodes.models.faces import encode_faces
    from instantfamily_nodes.synthetic.recognizer import aligned_crops, classify, embed, load_classes

    world, trained, root, folder = world_pack
    classes, meta = load_classes(folder)
    assert classes.shape == (16, 64) and meta["identities"] == "16"
    assert trained.heldout_accuracy > 0.9, trained.heldout_accuracy     # chance is 1/16
    enc = _encoder(root, folder)
    correct = total = 0
    for i in range(12):
        scene = world.scene(1 + i % 4, (128, 128), "test", 300 + i)
        faces = encode_faces(enc, scene.image)
        assert len(faces) == len(scene.identities)
        emb = np.stack([f.embedding for f in faces])
        assert faces[0].local.shape == (7, 7, 128)
        # the ONNX graph (edited to expose the map) gives the torch net's embedding on the same crops
        ref = embed(trained.net, aligned_crops(scene.image, np.stack([f.kps for f in faces])))
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        assert np.abs(emb - ref).max() < 1e-3
        pred = classify(emb, classes)
        correct += int((pred == np.array(scene.identities)).sum())
        total += len(pred)
    assert correct / total > 0.9, (correct, total)


def test_recognizer_with_a_4x4_map_gives_17_tokens_through_the_pack_path(tmp_path):
    """map_side=4: the pack's ONNX edit exposes a 4 x 4 map (the torch net's, exactly), and the pack
    records it; other sides are refused."""
    from instantfamily_nodes.models.faces import encode_faces
    from instantfamily_nodes.synthetic.recognizer import (
        aligned_crops,
        embed,
        export_pack,
        load_classes,
        train_recognizer,
    )

    world = World(6, seed=1)
    trained = train_recognizer(world, steps=20, train_size=300, test_size=60, threads=1, log_every=0, map_side=4)
    folder = export_pack(trained, world, tmp_path, "synthetic_world")
    assert load_classes(folder)[1]["map_side"] == "4"
    enc = _encoder(tmp_path, folder)
    scene = world.scene(2, (128, 128), "test", 7)
    faces = encode_faces(enc, scene.image)
    grabbed = {}
    trained.net.bn2.register_forward_hook(lambda m, i, o: grabbed.__setitem__("map", o))
    embed(trained.net, aligned_crops(scene.image, np.stack([f.kps for f in faces])))
    ref = grabbed["map"].numpy().transpose(0, 2, 3, 1)
    assert [f.local.shape for f in faces] == [(4, 4, 128)] * 2
    np.testing.assert_allclose(np.stack([f.local for f in faces]), ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"map_side = 5: use one of \(7, 4\)"):
        train_recognizer(world, steps=1, train_size=10, test_size=10, map_side=5)


def test_score_positions_finds_identities_where_they_were_put(world_pack):
    from instantfamily_nodes.synthetic.recognizer import load_classes
    from instantfamily_nodes.synthetic.score import score_positions

    world, _, root, folder = world_pack
    classes, _ = load_classes(folder)
    enc = _encoder(root, folder)
    scenes = [world.scene(4, (128, 128), "test", 400 + i) for i in range(6)]
    right = score_positions(enc, classes, [s.image for s in scenes], [s.boxes for s in scenes],
                            [s.identities for s in scenes])
    assert right.accuracy("n") >= 0.9 and right.accuracy("k") > 0.9
    # the same pictures scored as if every identity had been asked one place to the right: the faces
    # are where they were drawn, so the measurement must call them misplaced
    shifted = score_positions(enc, classes, [s.image for s in scenes], [s.boxes for s in scenes],
                              [s.identities[1:] + s.identities[:1] for s in scenes])
    assert shifted.accuracy("n") <= 0.1


def test_picture_scores_give_evaluate_numbers_by_place(world_pack):
    """evaluate/'s SingleSim, MultiSim and greedy-min on world renders, with the world's detector and net:
    every face found and matched to its place; against each person's own portrait the identity term is
    high and MultiSim (eq. 11) equals it plus the mean pairwise (1 - cos) of the found faces; asked one
    place to the right, the place-matched identity term falls while FastComposer's greedy-min, which
    ignores places, stays the same."""
    from itertools import combinations

    from instantfamily_nodes.synthetic.score import picture_scores, reference_embeddings

    world, _, root, folder = world_pack
    enc = _encoder(root, folder)
    for i in range(3):
        scene = world.scene(3, (128, 128), "test", 500 + i)
        refs = reference_embeddings(enc, [world.portrait(p, (128, 128), "reference", i).image for p in scene.identities])
        right = picture_scores(enc, refs, scene.image, scene.boxes)
        assert right.missing == 0 and len(right.faces) == 3
        for box, a in zip(scene.boxes, right.assignment):     # each ID got the face drawn in its box
            cx, cy = (right.faces[a].box[:2] + right.faces[a].box[2:]) / 2
            assert box[0] < cx < box[2] and box[1] < cy < box[3]
        gens = [right.faces[a].embedding for a in right.assignment]
        cos = [float(np.dot(r, g) / np.linalg.norm(r) / np.linalg.norm(g)) for r, g in zip(refs, gens)]
        mix = np.mean([1 - np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in combinations(gens, 2)])
        assert right.single_sim == pytest.approx(cos, abs=1e-6) and min(cos) > 0.5
        assert right.multi_sim == pytest.approx(np.mean(cos) + mix, abs=1e-6)
        shifted = picture_scores(enc, refs[1:] + refs[:1], scene.image, scene.boxes)
        assert shifted.identity < right.identity - 0.3
        assert shifted.fastcomposer == pytest.approx(right.fastcomposer, abs=1e-6)


def test_world_scenes_through_train_prepare(world_pack, tmp_path):
    """World scenes -> `train prepare` with the world's pack: every face found, encoded with its local
    map, boxed where the world put it and matched to its own person."""
    import webdataset as wds

    from instantfamily_nodes.synthetic.dataset import write_prepare_input
    from instantfamily_nodes.train.__main__ import main as train_main
    from instantfamily_nodes.train.shards import Manifest, decode_sample

    world, _, root, _ = world_pack
    write_prepare_input(world, tmp_path / "scenes", 8, (128, 128), people=(1, 2, 3, 4))
    rc = train_main(["prepare", "--input", str(tmp_path / "scenes"), "--out", str(tmp_path / "shards"),
                     "--resolution", "128", "--min-size", "64", "--face-encoder", "insightface/synthetic_world",
                     "--models-root", str(root), "--workers", "1", "--no-progress", "--image-format", "png"])
    assert rc == 0
    manifest = Manifest.load(tmp_path / "shards")
    assert (manifest.L, manifest.d_gf, manifest.d_lf, manifest.samples) == (7, 64, 128, 8)
    seen = 0
    for raw in wds.WebDataset(manifest.shard_paths(tmp_path / "shards"), shardshuffle=False):
        sample = decode_sample(raw)
        i = int(sample.key.rsplit("_", 1)[-1])
        scene = world.scene((1, 2, 3, 4)[i % 4], (128, 128), "train", i)
        assert np.array_equal(sample.image, scene.image)
        assert sample.face_person == list(range(len(scene.identities)))
        assert np.abs(sample.face_boxes - scene.boxes).max() < 1.0
        assert sample.face_local.shape == (len(scene.identities), 7, 7, 128)
        assert sample.pose.shape == (len(scene.identities), 18, 3)
        seen += 1
    assert seen == 8


def test_bench_harness_runs_through_comfyui(world_pack, comfyui, tmp_path):
    """bench/synthetic.py --quick: world refs and pose through the pack's nodes in ComfyUI's executor,
    on untrained tiny models (so only the plumbing and the result format are checked, not accuracy)."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import PACK_ROOT

    _, _, _, folder = world_pack
    shutil.copytree(folder, tmp_path / "bench_models" / "insightface" / "models" / "synthetic_world")
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "synthetic.py"), "--quick", "--identities", "16",
                           "--cache", str(tmp_path), "--out", str(out), "--comfyui", str(comfyui)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["untrained"] is True
    assert set(s["accuracy_masked"]) == set(s["accuracy_unmasked"]) == set(s["masked_minus_unmasked"]) == {"1", "2", "10"}
    assert s["accuracy_masked"]["1"] == 1.0          # one identity: among-N is trivially right
    assert len(data["per_position"]["masked"]["2"]["asked"][0]) == 2
    assert len(data["per_position"]["masked"]["10"]["asked"][0]) == 10
    # 10 people do not fit the 128 px square: the bench drew, sampled and scored them on 128 x 192
    assert data["canvas"] == {"1": [128, 128], "2": [128, 128], "10": [128, 192]}
    # evaluate/'s numbers for every variant and N (MultiSim is undefined for one ID)
    for key in ("multi_sim", "fastcomposer", "single_sim", "face_missing_rate"):
        assert set(s[key]) == {"masked", "unmasked", "vae_roundtrip"}
        assert all(set(v) == {"1", "2", "10"} for v in s[key].values())
    assert s["multi_sim"]["masked"]["1"] is None            # undefined for one ID, as evaluate/ reports it
    from PIL import Image

    sizes = {Image.open(f).size for f in (tmp_path / "bench_run" / "output" / "world").glob("image_*.png")}
    assert sizes == {(128, 128), (192, 128)}
    assert out.with_suffix(".png").is_file()


def test_scenes_sheet_shows_each_scene_above_its_control_image(tmp_path):
    from instantfamily_nodes.palette import id_color
    from instantfamily_nodes.synthetic.__main__ import main
    from instantfamily_nodes.synthetic.sheet import GAP, scenes_sheet

    world = World()
    sheet = scenes_sheet(world, (1, 3), 96)
    assert sheet.shape == (2 * 96 + GAP, 2 * 96 + GAP, 3)
    scene = world.scene(3, (96, 96), "test", 1)                  # column 2: index 1
    assert np.array_equal(sheet[:96, 96 + GAP:], scene.image)
    control = sheet[96 + GAP:, 96 + GAP:]
    for i, (x0, y0, x1, y1) in enumerate(scene.boxes):
        assert tuple(control[int((y0 + y1) / 2), int((x0 + x1) / 2)]) == id_color(i)
    with pytest.raises(ValueError, match="ns"):
        scenes_sheet(world, ())
    assert main(["sheet", "--out", str(tmp_path / "s.png"), "--people", "2", "--size", "64"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (64, 2 * 64 + GAP)
