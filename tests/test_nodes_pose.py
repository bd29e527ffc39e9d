"""Pose nodes inside the real ComfyUI (never mocked): schemas, direct execution, and a template ->
control + masks graph run by ComfyUI's own validator and executor."""
from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from instantfamily_nodes.demo.headless import _ServerStub
from instantfamily_nodes.models.faces.types import Face, Faces
from instantfamily_nodes.palette import id_color


@pytest.fixture()
def pn(comfyui, tmp_path):
    """The pose node module, with ComfyUI's temp folder (previews) in tmp_path."""
    import folder_paths

    old = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    from instantfamily_nodes.nodes import pose as pose_nodes

    yield pose_nodes
    folder_paths.set_temp_directory(old)


def make_face(box, image_size):
    box = np.asarray(box, np.float32)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    kps = np.array([[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h], [x0 + 0.5 * w, y0 + 0.6 * h],
                    [x0 + 0.35 * w, y0 + 0.8 * h], [x0 + 0.65 * w, y0 + 0.8 * h]], np.float32)
    return Face(box=box, kps=kps, embedding=np.ones(8, np.float32) / math.sqrt(8), local=None,
                crop=np.zeros((112, 112, 3), np.uint8), score=0.9, image_index=0, image_size=image_size)


def id_faces(n):
    """n identity photos (their own 256x256 images); only the count and the kps matter here."""
    return Faces([make_face([80, 70, 176, 190], (256, 256)) for _ in range(n)], encoder="test")


CONTROL_DEFAULTS = dict(id_count=2, person_ids="left_to_right", frame=0, width=0, height=0, circle_scale=0.2,
                        margin=0.25, mask_shape="rect", feather=0, hands=False, face_keypoints=False)


def test_every_node_input_has_a_tooltip_and_nodes_are_registered(pn):
    from instantfamily_nodes.nodes import node_classes

    ids = {c.GET_SCHEMA().node_id for c in node_classes()}
    for cls in pn.NODES:
        schema = cls.GET_SCHEMA()
        assert schema.node_id in ids
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"


def test_template_and_faces_give_control_and_masks_that_agree(pn):
    pose, preview = pn.PoseTemplate.execute("4_family").args
    assert isinstance(pose, list) and len(pose[0]["people"]) == 4
    assert preview.shape == (1, 512, 768, 3)
    out = pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "person_ids": "3,1,0,2"}, faces=id_faces(4))
    control, m, overlay = out.args
    assert control.shape == (1, 512, 768, 3) and control.dtype == torch.float32
    assert m.shape == (4, 512, 768) and overlay.shape == (1, 512, 768, 3)
    assert out.ui is not None and len(out.ui.as_dict()["images"]) == 2
    img = np.rint(control[0].numpy() * 255).astype(np.uint8)
    centres = []
    for n in range(4):
        hit = np.all(img == np.array(id_color(n), np.uint8), axis=-1)
        assert hit.sum() > 20, f"no circle for ID {n}"
        ys, xs = np.nonzero(hit)
        # the ID's circle lies inside the ID's mask and in no other mask
        assert m[n][hit].min() == 1.0
        assert m[[k for k in range(4) if k != n]][:, hit].max() == 0.0
        centres.append((xs.mean(), ys.mean()))
    # "3,1,0,2": reading the people left to right by face, IDs are 3, 1, 0, 2
    by_x = [n for n, _ in sorted(enumerate(centres), key=lambda t: t[1][0])]
    assert by_x == [3, 1, 0, 2]
    # the preview tints mask n in ID n's colour: at a mask-n pixel outside the circle, the tint
    # moves the black background towards id_color(n)
    ov = np.rint(overlay[0].numpy() * 255).astype(np.int32)
    for n in range(4):
        only_n = (m[n].numpy() == 1) & (m.sum(0).numpy() == 1) & (img.sum(-1) == 0)
        y, x = np.argwhere(only_n)[0]
        np.testing.assert_allclose(ov[y, x], np.rint(np.array(id_color(n)) * 0.55), atol=1)


def test_control_on_a_non_square_canvas_and_more_ids_than_people(pn):
    pose, _ = pn.PoseTemplate.execute("2_standing_duo").args
    control, m, _ = pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "width": 384, "height": 256}).args
    assert control.shape == (1, 256, 384, 3) and m.shape == (2, 256, 384)
    with pytest.raises(ValueError, match="3 identities but the pose has only 2 people"):
        pn.PoseControl.execute(pose, **CONTROL_DEFAULTS, faces=id_faces(3))
    empty = [{"people": [], "canvas_width": 512, "canvas_height": 512}]
    with pytest.raises(ValueError, match="the pose has no people"):
        pn.PoseControl.execute(empty, **CONTROL_DEFAULTS)


