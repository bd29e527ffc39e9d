"""Pose core: parsing, rendering (pixel checks), face boxes, ID assignment, masks, 5-kps, detector lookup.

References are computed by hand in the tests (OpenPose colours from the OpenPose convention, mask
edges from the margin definition), not by calling the code under test.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from instantfamily_nodes.models.faces.types import Face
from instantfamily_nodes.palette import ID_COLORS, id_color
from instantfamily_nodes.pose import assign, detect, faceboxes, keypoints, kps5, masks, render, templates
from instantfamily_nodes.pose.keypoints import PoseFormatError

# OpenPose-18 colours (controlnet-aux / ControlNet): joint k is drawn in COLORS[k] at full value,
# limb i in COLORS[i] at 60%. Limb 6 is neck -> right hip, joint 8 is the right hip.
OPENPOSE_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                   (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                   (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
NECK_RHIP_LIMB = tuple(int(c * 0.6) for c in OPENPOSE_COLORS[6])   # (0, 153, 0)
RHIP_JOINT = OPENPOSE_COLORS[8]


def person_px(cx: float, top: float, h: float, W: int, H: int, head: bool = True) -> keypoints.Person:
    """A front-facing standing person in pixels -> normalised Person (independent of the templates)."""
    pts = {
        1: (cx, top + 0.17 * h), 2: (cx - 0.11 * h, top + 0.18 * h), 5: (cx + 0.11 * h, top + 0.18 * h),
        3: (cx - 0.14 * h, top + 0.33 * h), 6: (cx + 0.14 * h, top + 0.33 * h),
        4: (cx - 0.15 * h, top + 0.47 * h), 7: (cx + 0.15 * h, top + 0.47 * h),
        8: (cx - 0.06 * h, top + 0.52 * h), 11: (cx + 0.06 * h, top + 0.52 * h),
        9: (cx - 0.065 * h, top + 0.73 * h), 12: (cx + 0.065 * h, top + 0.73 * h),
        10: (cx - 0.07 * h, top + 0.94 * h), 13: (cx + 0.07 * h, top + 0.94 * h),
    }
    if head:
        pts.update({0: (cx, top + 0.075 * h), 14: (cx - 0.02 * h, top + 0.06 * h), 15: (cx + 0.02 * h, top + 0.06 * h),
                    16: (cx - 0.045 * h, top + 0.07 * h), 17: (cx + 0.045 * h, top + 0.07 * h)})
    return keypoints.person_from_points([(pts[j][0] / W, pts[j][1] / H) if j in pts else None for j in range(18)])


def face_centre_px(p: keypoints.Person, W: int, H: int) -> tuple[float, float]:
    """Hand reference: mean of nose and both eyes."""
    xs = [p.body[j, 0] * W for j in (0, 14, 15)]
    ys = [p.body[j, 1] * H for j in (0, 14, 15)]
    return float(np.mean(xs)), float(np.mean(ys))


def three_people(W=768, H=512):
    # deliberately not left-to-right in input order
    return [person_px(400, 40, 440, W, H), person_px(130, 50, 420, W, H), person_px(650, 60, 400, W, H)]


def make_face(box, kps=None, image_size=(512, 768), index=0) -> Face:
    box = np.asarray(box, np.float32)
    if kps is None:
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        kps = [[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h], [x0 + 0.5 * w, y0 + 0.6 * h],
               [x0 + 0.35 * w, y0 + 0.8 * h], [x0 + 0.65 * w, y0 + 0.8 * h]]
    return Face(box=box, kps=np.asarray(kps, np.float32), embedding=np.ones(512, np.float32) / math.sqrt(512),
                local=None, crop=np.zeros((112, 112, 3), np.uint8), score=0.9, image_index=index,
                image_size=image_size)


# ------------------------------------------------------------------ parsing

def frame_dict(people, W, H, pixel=False, canvas=True):
    out = {"people": []}
    for p in people:
        body = p.body.copy()
        if pixel:
            body[:, 0] *= W
            body[:, 1] *= H
        out["people"].append({"pose_keypoints_2d": body.reshape(-1).tolist()})
    if canvas:
        out["canvas_width"], out["canvas_height"] = W, H
    return out


def test_normalised_and_pixel_coordinates_parse_to_the_same_pose_and_image():
    W, H = 768, 512
    people = three_people(W, H)
    norm = keypoints.frames_from_pose_keypoint([frame_dict(people, W, H)])[0]
    pix = keypoints.frames_from_pose_keypoint([frame_dict(people, W, H, pixel=True)])[0]
    assert norm.canvas_hw == pix.canvas_hw == (512, 768)
    for a, b in zip(norm.people, pix.people):
        np.testing.assert_allclose(a.body, b.body, atol=1e-5)
    ids = [1, 0, None]
    img_n = render.render_control(norm.people, ids, (H, W))
    img_p = render.render_control(pix.people, ids, (H, W))
    assert np.array_equal(img_n, img_p)
    assert img_n.any()


def test_missing_joints_confidence_zero_and_body25():
    W, H = 512, 512
    p = person_px(256, 40, 400, W, H)
    flat = p.body.copy()
    flat[16] = (0.9, 0.9, 0.0)  # a missing ear with junk coordinates
    frame = keypoints.frame_from_dict({"people": [{"pose_keypoints_2d": flat.reshape(-1).tolist()}]})
    got = frame.people[0]
    assert not got.has(16) and got.joint(16) is None and got.has(17)
    assert frame.canvas_hw == (512, 512)
    # BODY_25: insert MidHip at 8 and six feet points; conversion drops them
    b25 = np.zeros((25, 3), np.float32)
    b25[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]] = p.body
    b25[8] = (0.5, 0.5, 1)
    f25 = keypoints.frame_from_dict({"people": [{"pose_keypoints_2d": b25.reshape(-1).tolist()}]})
    np.testing.assert_allclose(f25.people[0].body, p.body)


def test_several_frames_and_round_trip():
    W, H = 640, 480
    frames = [frame_dict(three_people(W, H), W, H), frame_dict(three_people(W, H)[:1], W, H)]
    parsed = keypoints.frames_from_pose_keypoint(frames)
    assert [len(f.people) for f in parsed] == [3, 1]
    again = keypoints.frames_from_pose_keypoint(keypoints.to_pose_keypoint(parsed, coords="pixel"))
    for a, b in zip(parsed[0].people, again[0].people):
        np.testing.assert_allclose(a.body, b.body, atol=1e-5)


@pytest.mark.parametrize("value, needle", [
    ("nope", "POSE_KEYPOINT list"),
    ([], "no frames"),
    ([{"persons": []}], "no 'people'"),
    ([{"people": [{"pose_keypoints_2d": [1, 2]}]}], "triples"),
    ([{"people": [{"pose_keypoints_2d": [0.5, 0.5, 1] * 17}]}], "17 points; expected 18"),
    ([{"people": [{"pose_keypoints_2d": [100, 200, 1] * 18}]}], "no canvas_width"),
    ([{"people": [], "canvas_width": 512}], "only one of canvas_width"),
])
def test_bad_pose_values_get_clear_errors(value, needle):
    with pytest.raises(PoseFormatError, match=needle):
        keypoints.frames_from_pose_keypoint(value)


def test_json_file_formats_and_malformed_json(tmp_path):
    W, H = 768, 512
    people = three_people(W, H)
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps([frame_dict(people, W, H)]))
    # OpenPose's own output: pixel coordinates, no canvas size
    op = tmp_path / "img_keypoints.json"
    op.write_text(json.dumps({"version": 1.3, **frame_dict(people, W, H, pixel=True, canvas=False)}))
    a = keypoints.load_pose_json(dump)[0]
    b = keypoints.load_pose_json(op, canvas_hw=(H, W))[0]
    for pa, pb in zip(a.people, b.people):
        np.testing.assert_allclose(pa.body, pb.body, atol=1e-5)
    with pytest.raises(PoseFormatError, match="no canvas_width"):
        keypoints.load_pose_json(op)
    bad = tmp_path / "bad.json"
    bad.write_text('{"people": [ {"pose_keypoints_2d": [1, 2, 3,]} ]}')
    with pytest.raises(PoseFormatError, match=r"bad.json is not valid JSON \(line 1"):
        keypoints.load_pose_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        keypoints.load_pose_json(tmp_path / "missing.json")


# ------------------------------------------------------------------ rendering

@pytest.mark.parametrize("W, H", [(768, 512), (512, 768), (900, 300), (512, 512)])
def test_circles_have_their_id_colour_at_the_face_centre_and_all_skeletons_are_drawn(W, H):
    people = [person_px(W * 0.2, H * 0.05, H * 0.85, W, H), person_px(W * 0.5, H * 0.08, H * 0.8, W, H),
              person_px(W * 0.8, H * 0.06, H * 0.82, W, H)]
    ids = assign.assign_ids(people, 2, "1,-,0")   # left: ID 1, middle: none, right: ID 0
    assert ids == [1, None, 0]
    img = render.render_control(people, ids, (H, W))
    skel = render.render_skeletons(people, (H, W))
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    for p, id_ in zip(people, ids):
        cx, cy = face_centre_px(p, W, H)
        px = tuple(int(v) for v in img[int(round(cy)), int(round(cx))])
        if id_ is None:
            # no circle: the face centre shows only what the skeleton drew there
            assert px == tuple(int(v) for v in skel[int(round(cy)), int(round(cx))])
            assert px not in ID_COLORS
        else:
            assert px == id_color(id_)
        # every person's skeleton: the neck->right-hip limb at its midpoint, the right-hip joint dot
        neck, rhip = p.joint_px(1, (H, W)), p.joint_px(8, (H, W))
        mx, my = (neck[0] + rhip[0]) / 2, (neck[1] + rhip[1]) / 2
        assert tuple(int(v) for v in img[int(my), int(mx)]) == NECK_RHIP_LIMB
        assert tuple(int(v) for v in img[int(rhip[1]), int(rhip[0])]) == RHIP_JOINT


def test_circle_radius_scales_with_face_size():
    W, H = 768, 512
    small, big = person_px(200, 100, 250, W, H), person_px(550, 30, 500, W, H)
    img = render.render_control([small, big], [0, 1], (H, W), circle_scale=0.3)
    boxes = faceboxes.face_boxes_from_pose([small, big], (H, W))
    widths = []
    for p, id_, box in zip([small, big], [0, 1], boxes):
        cx, cy = face_centre_px(p, W, H)
        row = img[int(round(cy))]
        run = np.all(row == np.array(id_color(id_)), axis=1)
        widths.append(int(run.sum()))
        expected_r = round(0.3 * float(box[2] - box[0]))
        assert abs(run.sum() - (2 * expected_r + 1)) <= 2
    assert widths[1] > 1.6 * widths[0]


def test_template_like_render_any_aspect_keeps_circle_on_face():
    # the same normalised pose on two canvases: the circle moves with the canvas
    p = person_px(300, 40, 400, 600, 500)
    for hw in [(500, 600), (250, 900)]:
        img = render.render_control([p], [0], hw)
        cx, cy = face_centre_px(p, hw[1], hw[0])
        assert tuple(int(v) for v in img[int(round(cy)), int(round(cx))]) == id_color(0)


def test_render_errors():
    p = person_px(100, 20, 200, 256, 256)
    with pytest.raises(ValueError, match="1 entries for 2 people"):
        render.render_control([p, p], [0], (256, 256))
    headless = person_px(100, 20, 200, 256, 256, head=False)
    with pytest.raises(ValueError, match="without a face"):
        render.render_control([headless], [0], (256, 256))
    with pytest.raises(ValueError, match="at least 8x8"):
        render.render_control([p], [0], (4, 256))


# ------------------------------------------------------------------ face boxes and matching

def test_face_box_from_pose_by_hand():
    W, H = 1000, 1000
    p = person_px(500, 100, 1000, W, H)
    box = faceboxes.face_box_from_pose(p, (H, W))
    # centre: mean(nose, eyes) = (500, 100 + (75 + 60 + 60) / 3)
    cy = 100 + 65.0
    # width = max(ear-to-ear 90 * 1.0, eyes 40 * 2.2 = 88, neck->centre (170 - 65) * 0.8 = 84) = 90
    np.testing.assert_allclose(box, [455, cy - 56.25, 545, cy + 56.25], atol=1e-3)
    assert faceboxes.face_box_from_pose(person_px(500, 100, 1000, W, H, head=False), (H, W)) is None


def test_detected_faces_replace_pose_boxes_when_matched():
    W, H = 768, 512
    people = three_people(W, H)
    # faces detected on a 2x larger copy of the picture: boxes must be scaled to the canvas
    est = faceboxes.face_boxes_from_pose(people, (H, W))
    c1 = faceboxes.box_center(est[1])
    near = make_face([2 * c1[0] - 30, 2 * c1[1] - 36, 2 * c1[0] + 30, 2 * c1[1] + 36], image_size=(2 * H, 2 * W))
    far = make_face([10, 900, 60, 960], image_size=(2 * H, 2 * W))
    boxes = faceboxes.face_boxes_from_pose(people, (H, W), faces=[far, near])
    np.testing.assert_allclose(boxes[1], [c1[0] - 15, c1[1] - 18, c1[0] + 15, c1[1] + 18], atol=1e-3)
    np.testing.assert_allclose(boxes[0], est[0])
    np.testing.assert_allclose(boxes[2], est[2])
    assert faceboxes.match_faces(est, [far.box]) == [None, None, None]


# ------------------------------------------------------------------ assignment

def test_order_strings():
    people = three_people()          # input order: middle, left, right
    assert assign.assign_ids(people, 3) == [1, 0, 2]
    assert assign.assign_ids(people, 3, "right_to_left") == [1, 2, 0]
    assert assign.assign_ids(people, 3, "2,0,1") == [0, 2, 1]   # left gets 2, middle 0, right 1
    assert assign.assign_ids(people, 2, "1 - 0") == [None, 1, 0]
    assert assign.assign_ids(people, 2) == [1, 0, None]         # the rightmost person has no ID
    assert assign.assign_ids(people, 1, "0") == [None, 0, None]
    assert assign.people_for_ids([1, 0, None], 2) == [1, 0]


@pytest.mark.parametrize("n, order, needle", [
    (4, "left_to_right", "4 identities but the pose has only 3 people with a visible face"),
    (3, "2,0,0", "ID 0 more than once"),
    (2, "0,2", "names ID 2, but only 2 identities"),
    (3, "0,1", r"leaves ID\(s\) \[2\]"),
    (2, "0,a", "'a' is not an ID number"),
    (2, "0,-,-,1", "lists 4 positions but the pose has only 3"),
])
def test_bad_orders_get_clear_errors(n, order, needle):
    with pytest.raises(assign.AssignmentError, match=needle):
        assign.assign_ids(three_people(), n, order)


def test_zero_people_and_headless_people():
    with pytest.raises(assign.AssignmentError, match="no people"):
        assign.assign_ids([], 1)
    W, H = 512, 512
    people = [person_px(100, 20, 300, W, H), person_px(300, 20, 300, W, H, head=False)]
    assert assign.assign_ids(people, 1) == [0, None]
    with pytest.raises(assign.AssignmentError, match=r"2 identities but the pose has only 1 .*\(1 more without"):
        assign.assign_ids(people, 2)


# ------------------------------------------------------------------ masks

def test_margin_is_exact_to_the_pixel():
    # 80 x 96 box, 25% in total: 10 px more left and right, 12 px more top and bottom
    m = masks.id_masks([np.array([100, 100, 180, 196])], (300, 400), margin=0.25)[0]
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (88, 207, 90, 189)
    assert m.sum() == 100 * 120 and set(np.unique(m)) == {0.0, 1.0}
    # fractional edges: x0' = 10.3 - 2.5 = 7.8, x1' = 32.8 -> pixel centres 8.5 .. 32.5
    m2 = masks.id_masks([np.array([10.3, 20.0, 30.3, 40.0])], (64, 64))[0]
    cols2 = np.nonzero(m2.any(axis=0))[0]
    assert (cols2.min(), cols2.max()) == (8, 32)
    # margin 0: exactly the box
    m0 = masks.id_masks([np.array([5, 6, 15, 26])], (40, 40), margin=0.0)[0]
    assert m0.sum() == 10 * 20 and m0[6, 5] == 1 and m0[5, 5] == 0 and m0[25, 14] == 1 and m0[26, 14] == 0


def test_ellipse_feather_and_clipping():
    e = masks.id_masks([np.array([0, 0, 100, 100])], (100, 100), margin=0.0, shape="ellipse")[0]
    assert e[50].all() and e[:, 50].all() and e[0, 0] == 0 and e[99, 99] == 0
    assert e[0, 49] == 1          # (49.5, 0.5): 0.0001 + 0.9801 <= 1
    assert e[0, 40] == 0          # (40.5, 0.5): 0.0361 + 0.9801 > 1
    assert abs(e.sum() - math.pi * 50 * 50) < 0.01 * math.pi * 2500
    f = masks.id_masks([np.array([40, 40, 60, 60])], (100, 100), margin=0.0, feather=4)[0]
    assert f[50, 40] == 1 and f[50, 38] == pytest.approx(1 - 2 / 5) and f[50, 35] == 0
    assert f[50, 59] == 1 and f[50, 60] == pytest.approx(1 - 1 / 5)
    c = masks.id_masks([np.array([-20, -20, 10, 10])], (50, 50), margin=0.0)[0]
    assert c.sum() == 100 and c[0, 0] == 1
    with pytest.raises(ValueError, match="outside the 50x50 canvas"):
        masks.id_masks([np.array([60, 60, 80, 80])], (50, 50), margin=0.0)
    with pytest.raises(ValueError, match="ID 1 has no face box"):
        masks.id_masks([np.array([1, 1, 5, 5]), None], (50, 50))


def test_masks_follow_id_order_and_overlay_colours():
    W, H = 768, 512
    people = three_people(W, H)
    boxes = faceboxes.face_boxes_from_pose(people, (H, W))
    ids = assign.assign_ids(boxes, 3, "2,0,1")
    m = masks.id_masks([boxes[i] for i in assign.people_for_ids(ids, 3)], (H, W))
    # ID 2 is the leftmost person (input index 1): its mask holds that face centre
    for id_, person in [(2, people[1]), (0, people[0]), (1, people[2])]:
        cx, cy = face_centre_px(person, W, H)
        assert m[id_, int(cy), int(cx)] == 1
        assert m[:, int(cy), int(cx)].sum() == 1
    ov = masks.mask_overlay(m, alpha=1.0)
    cx, cy = face_centre_px(people[1], W, H)
    assert tuple(int(v) for v in ov[int(cy), int(cx)]) == id_color(2)
    assert tuple(int(v) for v in ov[0, 0]) == (0, 0, 0)


def test_user_masks_are_checked():
    good = np.zeros((2, 64, 48), np.float32)
    good[0, :10, :10] = 1
    good[1, 20:, 20:] = 1
    out = masks.check_user_masks(good, 2, (64, 48))
    assert out.shape == (2, 64, 48) and out.dtype == np.float32
    with pytest.raises(ValueError, match="48x64 \\(WxH\\) but the canvas is 64x48"):
        masks.check_user_masks(good, 2, (48, 64))
    with pytest.raises(ValueError, match="got 2 masks for 3 identities"):
        masks.check_user_masks(good, 3, (64, 48))
    with pytest.raises(ValueError, match="mask 1 is empty"):
        masks.check_user_masks(np.stack([good[0], np.zeros_like(good[0])]), 2, (64, 48))


# ------------------------------------------------------------------ 5 keypoints

def test_kps5_image_colours_and_placement():
    face = make_face([100, 100, 200, 220], image_size=(400, 400))
    # scaled from a 400x400 image onto an 800x800 canvas: every point doubles
    pts = kps5.kps5_for_faces([face], (800, 800))[0]
    np.testing.assert_allclose(pts, np.asarray(face.kps) * 2, atol=1e-4)
    img = kps5.render_kps5([pts], (800, 800))
    for (x, y), colour in zip(pts, kps5.KPS_COLORS):
        assert tuple(int(v) for v in img[int(y), int(x)]) == colour
    # moved into a target box 0.5x the size: centre to centre, uniform scale 0.5
    moved = kps5.kps_into_box(face, np.array([0, 0, 50, 60]))
    np.testing.assert_allclose(moved[2], [25 + (face.kps[2, 0] - 150) * 0.5, 30 + (face.kps[2, 1] - 160) * 0.5])
    # sticks at 60% in the colour of their outer point: halfway between left eye and nose
    mid = ((pts[0] + pts[2]) / 2).astype(int)
    assert tuple(int(v) for v in img[mid[1], mid[0]]) in {(153, 0, 0)}


# ------------------------------------------------------------------ templates

def test_templates_load_render_and_match_their_previews():
    from PIL import Image

    from instantfamily_nodes.pose import template_author

    names = templates.list_templates()
    counts = sorted(templates.template_pose_keypoint(n)[0]["instantfamily_template"]["people"] for n in names)
    assert {2, 3, 4, 5, 7} <= set(counts)
    built = template_author.build_templates()
    assert sorted(built) == names
    for name in names:
        frame = templates.load_template(name)
        n = int(name.split("_")[0])
        assert len(frame.people) == n == templates.template_pose_keypoint(name)[0]["instantfamily_template"]["people"]
        assert frame.canvas_hw in {(512, 768), (768, 512)}
        # committed JSON is what the author script makes
        assert templates.template_path(name).read_text() == template_author.template_json(*built[name])
        ids = assign.assign_ids(frame.people, n)
        img = render.render_control(frame.people, ids, frame.canvas_hw)
        shipped = np.asarray(Image.open(templates.preview_path(name)).convert("RGB"))
        assert np.array_equal(img, shipped), f"{name}.png is stale: run python -m instantfamily_nodes.pose.template_author"
        H, W = frame.canvas_hw
        for p, id_ in zip(frame.people, ids):
            cx, cy = face_centre_px(p, W, H)
            assert tuple(int(v) for v in img[int(round(cy)), int(round(cx))]) == id_color(id_)
        # masks of different people do not overlap much in a usable template
        boxes = faceboxes.face_boxes_from_pose(frame.people, frame.canvas_hw)
        m = masks.id_masks([boxes[i] for i in assign.people_for_ids(ids, n)], frame.canvas_hw)
        assert (m.sum(0) > 1).sum() < 0.05 * m.sum()
    with pytest.raises(ValueError, match="unknown pose template 'nope'"):
        templates.load_template("nope")


# ------------------------------------------------------------------ OpenPose detector lookup

def test_missing_openpose_weights_message_names_files_and_folder(tmp_path):
    target = tmp_path / "models" / "controlnet_aux"
    with pytest.raises(detect.OpenPoseWeightsMissing) as e:
        detect.find_openpose_dir([target, tmp_path / "other"])
    msg = str(e.value)
    for name in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth", str(target), "lllyasviel/Annotators"):
        assert name in msg
    sub = target / "lllyasviel" / "Annotators"
    sub.mkdir(parents=True)
    (sub / "body_pose_model.pth").write_bytes(b"x")
    with pytest.raises(detect.OpenPoseWeightsMissing, match="has body_pose_model.pth but lacks hand_pose_model.pth, facenet.pth"):
        detect.find_openpose_dir([target])
    for n in detect.OPENPOSE_FILES:
        (sub / n).write_bytes(b"x")
    assert detect.find_openpose_dir([tmp_path / "empty", target]) == sub


def test_pose_results_from_controlnet_aux_convert_to_people():
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    kps = [Keypoint(0.1 * (i % 9), 0.05 * i) if i != 16 else None for i in range(18)]
    res = PoseResult(BodyResult(kps, 10.0, 17), [Keypoint(0.2, 0.3)] * 21, None, None)
    people = detect.people_from_pose_results([res])
    assert len(people) == 1
    p = people[0]
    assert not p.has(16) and p.joint(3) == pytest.approx((0.3, 0.15))
    assert p.hand_left.shape == (21, 3) and p.hand_right is None


def test_detect_pose_runs_controlnet_aux_detector_and_keeps_the_image_canvas(tmp_path):
    """The real controlnet-aux detection code on a body network with random weights: the annotator
    files cannot be had here, so only their loading is bypassed (the detector is put in the cache
    under its folder); resizing, detection, grouping and conversion all run for real."""
    import torch
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    body = Body.__new__(Body)
    body.model = bodypose_model().eval()
    folder = tmp_path / "openpose"
    detect._DETECTORS[str(folder.resolve())] = OpenposeDetector(body)
    try:
        img = (np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8)
        frame = detect.detect_pose(img, folder, detect_resolution=128)
        assert frame.canvas_hw == (300, 200)
        for p in frame.people:
            present = p.body[p.body[:, 2] > 0]
            assert ((present[:, :2] >= 0) & (present[:, :2] <= 1)).all()
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
            detect.detect_pose(img.astype(np.float32), folder)
    finally:
        detect._DETECTORS.pop(str(folder.resolve()), None)
