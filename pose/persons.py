"""Person regions for per-person prompts: body boxes from the pose, in prompt order, and their preview.
ComfyUI-free.

A person's prompt ("red jacket, holding a balloon") concerns the whole person, so its region is wider
than the face mask: the box around all of the person's visible keypoints (body, face, hands) and the
estimated face box (the head reaches above the eyes and ears), grown by ``margin`` (the rule of
:func:`pose.masks.expand_box`: ``margin`` x the box's size in total, half on each side).

Prompt order (the "one line per person" order): the people carrying IDs 0..N-1 first, in ID order, so
line n is ID n's person; then the people without an identity, left to right by the centre of their
body box.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..palette import id_color
from .assign import assign_ids, people_for_ids
from .faceboxes import face_box_from_pose
from .keypoints import Person, PoseFrame
from .masks import box_mask, expand_box, feather_mask, mask_overlay

DEFAULT_BODY_MARGIN = 0.2
PREVIEW_WORDS = 5


def body_box(person: Person, canvas_hw: tuple[int, int]) -> np.ndarray | None:
    """Pixel box (x0, y0, x1, y1) around every visible keypoint of ``person`` and its estimated face
    box, on a (H, W) canvas; None when no keypoint is visible."""
    h, w = canvas_hw
    points = [a[a[:, 2] > 0, :2] for a in (person.body, person.face, person.hand_left, person.hand_right)
              if a is not None]
    points = np.concatenate(points) if points else np.zeros((0, 2))
    if not len(points):
        return None
    xy = points * np.array([w, h], np.float64)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    face = face_box_from_pose(person, canvas_hw)
    if face is not None:
        x0, y0 = min(x0, face[0]), min(y0, face[1])
        x1, y1 = max(x1, face[2]), max(y1, face[3])
    # A single visible joint has no extent: give it one pixel so the margin has something to grow.
    if x1 - x0 < 1:
        x0, x1 = x0 - 0.5, x0 + 0.5
    if y1 - y0 < 1:
        y0, y1 = y0 - 0.5, y0 + 0.5
    return np.array([x0, y0, x1, y1], np.float64)


def prompt_order(people: Sequence[Person], n_ids: int, order: str = "left_to_right") -> list[int]:
    """Indices into ``people`` in prompt order: ID 0's person, ..., ID N-1's person, then the people
    without an ID left to right (body box centre; people with no visible keypoint are left out)."""
    ids = assign_ids(list(people), n_ids, order) if n_ids else [None] * len(people)
    first = people_for_ids(ids, n_ids)
    rest = []
    for i, person in enumerate(people):
        if ids[i] is None:
            box = body_box(person, (1, 1))
            if box is not None:
                rest.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, i))
    return first + [i for _, _, i in sorted(rest)]


def person_regions(
    frame: PoseFrame,
    canvas_hw: tuple[int, int],
    n_ids: int,
    order: str = "left_to_right",
    margin: float = DEFAULT_BODY_MARGIN,
    shape: str = "rect",
    feather: float = 0,
) -> np.ndarray:
    """(P, H, W) float32: one region per person of the pose, in prompt order (see the module doc)."""
    if not frame.people:
        raise ValueError("the pose has no people; per-person prompts need a pose with people in it")
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    out = []
    for i in prompt_order(frame.people, n_ids, order):
        box = body_box(frame.people[i], (h, w))
        m = box_mask(expand_box(box, margin), (h, w), shape)
        if not m.any():
            raise ValueError(f"the body box of person {i} ({np.round(box, 1).tolist()}) lies outside the "
                             f"{w}x{h} canvas")
        out.append(feather_mask(m, feather))
    return np.stack(out).astype(np.float32)


def prompt_lines(text: str) -> list[str]:
    """One prompt per line, in prompt order; blank lines are people without a prompt (trailing blank
    lines are dropped)."""
    lines = [line.strip() for line in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def first_words(prompt: str, n: int = PREVIEW_WORDS) -> str:
    words = prompt.replace(",", ", ").split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def prompt_preview(regions: np.ndarray, prompts: Sequence[str], base: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: each region tinted and outlined in its person's palette colour, with the first
    words of its prompt written in that colour at the region's top-left corner (person p in
    ``id_color(p)``: the ID colour for people with an ID)."""
    from PIL import Image, ImageDraw, ImageFont

    regions = np.asarray(regions, np.float32)
    if regions.ndim == 2:
        regions = regions[None]
    img = Image.fromarray(mask_overlay(regions, base, alpha=0.35))
    draw = ImageDraw.Draw(img)
    h, w = regions.shape[1:]
    font = ImageFont.load_default(size=max(10, min(h, w) // 28))
    for p, m in enumerate(regions):
        ys, xs = np.nonzero(m > 0)
        if not len(xs):
            continue
        color = id_color(p)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        draw.rectangle([x0, y0, x1, y1], outline=color, width=max(1, min(h, w) // 200))
        text = first_words(prompts[p]) if p < len(prompts) and prompts[p] else "(no prompt)"
        label = f"{p}: {text}"
        tx, ty = x0 + 3, y0 + 3
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=color, font=font)
    return np.array(img, np.uint8)


END_TOKEN = 49407      # SD1's CLIP tokenizer: end of text, also its padding


def content_lengths(chunks: list[list[tuple]]) -> list[int]:
    """Per 77-token chunk of ComfyUI's SD1 tokenizer output (``clip.tokenize(text)["l"]``): how many tokens
    carry the line (start token, the words, the first end token); the rest is padding."""
    out = []
    for chunk in chunks:
        ids = [t[0] for t in chunk]
        first_end = next((i for i in range(1, len(ids)) if int(ids[i]) == END_TOKEN), len(ids) - 1)
        out.append(first_end + 1)
    return out


def trim_encoding(encoding, lengths: list[int], chunk: int = 77):
    """The rows of a CLIP encoding (1, chunks * 77, d) that carry each chunk's content, concatenated.

    CLIP's text encoder is causal, so these rows are exactly what the full encoding gives them: dropping
    the padding after them changes nothing they hold, only what attends to them."""
    import torch

    if encoding.shape[1] != chunk * len(lengths):
        raise ValueError(f"encoding has {encoding.shape[1]} tokens, expected {chunk} x {len(lengths)} chunks")
    return torch.cat([encoding[:, k * chunk: k * chunk + n] for k, n in enumerate(lengths)], dim=1)
