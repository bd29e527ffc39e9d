"""Pose and regions, ComfyUI-free: OpenPose input (detector, POSE_KEYPOINT, JSON, templates), the
control image with ID-coloured face circles, ID assignment, per-ID masks and the 5-keypoint image.

Coordinates: people are normalised to their canvas; face boxes and masks are in pixels of the
canvas they are made for (H, W). IDs are 0-based in stack order and coloured by ``palette.id_color``.
"""
from __future__ import annotations

from .assign import AssignmentError, assign_ids, parse_order, people_for_ids
from .faceboxes import face_box_from_pose, face_boxes_from_pose, face_center_from_pose, match_faces
from .keypoints import (
    Person,
    PoseFormatError,
    PoseFrame,
    frames_from_pose_keypoint,
    load_pose_json,
    to_pose_keypoint,
)
from .masks import check_user_masks, expand_box, id_masks, mask_overlay
from .render import render_control, render_skeletons
from .templates import list_templates, load_template

__all__ = [
    "AssignmentError", "assign_ids", "parse_order", "people_for_ids",
    "face_box_from_pose", "face_boxes_from_pose", "face_center_from_pose", "match_faces",
    "Person", "PoseFormatError", "PoseFrame", "frames_from_pose_keypoint", "load_pose_json",
    "to_pose_keypoint", "check_user_masks", "expand_box", "id_masks", "mask_overlay",
    "render_control", "render_skeletons", "list_templates", "load_template",
]
