"""Pose nodes: ComfyUI values in, ``pose`` core calls, ComfyUI values (and previews) out."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..pose import assign, detect, faceboxes, keypoints, kps5, render, templates
from ..pose import masks as mask_core
from ..pose.canvas import fit_canvas
from .values import FACES, POSE_KEYPOINT, file_fingerprint, image_out, images_uint8


CATEGORY = "InstantFamily/pose"
MAX_SIDE = 8192
ORDER_TOOLTIP = (
    "The ID of each person, reading the people left to right by face position (a list indexed by "
    "person; Encode Faces' id_order is the other way round: it picks faces for IDs): "
    "'left_to_right' (default: leftmost face gets ID 0), 'right_to_left', or an explicit list such as "
    "'2,0,1' (leftmost person gets ID 2, then ID 0, then ID 1); '-' leaves a person without an ID "
    "('1,-,0'). People beyond the listed ones get no ID."
)
OPENPOSE_FOLDER = "controlnet_aux"


def _frames(pose, frame: int = 0) -> keypoints.PoseFrame:
    frames = keypoints.frames_from_pose_keypoint(pose)
    if not 0 <= frame < len(frames):
        raise ValueError(f"pose: frame {frame} requested but the pose holds {len(frames)} frame(s) (0..{len(frames) - 1})")
    return frames[frame]


def _canvas(frame: keypoints.PoseFrame, width: int, height: int) -> tuple[int, int]:
    """Canvas (H, W): the pose's own size, or width/height of the same aspect (pose/canvas.py)."""
    return fit_canvas(frame.canvas_hw, width, height, "the pose's canvas")


def _n_ids(faces, id_count: int) -> int:
    return len(faces) if faces is not None else int(id_count)


def _size_inputs() -> list:
    return [
        io.Int.Input("width", default=0, min=0, max=MAX_SIDE, step=8,
                     tooltip="Canvas width in pixels; 0 keeps the pose's own canvas width."),
        io.Int.Input("height", default=0, min=0, max=MAX_SIDE, step=8,
                     tooltip="Canvas height in pixels; 0 keeps the pose's own canvas height."),
    ]


def _mask_inputs() -> list:
    return [
        io.Float.Input("margin", default=0.25, min=0.0, max=3.0, step=0.01,
                       tooltip="Face box growth in total (0.25 = paper's 25%: the box gets 25% wider and "
                               "taller, 12.5% on each side)."),
        io.Combo.Input("mask_shape", options=list(mask_core.SHAPES), default="rect",
                       tooltip="Rectangle = the grown face box; ellipse = the ellipse inscribed in it."),
        io.Int.Input("feather", default=0, min=0, max=256,
                     tooltip="Pixels of linear fall-off outside each mask (0 = hard edges)."),
    ]


def openpose_search_folders() -> list[str]:
    """Where the OpenPose annotator files are looked for: models/controlnet_aux (plus any
    'controlnet_aux' paths from extra_model_paths.yaml), then comfyui_controlnet_aux's download
    folders ($AUX_ANNOTATOR_CKPTS_PATH, custom_nodes/comfyui_controlnet_aux/ckpts)."""
    import folder_paths

    if OPENPOSE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[OPENPOSE_FOLDER] = (
            [os.path.join(folder_paths.models_dir, OPENPOSE_FOLDER)], folder_paths.supported_pt_extensions)
    folders = list(folder_paths.get_folder_paths(OPENPOSE_FOLDER))
    if os.environ.get("AUX_ANNOTATOR_CKPTS_PATH"):
        folders.append(os.environ["AUX_ANNOTATOR_CKPTS_PATH"])
    for cn in folder_paths.get_folder_paths("custom_nodes"):
        folders.append(os.path.join(cn, "comfyui_controlnet_aux", "ckpts"))
    return folders


# ---------------------------------------------------------------- pose sources

class PoseTemplate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = templates.list_templates()
        return io.Schema(
            node_id="InstantFamilyPoseTemplate",
            display_name="InstantFamily Pose Template (multi person)",
            category=CATEGORY,
            description="A shipped multi-person pose (2-7 people): only identity photos are needed.",
            inputs=[
                io.Combo.Input("template", options=names, default=names[0],
                               tooltip="Pose layout; the leading number is how many people it holds."),
            ],
            outputs=[
                POSE_KEYPOINT.Output(display_name="pose", tooltip="POSE_KEYPOINT, normalised coordinates."),
                io.Image.Output(display_name="preview", tooltip="Skeletons with ID circles, IDs left to right."),
            ],
        )

    @classmethod
    def execute(cls, template) -> io.NodeOutput:
        frame = templates.load_template(template)
        ids = assign.assign_ids(frame.people, len(frame.people))
        preview = image_out(render.render_control(frame.people, ids, frame.canvas_hw))
        return io.NodeOutput(templates.template_pose_keypoint(template), preview,
                             ui=ui.PreviewImage(preview, cls=cls))


class PoseFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantFamilyPoseFromJSON",
            display_name="InstantFamily Pose from JSON File",
            category=CATEGORY,
            description="Read a keypoint JSON: a POSE_KEYPOINT dump, one frame, or an OpenPose *_keypoints.json.",
            inputs=[
                io.String.Input("path", default="",
                                tooltip="Path of the JSON file (absolute, or relative to ComfyUI's input folder)."),
                io.Combo.Input("coords", options=list(keypoints.COORDS), default="auto",
                               tooltip="Coordinate units in the file; auto = pixels if any value exceeds 2."),
                io.Int.Input("canvas_width", default=512, min=8, max=MAX_SIDE,
                             tooltip="Width of the source image, used only when the file has no canvas_width."),
                io.Int.Input("canvas_height", default=512, min=8, max=MAX_SIDE,
                             tooltip="Height of the source image, used only when the file has no canvas_height."),
            ],
            outputs=[
                POSE_KEYPOINT.Output(display_name="pose", tooltip="POSE_KEYPOINT, normalised coordinates."),
                io.Image.Output(display_name="preview", tooltip="Skeletons of frame 0."),
            ],
        )

    @staticmethod
    def _file(path: str) -> Path:
        if not path.strip():
            raise ValueError("path: give the path of a keypoint JSON file")
        p = Path(path.strip()).expanduser()
        if not p.is_absolute():
            import folder_paths

            p = Path(folder_paths.get_input_directory()) / p
        return p

    @classmethod
    def fingerprint_inputs(cls, path, **kwargs) -> str:
        """The file's content hash: ComfyUI reruns the node when the file is edited under the same path."""
        try:
            return file_fingerprint(cls._file(path))
        except ValueError:
            return "no path"   # execute() reports what is wrong

    @classmethod
    def execute(cls, path, coords, canvas_width, canvas_height) -> io.NodeOutput:
        frames = keypoints.load_pose_json(cls._file(path), coords, (canvas_height, canvas_width))
        preview = image_out(render.render_skeletons(frames[0].people, frames[0].canvas_hw))
        return io.NodeOutput(keypoints.to_pose_keypoint(frames), preview, ui=ui.PreviewImage(preview, cls=cls))


class PoseFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantFamilyPoseFromImage",
            display_name="InstantFamily Pose from Image (OpenPose)",
            category=CATEGORY,
            description="Detect everyone's pose with controlnet-aux's OpenPose. Needs body_pose_model.pth, "
                        "hand_pose_model.pth and facenet.pth in models/controlnet_aux.",
            inputs=[
                io.Image.Input("image", tooltip="Reference photo(s); one pose frame per image."),
                io.Int.Input("detect_resolution", default=512, min=128, max=2048, step=64,
                             tooltip="Shorter side the image is resized to for detection."),
                io.Boolean.Input("hands", default=False, tooltip="Also detect hand keypoints."),
                io.Boolean.Input("face", default=False, tooltip="Also detect the 70 face keypoints."),
            ],
            outputs=[
                POSE_KEYPOINT.Output(display_name="pose", tooltip="POSE_KEYPOINT, one frame per image, normalised."),
                io.Image.Output(display_name="preview", tooltip="Detected skeletons, one per image."),
            ],
        )

    @classmethod
    def execute(cls, image, detect_resolution, hands, face) -> io.NodeOutput:
        model_dir = detect.find_openpose_dir(openpose_search_folders())
        frames, previews = [], []
        for img in images_uint8(image):
            f = detect.detect_pose(img, model_dir, hands=hands, face=face, detect_resolution=detect_resolution)
            frames.append(f)
            previews.append(image_out(render.render_skeletons(f.people, f.canvas_hw, hands=hands, face=face)))
        preview = torch.cat(previews, 0)
        return io.NodeOutput(keypoints.to_pose_keypoint(frames), preview, ui=ui.PreviewImage(preview, cls=cls))


# ---------------------------------------------------------------- control image + masks

