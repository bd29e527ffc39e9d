"""The world at a glance: held-out scenes of 1, 2, 4 and 7 people above their control images (the README's
``synthetic/world_scenes.png``, rebuilt by ``python -m instantfamily_nodes.synthetic sheet --out PNG``)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..pose.render import render_control
from .world import World

GAP = 4   # px of white between tiles


def scenes_sheet(world: World, ns: Sequence[int] = (1, 2, 4, 7), size: int = 128, split: str = "test") -> np.ndarray:
    """(2 size + GAP, len(ns) size + (len(ns) - 1) GAP, 3) uint8: row 1 the scenes, row 2 their control images
    (skeletons and ID circles from the pack's renderer, person i drawn as ID i)."""
    if not ns:
        raise ValueError("ns must name at least one number of people")
    tiles = []
    for i, n in enumerate(ns):
        scene = world.scene(int(n), (size, size), split, i)
        tiles.append((scene.image, render_control(scene.people, list(range(int(n))), scene.hw, scene.boxes)))
    sheet = np.full((2 * size + GAP, len(ns) * size + (len(ns) - 1) * GAP, 3), 255, np.uint8)
    for i, (image, control) in enumerate(tiles):
        x = i * (size + GAP)
        sheet[:size, x:x + size] = image
        sheet[size + GAP:, x:x + size] = control
    return sheet
