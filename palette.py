"""The one identity palette: face boxes, pose circles, mask overlays and router maps all use it.

ID n (0-based, in stack order) is drawn in ``ID_COLORS[n % len(ID_COLORS)]``. The colours are chosen
to be far from the OpenPose limb colours near a face (those are saturated hues at full value) so a
ControlNet can tell a face circle from a limb, and far from each other for the first eight IDs.
"""
from __future__ import annotations

# RGB, 0-255. Order matters: it is the ID order users see in every preview.
ID_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),    # 0 red
    (60, 180, 75),    # 1 green
    (0, 130, 200),    # 2 blue
    (255, 225, 25),   # 3 yellow
    (145, 30, 180),   # 4 purple
    (70, 240, 240),   # 5 cyan
    (245, 130, 48),   # 6 orange
    (240, 50, 230),   # 7 magenta
    (128, 128, 0),    # 8 olive
    (0, 128, 128),    # 9 teal
    (170, 110, 40),   # 10 brown
    (128, 0, 0),      # 11 maroon
    (170, 255, 195),  # 12 mint
    (0, 0, 128),      # 13 navy
    (250, 190, 212),  # 14 pink
    (255, 255, 255),  # 15 white
)


def id_color(index: int) -> tuple[int, int, int]:
    """RGB colour of identity ``index`` (wraps after 16 IDs)."""
    if index < 0:
        raise ValueError(f"identity index must be >= 0, got {index}")
    return ID_COLORS[index % len(ID_COLORS)]
