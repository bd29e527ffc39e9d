"""Per-person prompts: one line per person, each acting only inside that person's region, in the same
masked attention pass as the identities (no extra UNet pass per region).

- Person Regions: one region per person of the pose (body box + margin), in prompt order
  (``pose.persons``).
- Person Prompts: CLIP-encodes one line per person, keeps the regions, previews them. Its output goes
  into the Embedding Stack, which appends the prompts after the IDs (positive) and the encoding of ""
  with the same token counts (negative), so cond and uncond keep one layout and batch together; the
  regions ride in the stacked conditioning to Apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..pose import keypoints
from ..pose import masks as mask_core
from ..pose import persons
from ..pose.canvas import fit_canvas
from .values import FACES, POSE_KEYPOINT, image_out, images_uint8

CATEGORY = "InstantFamily"
PERSON_PROMPTS = io.Custom("INSTANTFAMILY_PERSON_PROMPTS")
PROMPTS_KEY = "instantfamily_person_prompts"   # in stacked conditioning: the PersonPrompts (regions) for Apply
MAX_SIDE = 8192


@dataclass(eq=False)
class PersonPrompts:
    """What the Embedding Stack and Apply need: per person (prompt order) the line, its CLIP encoding
    (1, T_p, d) or None, the encoding of "" for the negative, the region masks and the prompts' strength."""

    lines: tuple[str, ...]
    cond: tuple[torch.Tensor | None, ...]
    empty: torch.Tensor
    regions: torch.Tensor           # (P, H, W) float32
    strength: float = 1.0

    def __deepcopy__(self, memo):
        return self   # read-only; ComfyUI copies conditioning and options freely

    def positive(self) -> list[torch.Tensor | None]:
        return list(self.cond)

    def negative(self) -> list[torch.Tensor | None]:
        """The encoding of "" per person with a prompt, repeated to that prompt's token count (as ComfyUI
        repeats a shorter context), so the negative has the positive's layout."""
        out = []
        for c in self.cond:
            if c is None:
                out.append(None)
            else:
                reps = math.ceil(c.shape[1] / self.empty.shape[1])
                out.append(self.empty.repeat(1, reps, 1)[:, :c.shape[1]])
        return out

    def region_strength(self) -> list[float]:
        return [self.strength] * len(self.cond)


def _encode(clip, text: str, trim: bool = False) -> torch.Tensor:
    """(1, T, d) CLIP encoding; ``trim``: only the tokens that carry the line (per 77-token chunk: start,
    words, first end token), not the padding, so a region's pixels attend to ~10 tokens instead of 77."""
    tokens = clip.tokenize(text)
    enc = clip.encode_from_tokens(tokens).detach().float().cpu()
    chunks = tokens.get("l") if isinstance(tokens, dict) else None
    if not trim or not chunks or enc.shape[1] != 77 * len(chunks):
        return enc
    return persons.trim_encoding(enc, persons.content_lengths(chunks))


def _lines(prompts: str, regions_json: str | None) -> list[str]:
    lines = persons.prompt_lines(prompts)
    if not any(lines) and regions_json:
        from ..pose.regions import parse_regions

        lines = [r.prompt.strip() for r in parse_regions(regions_json)]
        while lines and not lines[-1]:
            lines.pop()
    return lines


class PersonPromptsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyPersonPrompts",
            display_name="InstantFamily Person Prompts (one line per person)",
            category=CATEGORY,
            description="One prompt line per person, each acting only inside that person's region, in the same "
                        "attention pass as the identities. Line n is ID n's person; lines after the IDs are "
                        "people without a photo. Connect to the Embedding Stack's person_prompts.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint (the same that encodes the main prompt)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One line per person in ID order, e.g. 'red jacket, smiling' / 'holding a "
                                        "balloon'. A blank line: that person has no prompt. Long lines are fine."),
                io.Mask.Input("regions", tooltip="One region per person in the same order (Person Regions, ID "
                                                 "Regions or your own masks); at least as many as lines."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Weight of every person prompt inside its region: 1 neutral, 0 off."),
                io.String.Input("regions_json", optional=True, force_input=True,
                                tooltip="Optional: the region editor's JSON; when 'prompts' is empty, each region's "
                                        "\"prompt\" field is used, in ID order."),
                io.Image.Input("image", optional=True, tooltip="Drawn under the preview (e.g. the control image)."),
                io.Combo.Input("padding", options=["trimmed", "full"], default="trimmed", optional=True,
                               tooltip="trimmed: each line keeps only its own tokens (start, words, end; ~10 for a "
                                       "short line), so the region's pixels attend to far fewer keys: faster, the "
                                       "same words. full: the padded 77-token CLIP chunks, as ConditioningSetMask "
                                       "would use them (the padding carries a summary of the line; choose it to "
                                       "match a regional-conditioning look exactly)."),
            ],
            outputs=[
                PERSON_PROMPTS.Output(display_name="person_prompts", tooltip="For the Embedding Stack."),
                io.Image.Output(display_name="preview",
                                tooltip="Each region in its ID colour with its prompt's first words."),
            ],
        )

    @classmethod
    def execute(cls, clip, prompts: str, regions: torch.Tensor, strength: float, regions_json: str | None = None,
                image: torch.Tensor | None = None, padding: str = "trimmed") -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: connect the checkpoint's CLIP (its text encoder encodes each line)")
        regions = regions.detach().float().cpu()
        if regions.ndim == 2:
            regions = regions.unsqueeze(0)
        lines = _lines(prompts, regions_json)
        if not any(lines):
            raise ValueError("prompts: no prompt given; write one line per person (ID order)")
        if len(lines) > regions.shape[0]:
            raise ValueError(f"prompts: {len(lines)} lines but only {regions.shape[0]} regions; give one region per "
                             "person (Person Regions makes one per person of the pose) or fewer lines")
        lines = lines + [""] * (regions.shape[0] - len(lines))
        empty = [p for p, line in enumerate(lines) if line and not bool((regions[p] > 0).any())]
        if empty:
            raise ValueError(f"regions: region(s) {empty} are empty but their people have prompts; fix the "
                             "regions or leave those lines blank")
        trim = padding == "trimmed"
        cond = tuple(_encode(clip, line, trim) if line else None for line in lines)
        value = PersonPrompts(tuple(lines), cond, _encode(clip, ""), regions.clamp(0, 1), float(strength))
        base = None
        if image is not None and tuple(image.shape[1:3]) == tuple(regions.shape[1:]):
            base = images_uint8(image[:1])[0]
        preview = image_out(persons.prompt_preview(regions.numpy(), lines, base))
        return io.NodeOutput(value, preview, ui=ui.PreviewImage(preview, cls=cls))


