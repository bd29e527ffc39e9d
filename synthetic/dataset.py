"""World scenes written as a ``train prepare`` input folder: ``<key>.png`` + ``<key>.txt`` (caption) +
``<key>.pose.json`` (the scene's people as a ComfyUI ``POSE_KEYPOINT`` value, normalised coordinates)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .world import World


def write_prepare_input(world: World, out: str | os.PathLike, count: int, hw: tuple[int, int] = (128, 128),
                        split: str = "train", people: Sequence[int] = (1, 2, 3, 4), start: int = 0) -> int:
    """Write ``count`` scenes (people per scene cycling through ``people``) into ``out``; returns the count.

    Existing files with the same names are overwritten; the scenes are the same on every run."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + int(count)):
        scene = world.scene(int(people[i % len(people)]), hw, split=split, index=i)
        key = f"world_{split}_{i:06d}"
        Image.fromarray(scene.image).save(out / f"{key}.png")
        (out / f"{key}.txt").write_text(scene.caption + "\n")
        (out / f"{key}.pose.json").write_text(json.dumps(scene.pose_keypoint()))
    return int(count)
