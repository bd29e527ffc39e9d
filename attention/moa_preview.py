"""Router maps as pictures: the personalised share per latent pixel, in the ID palette.

Each pixel is drawn as ``(1 - share) * background + share * colour``, where colour is the ID colour
(palette.py) of the ID whose router mask covers the pixel most, or white where no mask covers it (a
learned router sending non-ID pixels to the personalised expert shows up white). One picture per
resolution, each latent cell a solid block (nearest-neighbour), so users see the grid the layer saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..palette import id_color

BACKGROUND = (24, 24, 24)
UNOWNED = (255, 255, 255)


def owner_colours(masks: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) float colour of the ID owning each pixel (white where no mask covers it)."""
    h, w = size
    out = torch.tensor(UNOWNED, dtype=torch.float32).div(255).expand(h, w, 3).clone()
    if masks is None or masks.shape[0] == 0:
        return out
    m = masks.float()
    if m.ndim == 4:       # per-sample masks: the first sample's
        m = m[0]
    m = F.interpolate(m.unsqueeze(0), size=(h, w), mode="area")[0]
    best, owner = m.max(0)
    palette = torch.tensor([id_color(n) for n in range(m.shape[0])], dtype=torch.float32).div(255)
    covered = best > 0
    out[covered] = palette[owner[covered]]
    return out


def render_router_maps(maps: dict[tuple[int, int], torch.Tensor], masks: torch.Tensor | None,
                       size: tuple[int, int]) -> torch.Tensor:
    """(K, H, W, 3) float images in [0, 1], one per resolution in ``maps`` (from
    ``RouterCapture.maps()``), coloured by the owners in ``masks`` ((N, h, w) image-space ID masks)."""
    if not maps:
        raise ValueError("router_maps: nothing was captured; run a sampler with the MoA model first (and connect "
                         "its output to the preview so the preview runs after it)")
    h, w = size
    colours = owner_colours(masks, size)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).div(255)
    images = []
    for grid, share in maps.items():
        s = F.interpolate(share.float().view(1, 1, *grid), size=(h, w), mode="nearest")[0, 0].clamp(0, 1)
        images.append(background * (1 - s[..., None]) + colours * s[..., None])
    return torch.stack(images)