def test_pose_from_json_node(pn, tmp_path):
    import folder_paths

    frame = json.loads(json.dumps(pn.templates.template_pose_keypoint("3_standing_trio")))
    for p in frame[0]["people"]:  # to pixels: the node must normalise them back
        k = p["pose_keypoints_2d"]
        for i in range(0, len(k), 3):
            k[i] *= frame[0]["canvas_width"]
            k[i + 1] *= frame[0]["canvas_height"]
    path = tmp_path / "trio.json"
    path.write_text(json.dumps(frame))
    pose, preview = pn.PoseFromJSON.execute(str(path), "auto", 512, 512).args
    ref = pn.templates.template_pose_keypoint("3_standing_trio")
    np.testing.assert_allclose(pose[0]["people"][1]["pose_keypoints_2d"], ref[0]["people"][1]["pose_keypoints_2d"],
                               atol=1e-5)
    assert preview.shape == (1, 768, 512, 3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        pn.PoseFromJSON.execute(str(bad), "auto", 512, 512)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        pn.PoseFromJSON.execute("nothere.json", "auto", 512, 512)  # relative: ComfyUI's input folder
    assert folder_paths.get_input_directory()


def test_pose_from_image_without_weights_names_the_files_and_folder(pn, tmp_path, monkeypatch):
    import folder_paths

    target = tmp_path / "models" / "controlnet_aux"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet_aux",
                        ([str(target)], folder_paths.supported_pt_extensions))
    monkeypatch.delenv("AUX_ANNOTATOR_CKPTS_PATH", raising=False)
    image = torch.zeros(1, 64, 64, 3)
    with pytest.raises(FileNotFoundError) as e:
        pn.PoseFromImage.execute(image, 512, False, False)
    msg = str(e.value)
    for needle in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth", f"into {target}"):
        assert needle in msg
    # the default folder is ComfyUI's models/controlnet_aux
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "controlnet_aux")
    folders = pn.openpose_search_folders()
    assert folders[0] == str(folder_paths.models_dir) + "/controlnet_aux"


def test_id_masks_node_sources_and_errors(pn):
    pose, _ = pn.PoseTemplate.execute("2_standing_duo").args
    common = dict(id_count=2, person_ids="1,0", width=0, height=0, margin=0.25, mask_shape="ellipse", feather=2)
    m_pose, prev = pn.IDMasksNode.execute("pose", **common, pose=pose).args
    ctl_m = pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "person_ids": "1,0", "mask_shape": "ellipse",
                                            "feather": 2}).args[1]
    assert torch.equal(m_pose, ctl_m)        # both nodes agree on the masks
    assert prev.shape == (1, 512, 768, 3)
    faces = Faces([make_face([100, 50, 200, 170], (512, 768)), make_face([500, 60, 580, 160], (512, 768))])
    m_faces, _ = pn.IDMasksNode.execute("face boxes", **{**common, "mask_shape": "rect", "feather": 0}, faces=faces).args
    # box 100 x 120 grows by 12.5 / 15 px per side: x in [87.5, 212.5), y in [35, 185); a pixel counts
    # when its centre (c + 0.5) is inside, so columns 87..211 and rows 35..184
    ys, xs = np.nonzero(m_faces[0].numpy())
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (87, 211, 35, 184)
    user = torch.zeros(2, 512, 768)
    user[0, :100, :100] = 1
    user[1, 200:, 200:] = 1
    m_user, _ = pn.IDMasksNode.execute("user masks", **{**common, "feather": 0}, masks=user, faces=faces).args
    assert torch.equal(m_user, user)
    with pytest.raises(ValueError, match="but the canvas is 640x480"):
        pn.IDMasksNode.execute("user masks", **{**common, "width": 640, "height": 480}, masks=user)
    with pytest.raises(ValueError, match="got 2 masks for 3 identities"):
        pn.IDMasksNode.execute("user masks", **common, masks=user, faces=id_faces(3))
    with pytest.raises(ValueError, match="needs the 'pose' input"):
        pn.IDMasksNode.execute("pose", **common)


def test_kps5_node(pn):
    faces = Faces([make_face([100, 50, 200, 170], (512, 768))])
    (img,) = pn.Kps5Control.execute(faces, "left_to_right", 0, 0).args
    arr = np.rint(img[0].numpy() * 255).astype(np.uint8)
    x, y = faces[0].kps[2]
    assert tuple(arr[int(y), int(x)]) == (0, 0, 255)        # the nose point is blue (InstantID colours)
    pose, _ = pn.PoseTemplate.execute("2_standing_duo").args
    (img2,) = pn.Kps5Control.execute(faces, "left_to_right", 0, 0, pose=pose).args
    assert img2.shape == (1, 512, 768, 3)
    # moved onto the leftmost person's face: the nose point lands inside that person's face box
    frame = pn.keypoints.frames_from_pose_keypoint(pose)[0]
    boxes = pn.faceboxes.face_boxes_from_pose(frame.people, frame.canvas_hw)
    left = min((b for b in boxes), key=lambda b: b[0])
    sub = np.rint(img2[0].numpy() * 255).astype(np.uint8)[int(left[1]):int(left[3]), int(left[0]):int(left[2])]
    assert np.all(sub == np.array([0, 0, 255], np.uint8), axis=-1).any()


