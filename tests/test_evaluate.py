"""Evaluation: metrics against hand computations, matching, and the whole path on real photos (dlib).

Photos ship with installed packages: skimage's astronaut (Eileen Collins), matplotlib's grace_hopper,
insightface's t1.jpg (six people). "Generated" images are built from them: flipped, rescaled, pasted
side by side, or with a face left out, so the right answer is known.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from instantfamily_nodes.evaluate import EvaluationInputError
from instantfamily_nodes.evaluate.matching import (box_overlap, match_by_regions, match_greedy,
                                                   region_from_spec)
from instantfamily_nodes.evaluate.metrics import (cosine_matrix, fastcomposer_score, greedy_match, mixing_term,
                                                  multi_sim, single_sims)


def unit(deg: float) -> np.ndarray:
    r = math.radians(deg)
    return np.array([math.cos(r), math.sin(r)])


# ---------------------------------------------------------------- metrics, by hand


def test_single_sim_is_cosine_and_missing_is_zero():
    refs = [unit(0), unit(90)]
    assert single_sims(refs, [unit(60), None]) == pytest.approx([0.5, 0.0])
    # scale does not matter: cosine of the directions
    assert single_sims([3 * unit(0)], [0.2 * unit(0)]) == pytest.approx([1.0])


def test_multi_sim_is_eq_11_for_two_ids():
    a, b = unit(0), unit(90)
    a_gen, b_gen = unit(30), unit(100)          # cos 30 deg, cos 10 deg; the two generated faces 70 deg apart
    identity, mixing, ms = multi_sim([a, b], [a_gen, b_gen])
    expect = (math.cos(math.radians(30)) + math.cos(math.radians(10))) / 2 + (1 - math.cos(math.radians(70)))
    assert ms == pytest.approx(expect)
    assert identity + mixing == pytest.approx(ms)


def test_multi_sim_generalises_to_three_and_four_ids():
    refs = [unit(0), unit(90), unit(180), unit(270)]
    gens = [unit(10), unit(80), unit(200), unit(270)]
    c = lambda d: math.cos(math.radians(d))  # noqa: E731
    # N = 3: identity mean over 3 IDs, mixing mean over the 3 pairs (70, 190->170, 120 degrees apart)
    _, mix3, ms3 = multi_sim(refs[:3], gens[:3])
    assert mix3 == pytest.approx(((1 - c(70)) + (1 - c(170)) + (1 - c(120))) / 3)
    assert ms3 == pytest.approx((c(10) + c(10) + c(20)) / 3 + mix3)
    # N = 4: 6 pairs
    _, mix4, ms4 = multi_sim(refs, gens)
    angles = [70, 170, 100, 120, 170, 70]   # 10-80, 10-200, 10-270, 80-200, 80-270, 200-270
    assert mix4 == pytest.approx(sum(1 - c(d) for d in angles) / 6)
    assert ms4 == pytest.approx((c(10) + c(10) + c(20) + c(0)) / 4 + mix4)
    # one ID: no pairs, no MultiSim
    assert multi_sim(refs[:1], gens[:1])[2] is None and mixing_term([gens[0]]) is None


def test_identical_generated_faces_are_penalised_and_a_missing_face_never_helps():
    a, b = unit(0), unit(90)
    # the same face generated twice (identity mixing): the mixing term is 0
    assert multi_sim([a, b], [unit(45), unit(45)])[1] == pytest.approx(0.0, abs=1e-9)
    present = multi_sim([a, b], [unit(0), unit(80)])[2]
    missing = multi_sim([a, b], [unit(0), None])[2]
    assert missing == pytest.approx(0.5)          # (1 + 0)/2 + 0: the pair with a missing face adds 0
    assert missing < present


def test_greedy_match_takes_the_best_pair_first():
    # Greedy is not optimal: it takes (0, 0) = 0.9 first, leaving (1, 1) = 0.1; the optimum would be
    # (0, 1) + (1, 0) = 0.8 + 0.8. FastComposer's protocol is greedy, so this must stay greedy.
    sim = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert greedy_match(sim) == [(0, 0), (1, 1)]
    assert fastcomposer_score([unit(0), unit(90)], [unit(0), unit(0)]) == pytest.approx(0.0)  # cos 90 = 0
    # rectangular: more faces than references
    assert sorted(greedy_match(np.array([[0.1, 0.7, 0.3], [0.2, 0.6, 0.9]]))) == [(0, 1), (1, 2)]


def test_fastcomposer_score_is_min_of_matches_and_zero_when_a_face_is_missing():
    refs = [unit(0), unit(90)]
    assert fastcomposer_score(refs, [unit(95), unit(20)]) == pytest.approx(math.cos(math.radians(20)))
    assert fastcomposer_score(refs, [unit(0)]) == 0.0
    assert fastcomposer_score(refs, [unit(180), unit(270)]) == 0.0   # negative similarity clipped at 0


def test_cosine_matrix_refuses_mixed_backends():
    with pytest.raises(ValueError, match="different face backends"):
        cosine_matrix(np.ones((1, 128)), np.ones((1, 512)))


# ---------------------------------------------------------------- matching by regions


def test_regions_from_boxes_points_and_normalised_coordinates():
    r = region_from_spec([10, 20, 30, 60], (100, 200), "box")
    assert r.sum() == 20 * 40 and r[20, 10] and not r[19, 10] and not r[20, 30]
    rn = region_from_spec([0.05, 0.2, 0.15, 0.6], (100, 200), "box")    # same box, normalised
    assert (rn == r).all()
    p = region_from_spec([0.5, 0.5], (100, 200), "point")
    assert p.sum() == 1 and p[50, 100]
    # values <= 1 are read as pixels when the manifest says so
    assert region_from_spec([0, 0, 1, 1], (100, 200), "b", coords="pixels").sum() == 1
    with pytest.raises(EvaluationInputError, match="empty"):
        region_from_spec([5, 5, 5, 9], (100, 200), "manifest image 3: boxes[0]", coords="pixels")
    with pytest.raises(EvaluationInputError, match="4 numbers"):
        region_from_spec([1, 2, 3], (100, 200), "manifest image 0: boxes[1]")


def test_overlap_and_hungarian_assignment():
    size = (100, 200)
    left = region_from_spec([0, 0, 100, 100], size, "l")
    right = region_from_spec([100, 0, 200, 100], size, "r")
    boxes = [[120, 20, 160, 60], [20, 20, 60, 60], [95, 90, 105, 100]]
    assert box_overlap(boxes[0], right) == 1.0 and box_overlap(boxes[0], left) == 0.0
    assert box_overlap(boxes[2], left) == pytest.approx(0.5)
    assert match_by_regions(boxes, [left, right]) == [1, 0]
    # an ID whose region holds no face is missing, even when another face is left over
    far = region_from_spec([0, 0, 10, 10], size, "far")
    assert match_by_regions([boxes[0]], [far, right]) == [None, 0]
    # a point inside two overlapping boxes goes to the box whose centre is nearer
    pt = region_from_spec([50, 50], size, "p", coords="pixels")
    assert match_by_regions([[0, 0, 120, 120], [30, 30, 70, 70]], [pt]) == [1]


# ---------------------------------------------------------------- real photos, dlib

dlib = pytest.importorskip("dlib", reason="the offline face backend needs dlib-bin")
pytest.importorskip("insightface", reason="face alignment uses insightface.utils.face_align")
from PIL import Image  # noqa: E402


def _site(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        pytest.skip(f"{pkg} is not installed; it ships a test photo")
    return Path(list(spec.submodule_search_locations)[0])


def _photo(path: Path) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"test photo {path} is not installed")
    return np.asarray(Image.open(path).convert("RGB"))


def _fit(a: np.ndarray, h: int) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(im.resize((round(im.width * h / im.height), h), Image.BICUBIC))


@pytest.fixture(scope="module")
def enc():
    from instantfamily_nodes.evaluate.identity import make_encoder

    return make_encoder("dlib")   # the scoring defaults (detection threshold 0.1)


@pytest.fixture(scope="module")
def astronaut():
    return _photo(_site("skimage") / "data" / "astronaut.png")


@pytest.fixture(scope="module")
def grace():
    import matplotlib

    return _photo(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def group():
    return _photo(_site("insightface") / "data" / "images" / "t1.jpg")


@pytest.fixture(scope="module")
def pair(astronaut, grace):
    """'Generated' image: astronaut (flipped) left, Grace Hopper right, 400 px high."""
    a, g = _fit(astronaut[:, ::-1], 400), _fit(grace, 400)
    return np.concatenate([a, g], 1), a.shape[1]


@pytest.fixture(scope="module")
def refs(enc, astronaut, grace):
    from instantfamily_nodes.evaluate.identity import encode_references

    return encode_references(enc, [astronaut, grace], ["astronaut.png", "grace_hopper.jpg"])


@pytest.fixture(scope="module")
def group_setup(enc, group):
    """The six faces of t1.jpg (left to right) and references cut from around each face, mirrored
    and scaled 2x: the same people, other pixels."""
    from instantfamily_nodes.evaluate.identity import detect_faces, encode_references

    faces = sorted(detect_faces(enc, group, want=6), key=lambda f: f.box[0])
    assert len(faces) == 6
    crops = []
    for f in faces:
        x0, y0, x1, y1 = (float(v) for v in f.box)
        m = x1 - x0
        c = group[int(max(0, y0 - m)): int(y1 + m), int(max(0, x0 - m)): int(x1 + m)][:, ::-1]
        crops.append(_fit(c, 2 * c.shape[0]))
    return faces, encode_references(enc, crops, [f"person{i}" for i in range(6)])


def test_a_photo_against_itself_gives_single_sim_one(enc, astronaut, refs):
    from instantfamily_nodes.evaluate.identity import detect_faces
    from instantfamily_nodes.evaluate.score import score_image

    same = score_image("self", [refs[0].embedding], [0], detect_faces(enc, astronaut))
    assert same.single_sim[0] > 0.999 and same.fastcomposer > 0.999 and same.multi_sim is None
    # mirrored and shrunk to 60 %: still the same person
    small = _fit(astronaut[:, ::-1], 307)
    moved = score_image("flip", [refs[0].embedding], [0], detect_faces(enc, small))
    assert moved.single_sim[0] > 0.95


def test_two_people_multi_sim_above_one_and_each_identity_found(enc, pair, refs):
    from instantfamily_nodes.evaluate.identity import detect_faces
    from instantfamily_nodes.evaluate.score import score_image

    img, split = pair
    faces = detect_faces(enc, img, want=2)
    h, w = img.shape[:2]
    regions = [region_from_spec([0, 0, split, h], (h, w), "left"), region_from_spec([split, 0, w, h], (h, w), "right")]
    sc = score_image("pair", [f.embedding for f in refs], [0, 1], faces, regions)
    assert sc.match == "regions" and sc.missing == 0
    # each ID's face is on its own side, and it is its own person (more similar to its own reference)
    assert faces[sc.assignment[0]].box[2] <= split < faces[sc.assignment[1]].box[0]
    for n in (0, 1):
        own = sc.single_sim[n]
        other = float(refs[1 - n].embedding @ faces[sc.assignment[n]].embedding)
        assert own > 0.95 and own > other + 0.05
    assert sc.multi_sim > 1.0 and sc.greedy_agrees is True
    # the same numbers by hand from the embeddings (eq. 11)
    a_, b_ = (faces[sc.assignment[n]].embedding for n in (0, 1))
    by_hand = (float(refs[0].embedding @ a_) + float(refs[1].embedding @ b_)) / 2 + 1 - float(a_ @ b_)
    assert sc.multi_sim == pytest.approx(by_hand, abs=1e-5)
    # IDs listed the other way round with the regions swapped: the scores follow the IDs
    swapped = score_image("pair", [f.embedding for f in refs], [1, 0], faces, regions[::-1])
    assert swapped.single_sim == pytest.approx(sc.single_sim[::-1])
    # regions that put each ID on the wrong side: identity drops, and greedy disagrees
    wrong = score_image("wrong", [f.embedding for f in refs], [0, 1], faces, regions[::-1])
    assert wrong.identity < sc.identity - 0.05 and wrong.greedy_agrees is False


def test_greedy_matching_recovers_shuffled_pairs(group_setup):
    faces, refs = group_setup
    perm = [3, 0, 5, 1, 4, 2]
    got = match_greedy([refs[p].embedding for p in perm], [f.embedding for f in faces], [f.box for f in faces])
    assert got == perm


@pytest.mark.parametrize("ids", [[4, 1, 2], [5, 0, 3, 2], "largest"])
def test_three_and_four_ids_on_a_group_photo(group_setup, ids):
    from instantfamily_nodes.evaluate.score import score_image

    faces, refs = group_setup
    if ids == "largest":   # the three largest faces (t1: 15750, 11025 and 10920 px² at score 2.08)
        ids = [3, 0, 2]
    h, w = 886, 1280
    boxes = [[float(v) for v in faces[i].box] for i in ids]
    regions = [region_from_spec(b, (h, w), f"box {n}", coords="pixels") for n, b in enumerate(boxes)]
    sc = score_image("t1", [f.embedding for f in refs], ids, faces, regions)
    assert sc.assignment == ids and sc.missing == 0
    gens = [faces[i].embedding for i in ids]
    own = [float(refs[i].embedding @ g) for i, g in zip(ids, gens)]
    pairs = [1 - float(gens[i] @ gens[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    assert len(pairs) == len(ids) * (len(ids) - 1) // 2
    assert sc.multi_sim == pytest.approx(np.mean(own) + np.mean(pairs), abs=1e-5)
    assert min(own) > 0.95 and sc.multi_sim > 1.0
    # FastComposer's protocol looks only at the N largest faces, whoever they are: equal to the lowest
    # own similarity when those are the IDs' faces, lower when a stranger's face is among them
    # (equal areas - HOG's fixed box sizes - go to the more confident detection)
    order = sorted(range(6), key=lambda i: ((faces[i].box[2] - faces[i].box[0]) * (faces[i].box[3] - faces[i].box[1]),
                                            faces[i].score), reverse=True)
    largest = set(order[: len(ids)])
    if largest == set(ids):
        assert sc.fastcomposer == pytest.approx(min(own), abs=1e-5)
    else:
        assert sc.fastcomposer < min(own) - 0.02


def test_missing_face_scores_zero_and_is_counted(enc, astronaut, refs):
    from instantfamily_nodes.evaluate.identity import detect_faces
    from instantfamily_nodes.evaluate.score import aggregate, score_image

    a = _fit(astronaut, 400)
    img = np.concatenate([a, np.full_like(a, 128)], 1)   # ID 1's half is empty
    h, w = img.shape[:2]
    regions = [region_from_spec([0, 0, 0.5, 1], (h, w), "l"), region_from_spec([0.5, 0, 1, 1], (h, w), "r")]
    embs = [f.embedding for f in refs]
    faces = detect_faces(enc, img, want=2)
    sc = score_image("one missing", embs, [0, 1], faces, regions)
    assert sc.assignment[1] is None and sc.single_sim[1] == 0.0 and sc.missing == 1
    assert sc.fastcomposer == 0.0 and sc.multi_sim == pytest.approx(sc.single_sim[0] / 2)
    greedy = score_image("one missing", embs, [0, 1], faces, None)
    assert greedy.missing == 1 and greedy.match == "greedy"
    blank = score_image("blank", embs, [0, 1], detect_faces(enc, np.full((256, 256, 3), 90, np.uint8), 2))
    summary = aggregate([sc, blank], ["astronaut", "grace"])["overall"]
    assert summary["faces_missing"] == 3 and summary["faces_expected"] == 4
    assert summary["face_missing_rate"] == pytest.approx(0.75) and summary["images_with_missing_face"] == 2
    assert summary["single_sim"]["mean"] == pytest.approx(sc.single_sim[0] / 4)
    assert summary["single_sim_detected"]["mean"] == pytest.approx(sc.single_sim[0])


# ---------------------------------------------------------------- the CLI, end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, astronaut, grace, pair):
    root = tmp_path_factory.mktemp("run")
    (root / "refs").mkdir()
    (root / "gen").mkdir()
    (root / "masks").mkdir()
    Image.fromarray(astronaut).save(root / "refs" / "00_collins.png")
    Image.fromarray(grace).save(root / "refs" / "01_hopper.jpg")
    img, split = pair
    h, w = img.shape[:2]
    Image.fromarray(img).save(root / "gen" / "a.png")
    Image.fromarray(np.ascontiguousarray(np.concatenate([img[:, split:], img[:, :split]], 1))).save(root / "gen" / "b.png")
    a = _fit(astronaut, 400)
    Image.fromarray(np.concatenate([a, np.full_like(a, 128)], 1)).save(root / "gen" / "c.png")
    m = np.zeros((h, w), np.uint8)
    m[:, :split] = 255
    Image.fromarray(m).save(root / "masks" / "a0.png")
    Image.fromarray(255 - m).save(root / "masks" / "a1.png")
    manifest = {"prompt": "two women, photo", "images": [
        {"file": "gen/a.png", "masks": ["masks/a0.png", "masks/a1.png"]},
        {"file": "gen/b.png", "points": [[0.75, 0.3], [0.25, 0.3]], "prompt": "two women at a party"},
        {"file": "gen/c.png", "ids": ["01_hopper", 0], "boxes": [[0.5, 0, 1, 1], [0, 0, 0.5, 1]]},
    ]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_cli_writes_json_csv_summary_and_sheet(run_dir, capsys):
    from instantfamily_nodes.evaluate.__main__ import main

    out = run_dir / "out"
    assert main([str(run_dir), "--out", str(out), "--clip", "none"]) == 0
    data = json.loads((out / "scores.json").read_text())
    imgs = {d["image"]: d for d in data["images"]}
    assert data["meta"]["face_backend"] == "dlib" and data["meta"]["references"] == ["00_collins", "01_hopper"]
    assert "TextSim off" in data["meta"]["text_sim"]
    a, b, c = imgs["gen/a.png"], imgs["gen/b.png"], imgs["gen/c.png"]
    assert a["match"] == b["match"] == c["match"] == "regions"
    assert a["multi_sim"] > 1 and a["faces_missing"] == 0
    # b is a with the halves swapped and the points swapped accordingly: the same scores
    assert b["multi_sim"] == pytest.approx(a["multi_sim"], abs=0.02) and b["prompt"] == "two women at a party"
    # c: ID 0 is Hopper (not in the image: missing), ID 1 Collins
    assert [i["name"] for i in c["ids"]] == ["01_hopper", "00_collins"]
    assert c["ids"][0]["single_sim"] == 0.0 and c["ids"][1]["single_sim"] > 0.95 and c["fastcomposer"] == 0.0
    o = data["summary"]["overall"]
    assert o["faces_missing"] == 1 and o["faces_expected"] == 6 and o["images"] == 3
    with (out / "faces.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and sum(r["detected"] == "0" for r in rows) == 1
    assert float(rows[0]["single_sim"]) == pytest.approx(a["ids"][0]["single_sim"], abs=1e-4)
    summary = (out / "summary.md").read_text()
    assert "face backend: **dlib**" in summary and "| all | 3 |" in summary and "1/6 (16.7%)" in summary
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height > 3 * 240
    assert "written:" in capsys.readouterr().out


def test_cli_folder_without_manifest_uses_prompts_and_greedy(run_dir, tmp_path, capsys):
    from instantfamily_nodes.evaluate.__main__ import main

    root = tmp_path / "plain"
    (root / "gen").mkdir(parents=True)
    (root / "refs").symlink_to(run_dir / "refs")
    for name in ("a.png", "b.png"):
        (root / "gen" / name).symlink_to(run_dir / "gen" / name)
    (root / "prompts.txt").write_text("one\ntwo\nthree\n")
    assert main([str(root), "--clip", "none", "--no-sheet"]) == 2
    err = capsys.readouterr().err
    assert "3 prompts for 2 generated images" in err and "one prompt per image" in err
    (root / "prompts.txt").write_text("two women\n")
    assert main([str(root), "--clip", "none", "--no-sheet"]) == 0
    data = json.loads((root / "eval" / "scores.json").read_text())
    assert [d["match"] for d in data["images"]] == ["greedy", "greedy"]
    assert all(d["prompt"] == "two women" and d["multi_sim"] > 1 for d in data["images"])
    assert not (root / "eval" / "contact_sheet.png").exists()


def test_bad_inputs_get_clear_errors(run_dir, tmp_path, capsys):
    from instantfamily_nodes.evaluate.__main__ import main
    from instantfamily_nodes.evaluate.inputs import load_eval_set

    empty = tmp_path / "empty"
    (empty / "refs").mkdir(parents=True)
    with pytest.raises(EvaluationInputError, match="no images .* in .*refs.*one photo per ID"):
        load_eval_set(empty)
    with pytest.raises(EvaluationInputError, match="refs.* does not exist"):
        load_eval_set(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "refs").symlink_to(run_dir / "refs")
    (bad / "gen").symlink_to(run_dir / "gen")
    cases = [
        ({"images": [{"file": "gen/a.png", "boxes": [[0, 0, 1, 1]]}]}, "1 boxes for 2 IDs"),
        ({"images": [{"file": "gen/a.png", "ids": [0, 2]}]}, "ID 2 is out of range; there are 2 references"),
        ({"images": [{"file": "gen/a.png", "ids": ["nobody"]}]}, "'nobody' is not a reference"),
        ({"images": [{"file": "gen/zzz.png"}]}, "does not exist"),
        ({"images": [{"file": "gen/a.png", "boxes": [[0, 0, 1, 1]] * 2, "points": [[0, 0]] * 2}]}, "not boxes and points"),
        ({"images": []}, "non-empty list"),
    ]
    for manifest, message in cases:
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(EvaluationInputError, match=message):
            load_eval_set(bad)
    (bad / "manifest.json").write_text("{not json")
    assert main([str(bad), "--clip", "none"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_reference_without_a_face_is_named(enc, tmp_path):
    from instantfamily_nodes.evaluate.identity import encode_references
    from skimage import data

    with pytest.raises(EvaluationInputError, match="reference coffee.png: .*no face"):
        encode_references(enc, [np.asarray(data.coffee())], ["coffee.png"])
    with pytest.raises(EvaluationInputError, match="references: none given"):
        encode_references(enc, [], [])


def test_scores_refuse_references_from_another_backend(enc, refs):
    from instantfamily_nodes.evaluate.run import Request, evaluate
    from instantfamily_nodes.models.faces.types import Faces

    other = Faces(faces=list(refs.faces), encoder="insightface/antelopev2")
    with pytest.raises(EvaluationInputError, match="encoded with 'insightface/antelopev2'.*scored with 'dlib'"):
        evaluate(enc, other, ["a", "b"], [Request("x", np.zeros((64, 64, 3), np.uint8), [0])])
    with pytest.raises(EvaluationInputError, match="no faces"):
        evaluate(enc, Faces(encoder="dlib"), [], [])


def test_scoring_threshold_drops_the_weak_false_face(enc, astronaut):
    # dlib's HOG at its own threshold 0 also "finds" a face on the astronaut's suit (margin ~0.005);
    # scoring uses 0.1 so such hits cannot be matched to an ID.
    from instantfamily_nodes.evaluate.identity import detect_faces, make_encoder

    a = _fit(astronaut, 400)
    loose = detect_faces(make_encoder("dlib", det_threshold=0.0), a, want=2)
    strict = detect_faces(enc, a, want=2)
    assert len(loose) == 2 and min(f.score for f in loose) < 0.1
    assert len(strict) == 1 and strict[0].box[3] < 200     # the real face, in the upper half