def _canvas(frame: keypoints.PoseFrame, width: int, height: int) -> tuple[int, int]:
    """The pose's own canvas, or width x height of the same aspect (one set: the other follows)."""
    return fit_canvas(frame.canvas_hw, width, height, "the pose canvas")


class PersonRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyPersonRegions",
            display_name="InstantFamily Person Regions (body boxes for prompts)",
            category=CATEGORY + "/pose",
            description="One region per person of the pose: the box around all their keypoints and head, plus a "
                        "margin. Order: ID 0's person ... ID N-1's person, then people without an ID left to right.",
            inputs=[
                POSE_KEYPOINT.Input("pose", tooltip="POSE_KEYPOINT from a template, a file or a detector."),
                FACES.Input("faces", optional=True, tooltip="The stacked identities; their count is the number of IDs."),
                io.Int.Input("id_count", default=2, min=0, max=64,
                             tooltip="Number of IDs when 'faces' is not connected (the same as Pose Control's)."),
                io.String.Input("person_ids", default="left_to_right",
                                tooltip="The same ID order as Pose Control's person_ids, so line n is ID n's person."),
                io.Int.Input("frame", default=0, min=0, max=100000, tooltip="Which frame of the pose."),
                io.Int.Input("width", default=0, min=0, max=MAX_SIDE, step=8,
                             tooltip="Canvas width; 0 keeps the pose's (or follows height at the pose's aspect)."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIDE, step=8,
                             tooltip="Canvas height; 0 keeps the pose's (or follows width at the pose's aspect)."),
                io.Float.Input("margin", default=persons.DEFAULT_BODY_MARGIN, min=0.0, max=3.0, step=0.01,
                               tooltip="Body box growth in total (0.2: 20% wider and taller, 10% each side)."),
                io.Combo.Input("mask_shape", options=list(mask_core.SHAPES), default="rect",
                               tooltip="Rectangle = the grown body box; ellipse = the ellipse inscribed in it."),
                io.Int.Input("feather", default=0, min=0, max=256,
                             tooltip="Pixels of linear fall-off outside each region (0 = hard edges)."),
            ],
            outputs=[
                io.Mask.Output(display_name="regions", tooltip="MASK batch [P, H, W], one per person, prompt order."),
                io.Image.Output(display_name="preview", tooltip="The regions tinted in ID colours."),
            ],
        )

    @classmethod
    def execute(cls, pose, id_count: int, person_ids: str, frame: int, width: int, height: int, margin: float,
                mask_shape: str, feather: int, faces=None) -> io.NodeOutput:
        frames = keypoints.frames_from_pose_keypoint(pose)
        if not 0 <= frame < len(frames):
            raise ValueError(f"frame: {frame} requested but the pose holds {len(frames)} frame(s)")
        f = frames[frame]
        n = len(faces) if faces is not None else int(id_count)
        m = persons.person_regions(f, _canvas(f, width, height), n, person_ids, margin, mask_shape, feather)
        preview = image_out(mask_core.mask_overlay(m))
        return io.NodeOutput(torch.from_numpy(m), preview, ui=ui.PreviewImage(preview, cls=cls))


def stacked_prompts(conditioning: list) -> PersonPrompts | None:
    """The PersonPrompts a stacked conditioning carries (the same for every entry), or None."""
    values = {id(extra.get(PROMPTS_KEY)): extra.get(PROMPTS_KEY) for _, extra in conditioning}
    if len(values) != 1:
        raise ValueError("positive and negative carry different person prompts; stack them in one Embedding Stack")
    return values.popitem()[1]


NODES = [PersonPromptsNode, PersonRegions]