def _layout(pose, frame, width, height, faces, id_count, order, scene_faces):
    """Shared by the control and mask nodes: canvas, people, face boxes, assignment."""
    f = _frames(pose, frame)
    hw = _canvas(f, width, height)
    n = _n_ids(faces, id_count)
    boxes = faceboxes.face_boxes_from_pose(f.people, hw, list(scene_faces) if scene_faces is not None else None)
    ids = assign.assign_ids(boxes, n, order)
    return f, hw, n, boxes, ids


def _id_boxes(boxes, ids, n) -> list:
    return [boxes[i] for i in assign.people_for_ids(ids, n)]


class PoseControl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantFamilyPoseControl",
            display_name="InstantFamily Pose Control + ID Masks (multi person)",
            category=CATEGORY,
            description="OpenPose control image with a circle in each ID's colour at its face, and one mask "
                        "per ID (face box + margin), in ID order (paper sec. 4.2).",
            inputs=[
                POSE_KEYPOINT.Input("pose", tooltip="POSE_KEYPOINT from a template, a file or a detector."),
                FACES.Input("faces", optional=True,
                            tooltip="The stacked identities; their count is the number of IDs placed."),
                io.Int.Input("id_count", default=2, min=0, max=64,
                             tooltip="Number of IDs to place when 'faces' is not connected."),
                io.String.Input("person_ids", default="left_to_right", tooltip=ORDER_TOOLTIP),
                FACES.Input("scene_faces", optional=True,
                            tooltip="Faces detected in the pose's own image: matched to people by position, "
                                    "their boxes replace the keypoint estimates (circles and masks)."),
                io.Int.Input("frame", default=0, min=0, max=100000,
                             tooltip="Which frame of the POSE_KEYPOINT list to use."),
                *_size_inputs(),
                io.Float.Input("circle_scale", default=render.DEFAULT_CIRCLE_SCALE, min=0.0, max=2.0, step=0.01,
                               tooltip="ID circle radius as a fraction of the face box width (min 4 px)."),
                *_mask_inputs(),
                io.Boolean.Input("hands", default=False, tooltip="Draw hand keypoints when the pose has them."),
                io.Boolean.Input("face_keypoints", default=False,
                                 tooltip="Draw the 70 face keypoints when the pose has them."),
            ],
            outputs=[
                io.Image.Output(display_name="control_image", tooltip="For the OpenPose ControlNet."),
                io.Mask.Output(display_name="id_masks", tooltip="MASK batch [N, H, W], mask n = ID n."),
                io.Image.Output(display_name="mask_preview", tooltip="Masks tinted in ID colours over the control."),
            ],
        )

    @classmethod
    def execute(cls, pose, id_count, person_ids, frame, width, height, circle_scale, margin, mask_shape, feather,
                hands, face_keypoints, faces=None, scene_faces=None) -> io.NodeOutput:
        f, hw, n, boxes, ids = _layout(pose, frame, width, height, faces, id_count, person_ids, scene_faces)
        control = render.render_control(f.people, ids, hw, face_boxes=boxes, circle_scale=circle_scale,
                                        hands=hands, face=face_keypoints)
        m = mask_core.id_masks(_id_boxes(boxes, ids, n), hw, margin, mask_shape, feather)
        overlay = mask_core.mask_overlay(m, control)
        control_t, overlay_t = image_out(control), image_out(overlay)
        return io.NodeOutput(control_t, torch.from_numpy(m), overlay_t,
                             ui=ui.PreviewImage(torch.cat([control_t, overlay_t], 0), cls=cls))


