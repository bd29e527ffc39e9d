"""Shipped pose templates: keypoint JSONs (POSE_KEYPOINT format, normalised) with rendered previews,
so a user needs only identity photos (paper sec. 3.5). Authored by :mod:`.template_author`."""
from __future__ import annotations

import json
from pathlib import Path

from .keypoints import PoseFrame, frames_from_pose_keypoint

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def list_templates() -> list[str]:
    """Template names (file stems), sorted; names start with the number of people."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def template_path(name: str) -> Path:
    path = TEMPLATE_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown pose template {name!r}; available: {', '.join(list_templates())}")
    return path


def preview_path(name: str) -> Path:
    """The rendered control preview (IDs left to right) shipped next to the template."""
    return template_path(name).with_suffix(".png")


def template_pose_keypoint(name: str) -> list[dict]:
    """The template as a POSE_KEYPOINT value (list with one frame dict)."""
    return json.loads(template_path(name).read_text(encoding="utf-8"))


def load_template(name: str) -> PoseFrame:
    return frames_from_pose_keypoint(template_pose_keypoint(name), coords="normalized")[0]
