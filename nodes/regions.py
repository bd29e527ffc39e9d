"""The ID-region node: regions drawn in the browser's region editor -> one mask per identity.

The editor (web/instantfamily.js) draws on this node and writes the ``regions`` string widget; the
parsing, validation and masks are in ``pose.regions`` (ComfyUI-free), so an API prompt with the same
text makes the same masks.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pose import regions as region_core
from ..pose.canvas import check_same_aspect
from ..pose.masks import mask_overlay
from .values import FACES

CATEGORY = "InstantFamily/pose"
MAX_SIDE = 8192


def _picture_hw(width: int, height: int, image: torch.Tensor | None) -> tuple[int, int]:
    """The picture size: width/height when set, else the image's; an aspect mismatch between the two is
    an error (the regions were drawn over the image and would be stretched)."""
    img_hw = (int(image.shape[1]), int(image.shape[2])) if image is not None else None
    if width > 0 and height > 0:
        if img_hw is not None:
            check_same_aspect(img_hw, (height, width), "image", "width x height",
                              "Set width and height to 0 (use the image's size) or to the image's aspect ratio.")
        return int(height), int(width)
    if width > 0 or height > 0:
        raise ValueError(f"width={width}, height={height}: set both (the picture size) or both to 0 to use "
                         "the connected image's size")
    if img_hw is None:
        raise ValueError("the picture size is unknown: set width and height, or connect 'image' (e.g. the pose "
                         "control image)")
    return img_hw


class IDRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyIDRegions",
            display_name="InstantFamily ID Regions (draw where each person goes)",
            category=CATEGORY,
            description="Region editor: draw one box or ellipse per identity on the node (over the connected "
                        "image, or a blank canvas of the picture's size); mask n = ID n's region. Add with the "
                        "'+ ID' button or by dragging on empty canvas, move and resize by dragging, Delete "
                        "removes the selected region, Ctrl+Z undoes. The regions are saved in the workflow "
                        "and sent in the prompt as JSON.",
            inputs=[
                io.String.Input("regions", default=region_core.EMPTY,
                                tooltip="The regions as JSON (written by the editor): {\"version\": 1, \"regions\": "
                                        "[{\"id\": 0, \"shape\": \"rect\"|\"ellipse\", \"x\", \"y\", \"w\", \"h\" "
                                        "(fractions of the picture), \"prompt\" (optional, per person)}]}."),
                io.Int.Input("width", default=0, min=0, max=MAX_SIDE, step=8,
                             tooltip="Picture width in pixels (the masks' size); 0 = the connected image's width."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIDE, step=8,
                             tooltip="Picture height in pixels; 0 = the connected image's height."),
                io.Int.Input("feather", default=0, min=0, max=256,
                             tooltip="Pixels of linear fall-off outside each region (0 = hard edges)."),
                io.Image.Input("image", optional=True,
                               tooltip="Drawn under the regions in the editor (e.g. the pose control image); "
                                       "its size is the picture size when width and height are 0."),
                FACES.Input("faces", optional=True,
                            tooltip="The stacked identities: their count must equal the number of regions; "
                                    "after a run the editor snaps boxes to faces detected in the image."),
            ],
            outputs=[
                io.Mask.Output(display_name="id_masks", tooltip="MASK batch [N, H, W], mask n = ID n's region."),
                io.Image.Output(display_name="mask_preview",
                                tooltip="The regions tinted in ID colours (over the image when connected)."),
            ],
        )

    @classmethod
    def execute(cls, regions: str, width: int, height: int, feather: int, image: torch.Tensor | None = None,
                faces=None) -> io.NodeOutput:
        hw = _picture_hw(width, height, image)
        parsed = region_core.parse_regions(regions)
        if not parsed:
            raise ValueError("regions: none drawn; add one region per identity in the editor ('+ ID')")
        if faces is not None and len(faces) != len(parsed):
            raise ValueError(f"regions: {len(parsed)} region(s) drawn but 'faces' holds {len(faces)} identities; "
                             "draw one region per identity")
        masks = region_core.region_masks(parsed, hw, feather)
        base = None
        if image is not None and (int(image.shape[1]), int(image.shape[2])) == hw:
            base = (image[0, ..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()
        preview = torch.from_numpy(mask_overlay(masks, base)).float().div(255.0).unsqueeze(0)
        ui = {}
        if faces is not None and image is not None:
            # face boxes in the image's own coordinates, for the editor's snapping
            ui["instantfamily_faces"] = [region_core.face_regions([f.box], f.image_size)[0] for f in faces
                                         if tuple(f.image_size) == (int(image.shape[1]), int(image.shape[2]))]
        return io.NodeOutput(torch.from_numpy(masks), preview, ui=ui or None)


NODES = [IDRegions]