class IDMasksNode(io.ComfyNode):
    """Makes the ID masks (not to be confused with attention.masks.IDMasks, which holds them for attention)."""

    SOURCES = ("pose", "face boxes", "user masks")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantFamilyIDMasks",
            display_name="InstantFamily ID Masks (identity regions)",
            category=CATEGORY,
            description="One mask per identity, in ID order, from pose face regions, from detected face "
                        "boxes, or from your own masks; rectangle or ellipse, optional feather.",
            inputs=[
                io.Combo.Input("source", options=list(cls.SOURCES), default="pose",
                               tooltip="pose: face regions of the people the IDs are assigned to; face boxes: "
                                       "'faces' detected in an image of the target layout, ID n = face n; "
                                       "user masks: the 'masks' batch, one per ID."),
                POSE_KEYPOINT.Input("pose", optional=True, tooltip="POSE_KEYPOINT (source = pose)."),
                FACES.Input("faces", optional=True,
                            tooltip="source = pose: the stacked IDs (their count); source = face boxes: the "
                                    "faces whose boxes become the masks."),
                io.Mask.Input("masks", optional=True,
                              tooltip="source = user masks: MASK batch [N, H, W] in ID order, canvas size."),
                io.Int.Input("id_count", default=2, min=0, max=64,
                             tooltip="Number of IDs when 'faces' is not connected (source = pose)."),
                io.String.Input("person_ids", default="left_to_right", tooltip=ORDER_TOOLTIP),
                *_size_inputs(),
                *_mask_inputs(),
            ],
            outputs=[
                io.Mask.Output(display_name="id_masks", tooltip="MASK batch [N, H, W], mask n = ID n."),
                io.Image.Output(display_name="mask_preview", tooltip="Masks tinted in ID colours."),
            ],
        )

    @classmethod
    def execute(cls, source, id_count, person_ids, width, height, margin, mask_shape, feather,
                pose=None, faces=None, masks=None) -> io.NodeOutput:
        m = cls._build(source, id_count, person_ids, width, height, margin, mask_shape, feather, pose, faces, masks)
        preview = image_out(mask_core.mask_overlay(m))
        return io.NodeOutput(torch.from_numpy(m), preview, ui=ui.PreviewImage(preview, cls=cls))

    @staticmethod
    def _build(source, id_count, order, width, height, margin, shape, feather, pose, faces, user_masks):
        if source == "pose":
            if pose is None:
                raise ValueError("source 'pose' needs the 'pose' input connected")
            f, hw, n, boxes, ids = _layout(pose, 0, width, height, faces, id_count, order, None)
            if n == 0:
                raise ValueError("no identities to mask: connect 'faces' or set id_count >= 1")
            return mask_core.id_masks(_id_boxes(boxes, ids, n), hw, margin, shape, feather)
        if source == "face boxes":
            if faces is None or len(faces) == 0:
                raise ValueError("source 'face boxes' needs 'faces' with at least one face")
            src = faces[0].image_size
            hw = fit_canvas(src, width, height, "the faces' photo")
            boxes = [faceboxes.box_in_canvas(f.box, f.image_size, hw) for f in faces]
            return mask_core.id_masks(boxes, hw, margin, shape, feather)
        if source == "user masks":
            if user_masks is None:
                raise ValueError("source 'user masks' needs the 'masks' input connected")
            arr = user_masks.detach().cpu().float().numpy()
            arr = arr[None] if arr.ndim == 2 else arr
            hw = (height or arr.shape[1], width or arr.shape[2])
            n = len(faces) if faces is not None else None
            return mask_core.check_user_masks(arr, n, hw, feather)
        raise ValueError(f"source must be one of {IDMasksNode.SOURCES}, got {source!r}")


class Kps5Control(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantFamilyKps5Control",
            display_name="InstantFamily 5-Keypoint Face Control",
            category=CATEGORY,
            description="InstantID-style image of the five face keypoints (eyes, nose, mouth corners) of "
                        "each identity, an alternative control to OpenPose.",
            inputs=[
                FACES.Input("faces", tooltip="Identities (FACES); ID n's keypoints are drawn."),
                POSE_KEYPOINT.Input("pose", optional=True,
                                    tooltip="When connected, each ID's keypoints are moved into the face of the "
                                            "person it is assigned to; otherwise drawn where they were detected."),
                io.String.Input("person_ids", default="left_to_right", tooltip=ORDER_TOOLTIP),
                *_size_inputs(),
            ],
            outputs=[io.Image.Output(display_name="kps_image", tooltip="Five-keypoint control image.")],
        )

    @classmethod
    def execute(cls, faces, person_ids, width, height, pose=None) -> io.NodeOutput:
        if faces is None or len(faces) == 0:
            raise ValueError("faces: no identities; detect at least one face first")
        if pose is not None:
            f, hw, n, boxes, ids = _layout(pose, 0, width, height, faces, 0, person_ids, None)
            pts = kps5.kps5_for_faces(list(faces), hw, _id_boxes(boxes, ids, n))
        else:
            src = faces[0].image_size
            hw = fit_canvas(src, width, height, "the faces' photo")
            pts = kps5.kps5_for_faces(list(faces), hw)
        img = image_out(kps5.render_kps5(pts, hw))
        return io.NodeOutput(img, ui=ui.PreviewImage(img, cls=cls))


NODES = [PoseTemplate, PoseFromJSON, PoseFromImage, PoseControl, IDMasksNode, Kps5Control]