def test_template_to_control_graph_runs_in_comfyui(pn):
    import execution
    import nodes

    for cls in pn.NODES:
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.GET_SCHEMA().node_id, cls)
    prompt = {
        "1": {"class_type": "InstantFamilyPoseTemplate", "inputs": {"template": "7_group"}},
        "2": {"class_type": "InstantFamilyPoseControl",
              "inputs": {"pose": ["1", 0], **{**CONTROL_DEFAULTS, "id_count": 4, "person_ids": "-,0,1,-,2,3"}}},
    }
    # the pose nodes are not output nodes (an incomplete graph must fail, not run just the pose branch)...
    assert asyncio.run(execution.validate_prompt("t0", prompt, None))[1]["type"] == "prompt_no_outputs"
    prompt["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    valid = asyncio.run(execution.validate_prompt("t1", prompt, None))
    assert valid[0] is True and valid[2] == ["3"], valid
    # ...and their previews still show when the graph runs
    ex = execution.PromptExecutor(_ServerStub())
    ex.execute(prompt, "t1", {}, valid[2])
    assert ex.success, ex.status_messages
    assert len(ex.history_result["outputs"]["2"]["images"]) == 2
    assert len(ex.history_result["outputs"]["1"]["images"]) == 1
    bad = {"1": prompt["1"], "2": {**prompt["2"], "inputs": {**prompt["2"]["inputs"], "mask_shape": "star"}}}
    # this ComfyUI does not check V3 combo values while validating, so the node's own check must
    # stop the run with a message naming the input
    ex2 = execution.PromptExecutor(_ServerStub())
    ex2.execute(bad, "t2", {}, ["2"])
    assert not ex2.success
    errors = [m[1] for m in ex2.status_messages if m[0] == "execution_error"]
    assert errors and "mask shape must be one of ('rect', 'ellipse'), got 'star'" in errors[0]["exception_message"]


def test_a_canvas_of_another_aspect_is_refused_not_stretched(pn):
    """Issue 9, defect 2: width/height of another aspect than the pose (or the faces' photo) used to
    stretch the people onto the canvas; now it is an error naming both sizes. One side alone follows
    the source's aspect."""
    pose, _ = pn.PoseTemplate.execute("2_standing_duo").args          # a 768x512 canvas
    with pytest.raises(ValueError, match=r"the pose's canvas is 768x512 \(WxH\) but the requested canvas is 384x640"):
        pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "width": 384, "height": 640})
    common = dict(id_count=2, person_ids="left_to_right", width=512, height=512, margin=0.25, mask_shape="rect",
                  feather=0)
    with pytest.raises(ValueError, match=r"768x512 \(WxH\) but the requested canvas is 512x512"):
        pn.IDMasksNode.execute("pose", **common, pose=pose)
    faces = Faces([make_face([100, 50, 200, 170], (512, 768))])
    with pytest.raises(ValueError, match=r"the faces' photo is 768x512 \(WxH\) but the requested canvas is 512x512"):
        pn.IDMasksNode.execute("face boxes", **common, faces=faces)
    with pytest.raises(ValueError, match=r"768x512 \(WxH\) but the requested canvas is 512x512"):
        pn.Kps5Control.execute(faces, "left_to_right", 512, 512)
    control, m, _ = pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "width": 0, "height": 256}).args
    assert control.shape == (1, 256, 384, 3) and m.shape == (2, 256, 384)
    control, m, _ = pn.PoseControl.execute(pose, **{**CONTROL_DEFAULTS, "width": 1152, "height": 0}).args
    assert m.shape == (2, 768, 1152)


def test_pose_from_json_reruns_when_the_file_changes(pn, tmp_path):
    """Issue 9, defect 5: ComfyUI caches a node by its inputs; the path stays the same when the file
    is edited, so the node fingerprints the file's content."""
    import execution
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault("InstantFamilyPoseFromJSON", pn.PoseFromJSON)
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(pn.templates.template_pose_keypoint("2_standing_duo")))
    prompt = {"1": {"class_type": "InstantFamilyPoseFromJSON",
                    "inputs": {"path": str(path), "coords": "auto", "canvas_width": 512, "canvas_height": 512}}}
    ex = execution.PromptExecutor(_ServerStub())

    def cached_nodes(pid: str) -> list:
        # a fresh prompt dict each time, as the server gets (ComfyUI stores the fingerprint in it)
        ex.execute(json.loads(json.dumps(prompt)), pid, {}, ["1"])
        assert ex.success, ex.status_messages
        return [m[1]["nodes"] for m in ex.status_messages if m[0] == "execution_cached"][0]

    assert cached_nodes("a") == []
    assert cached_nodes("b") == ["1"]                 # unchanged file: served from the cache
    path.write_text(json.dumps(pn.templates.template_pose_keypoint("3_standing_trio")))
    assert cached_nodes("c") == []                    # edited file: runs again
    assert cached_nodes("d") == ["1"]
