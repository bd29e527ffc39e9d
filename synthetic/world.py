"""The synthetic world: K procedural identities, their appearances, and scenes of 1-10 stick people.

**Identities.** Each identity is a small "face" tile (width w, height 1.25 w, the aspect of a detector's
face box, :data:`pose.faceboxes.FACE_ASPECT`) made of a skin colour, a hair style and colour, a pattern
(stripes, checks, dots ...) in a pattern colour, an eye shape and colour and a mouth. Identities are drawn
from a seed so that any two differ in at least :data:`MIN_ATTRIBUTE_DISTANCE` coarse attributes: identity
is learnable, but never a single colour.

**Appearances.** Every time a face is drawn it gets its own jitter (brightness, colour cast, pattern phase,
eye position, size, position, pixel noise), drawn from a random stream named by ``(world seed, split,
index)``. The ``train`` and ``test`` splits use disjoint streams: evaluation sees held-out appearances.

**Scenes.** 1-10 people left to right (training uses 1-7 on a square; :func:`canvas_for` widens the canvas
for more people than the square holds), each an OpenPose-18 skeleton (:class:`pose.keypoints.Person`, so
the pack's own :func:`pose.render.render_control` draws the control image) whose head keypoints give
back exactly the world's face box through :func:`pose.faceboxes.face_box_from_pose`; the face tile sits
on that box, the body is a stick figure in a dark colour on a dark background, with a caption.

**Brightness contract** (what :mod:`.detector` relies on): every face pixel has a channel above
:data:`FACE_MIN_MAX_CHANNEL`; every other pixel has all channels below :data:`SCENE_MAX_CHANNEL`. Faces
are separated by at least 0.25 x the slot width, so no two face boxes (nor their +25 % masks) touch.

Everything is numpy + OpenCV (cv2, which controlnet-aux brings), seeded and reproducible.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..pose.faceboxes import FACE_ASPECT
from ..pose.keypoints import N_BODY, Person

# ArcFace's 5-point template in its 112 x 112 crop (insightface.utils.face_align.arcface_dst): left eye,
# right eye, nose, left and right mouth corner. Copied so that importing the world needs no insightface.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

DEFAULT_IDENTITIES = 24
MAX_PEOPLE = 10
SPLITS = {"train": 1, "test": 2, "reference": 3, "recognizer": 4}
MIN_ATTRIBUTE_DISTANCE = 3
FACE_MIN_MAX_CHANNEL = 150    # every face pixel: max(R, G, B) above this (after jitter and noise)
SCENE_MAX_CHANNEL = 115       # every non-face pixel: max(R, G, B) below this
FACE_THRESHOLD = 127.5        # the detector's cut between the two (its input's zero point)
# A face is this fraction of its person's slot (canvas width / people) wide, +-7 %, its centre within
# +-4 % of the slot's: big heads, because at 8x latent down-scaling every face pixel counts (a face of a
# 7-person 128 px scene is ~11 px: 1.4 latent pixels), and neighbours still 0.25 slot apart.
FACE_FRACTION = 0.6

HAIR_STYLES = ("none", "cap", "tall", "sides")
PATTERNS = ("plain", "hstripes", "vstripes", "checker", "diagonal", "dots")
EYE_SHAPES = ("round", "square", "hbar", "vbar")
MOUTHS = ("none", "wide", "small")
PATTERN_COLOURS = ((245, 245, 245), (250, 235, 60), (60, 235, 250), (250, 120, 230), (150, 250, 90),
                   (250, 160, 70))
BACKGROUNDS = {  # dark, so faces stand out for the detector; name -> RGB
    "navy": (18, 24, 70), "forest": (18, 58, 28), "maroon": (68, 16, 22), "charcoal": (42, 42, 46),
    "teal": (12, 56, 60), "brown": (62, 40, 18), "plum": (52, 22, 60), "olive": (52, 56, 16),
}
TEXTURES = ("plain", "gradient", "stripes", "spots")
BODY_COLOURS = ((92, 92, 100), (100, 80, 60), (60, 90, 100), (96, 70, 96))

# OpenPose-18 limbs drawn for the stick figure's body (joint index pairs)
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (1, 11), (8, 9), (9, 10), (11, 12),
         (12, 13), (8, 11), (2, 8), (5, 11))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def face_width(n_people: int, hw: tuple[int, int]) -> float:
    """The nominal face width of a scene of ``n_people`` on an (H, W) canvas: 0.6 of a person's slot
    (W / people), at most 0.24 of the shorter side. The world draws no face under 8 px."""
    h, w = hw
    return min(FACE_FRACTION * (w / n_people), 0.24 * min(h, w))


def world_fits(n_people: int, side: int) -> bool:
    """Whether ``n_people`` fit a square canvas of ``side`` px (faces of at least 8 px)."""
    return face_width(n_people, (side, side)) >= 8


# SD1.5's UNet halves the latent grid three times and the VAE down-scales 8x: canvas sides in steps of 64
# keep every level's grid whole
CANVAS_STEP = 64


def canvas_for(n_people: int, size: int) -> tuple[int, int]:
    """(height, width) of a scene of ``n_people`` at ``size``: the square if they fit it, else ``size`` high
    and the narrowest width, in steps of :data:`CANVAS_STEP`, whose faces keep the world's 8 px floor (a
    group photo of more people is wider: 10 people at 128 px get 128 x 192, faces ~11.5 px like 7 people's
    ~11 px on the square)."""
    n = int(n_people)
    if not 1 <= n <= MAX_PEOPLE:
        raise ValueError(f"n_people must be 1..{MAX_PEOPLE}, got {n_people}")
    if world_fits(n, size):
        return size, size
    if size < CANVAS_STEP:
        raise ValueError(f"a {size} px high canvas holds no face of 8 px for {n} people (a face is at most 0.24 "
                         f"of the height); use a size of at least {CANVAS_STEP}")
    if size % CANVAS_STEP:
        raise ValueError(f"{n} people do not fit a {size} px square and a wider canvas grows in steps of "
                         f"{CANVAS_STEP} px (the latent grid halves three times): use a size that is a multiple "
                         f"of {CANVAS_STEP} (64, 128, 192, ...)")
    width = size          # at least 64 high: 0.24 of it is over 8 px, so only the width can be short
    while face_width(n, (size, width)) < 8:
        width += CANVAS_STEP
    return size, width


def check_bench_ns(ns: str, size: int, identities: int) -> list[int]:
    """The people counts of a bench's ``ns`` ("1,2,10"), each drawable at ``size`` (:func:`canvas_for`) from
    ``identities`` distinct identities; a clear error naming ``ns`` otherwise."""
    try:
        counts = [int(n) for n in str(ns).split(",")]
    except ValueError:
        raise ValueError(f"ns={ns!r}: expected people counts separated by commas, like 1,2,3,4,7,10") from None
    for n in counts:
        try:
            canvas_for(n, size)
        except ValueError as exc:
            raise ValueError(f"ns={ns!r}: {exc}") from None
        if n > identities:
            raise ValueError(f"ns={ns!r}: a scene of {n} people needs {n} distinct identities but the world has "
                             f"{identities}; use more identities or fewer people")
    return counts


@dataclass(frozen=True)
class Identity:
    """One person of the world: everything that stays the same across appearances."""

    index: int
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    pattern: str
    pattern_colour: tuple[int, int, int]
    eyes: str
    eye_colour: tuple[int, int, int]
    mouth: str
    coarse: tuple[int, ...] = field(repr=False, default=())   # the attributes distinctness is counted on


@dataclass
class Scene:
    """One rendered picture of the world and everything known about it."""

    image: np.ndarray                 # (H, W, 3) uint8 RGB
    people: list[Person]              # OpenPose-18, normalised coordinates, left to right
    boxes: np.ndarray                 # (n, 4) float32 pixel face boxes x0, y0, x1, y1 (person order)
    kps: np.ndarray                   # (n, 5, 2) float32 pixel face keypoints (ArcFace order)
    identities: list[int]             # identity index of each person
    caption: str
    split: str
    index: int

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def pose_keypoint(self) -> list[dict]:
        """The scene's pose as a ComfyUI ``POSE_KEYPOINT`` value (one frame, normalised coordinates)."""
        from ..pose.keypoints import PoseFrame, to_pose_keypoint

        return to_pose_keypoint([PoseFrame(people=self.people, canvas_hw=self.hw)])


def face_kps(box: Sequence[float]) -> np.ndarray:
    """The 5 keypoints of a world face box: ArcFace's template on the square of side = box height centred
    on the box, so insightface's ``norm_crop`` maps exactly that square onto its 112 x 112 crop."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = y1 - y0
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2], np.float32)
    return (centre + (ARCFACE_DST / 112.0 - 0.5) * side).astype(np.float32)


class World:
    """K identities drawn from ``seed``; scenes, portraits and face tiles of them, all reproducible."""

    def __init__(self, n_identities: int = DEFAULT_IDENTITIES, seed: int = 0) -> None:
        if not 2 <= int(n_identities) <= 64:
            raise ValueError(f"n_identities must be 2..64, got {n_identities}")
        self.seed = int(seed)
        self.identities: list[Identity] = self._draw_identities(int(n_identities))

    def __len__(self) -> int:
        return len(self.identities)

    # ------------------------------------------------------------------ identities

    def _draw_identities(self, k: int) -> list[Identity]:
        rng = np.random.default_rng([self.seed, 0, 0])
        chosen: list[Identity] = []
        tries = 0
        while len(chosen) < k:
            tries += 1
            if tries > 100_000:
                raise RuntimeError(f"could not draw {k} distinct identities")
            skin_h = int(rng.integers(12))
            skin_s = int(rng.integers(2))
            hair_h = int(rng.integers(12))
            style = int(rng.integers(len(HAIR_STYLES)))
            pattern = int(rng.integers(len(PATTERNS)))
            pcol = int(rng.integers(len(PATTERN_COLOURS)))
            eyes = int(rng.integers(len(EYE_SHAPES)))
            eye_white = int(rng.integers(2))
            mouth = int(rng.integers(len(MOUTHS)))
            # coarse attributes: hues in 6 buckets, so two identities never differ by a near-hue alone
            coarse = (skin_h // 2, hair_h // 2 if style else -1, style, pattern, eyes)
            if any(sum(a != b for a, b in zip(coarse, c.coarse)) < MIN_ATTRIBUTE_DISTANCE for c in chosen):
                continue
            skin = _hsv(skin_h / 12, (0.35, 0.6)[skin_s], 0.9)
            hair = _hsv(hair_h / 12 + 0.04, 0.8, 0.86)
            chosen.append(Identity(
                index=len(chosen), skin=skin, hair=hair, hair_style=HAIR_STYLES[style], pattern=PATTERNS[pattern],
                pattern_colour=PATTERN_COLOURS[pcol], eyes=EYE_SHAPES[eyes],
                eye_colour=(245, 245, 245) if eye_white else hair, mouth=MOUTHS[mouth], coarse=coarse))
        return chosen

    def rng(self, split: str, index: int) -> np.random.Generator:
        """The random stream of one appearance/scene: disjoint between splits and indices."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        return np.random.default_rng([self.seed, SPLITS[split], int(index)])

    # ------------------------------------------------------------------ one face

    def render_face(self, identity: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
        """One appearance of ``identity`` as an (h, w, 3) uint8 tile (every pixel bright, see the contract)."""
        ident = self.identities[identity]
        ss = int(min(8, max(2, np.ceil(64 / max(w, 1)))))     # supersampling: clean shapes even at 8 px
        hh, ww = h * ss, w * ss
        v, u = np.meshgrid((np.arange(hh) + 0.5) / hh, (np.arange(ww) + 0.5) / ww, indexing="ij")
        aspect = h / w
        img = np.empty((hh, ww, 3), np.float32)
        img[:] = ident.skin
        phase = rng.uniform(0, 1)
        hair_bottom = {"none": 0.0, "cap": 0.22, "tall": 0.36, "sides": 0.12}[ident.hair_style]
        if ident.pattern != "plain":
            if ident.pattern == "hstripes":
                m = np.mod(v * 3.5 + phase, 1) < 0.5
            elif ident.pattern == "vstripes":
                m = np.mod(u * 3.0 + phase, 1) < 0.5
            elif ident.pattern == "checker":
                m = (np.mod(u * 2.5 + phase, 1) < 0.5) ^ (np.mod(v * 3.0 + phase, 1) < 0.5)
            elif ident.pattern == "diagonal":
                m = np.mod((u + v * aspect) * 2.2 + phase, 1) < 0.5
            else:  # dots on a 3 x 4 lattice
                du = np.mod(u * 3 + phase, 1) - 0.5
                dv = np.mod(v * 4 + phase, 1) - 0.5
                m = du ** 2 + (dv * 4 / 3 * aspect) ** 2 < 0.3 ** 2
            m &= v >= hair_bottom
            img[m] = ident.pattern_colour
        if ident.hair_style != "none":
            hair = v < hair_bottom
            if ident.hair_style == "sides":
                hair |= (u < 0.16) | (u > 0.84)
            img[hair] = ident.hair
        ey = 0.46 + rng.uniform(-0.03, 0.03)
        r = 0.1
        for ex in (0.3, 0.7):
            du = np.abs(u - ex - rng.uniform(-0.02, 0.02))
            dv = np.abs(v - ey) * aspect
            if ident.eyes == "round":
                m = du ** 2 + dv ** 2 < r ** 2
            elif ident.eyes == "square":
                m = np.maximum(du, dv) < r * 0.9
            elif ident.eyes == "hbar":
                m = (du < r * 1.5) & (dv < r * 0.55)
            else:
                m = (du < r * 0.55) & (dv < r * 1.5)
            img[m] = ident.eye_colour
        if ident.mouth != "none":
            half_w, half_h = (0.24, 0.035) if ident.mouth == "wide" else (0.08, 0.06)
            m = (np.abs(u - 0.5) < half_w) & (np.abs(v - 0.8) < half_h)
            img[m] = ident.hair
        img = img.reshape(h, ss, w, ss, 3).mean((1, 3))           # area downsample
        img = img * rng.uniform(0.86, 1.1) + rng.uniform(-8, 8, size=3)   # brightness + colour cast
        img += rng.normal(0, 4.0, size=img.shape)
        # The contract: a face pixel stays bright whatever the jitter (dimmest allowed is clamped up).
        peak = img.max(-1, keepdims=True)
        img = np.where(peak < FACE_MIN_MAX_CHANNEL + 8, img + (FACE_MIN_MAX_CHANNEL + 8 - peak), img)
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ scenes

    def _background(self, hw: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, str]:
        h, w = hw
        name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        base = np.array(BACKGROUNDS[name], np.float32)
        img = np.empty((h, w, 3), np.float32)
        img[:] = base
        yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
        if texture == "gradient":
            img *= (0.7 + 0.5 * (yy if rng.integers(2) else xx))[..., None]
        elif texture == "stripes":
            period = rng.uniform(0.08, 0.2)
            img *= (1.0 + 0.25 * (np.mod((xx + yy * rng.uniform(-1, 1)) / period, 1) < 0.5))[..., None]
        elif texture == "spots":
            for _ in range(int(rng.integers(3, 8))):
                cy, cx, rad = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] *= 1.3
        return img, f"{'' if texture == 'plain' else texture + ' '}{name}"

    def _person(self, cx: float, cy: float, fw: float, hw: tuple[int, int], rng: np.random.Generator,
                pose: str) -> np.ndarray:
        """(18, 3) pixel keypoints whose head joints give back the face box of width ``fw`` centred at
        (cx, cy) through pose.faceboxes (centre = mean of nose and eyes; width = ear-to-ear)."""
        fh = fw * FACE_ASPECT
        pts: dict[int, tuple[float, float]] = {
            0: (0.0, 0.1 * fh), 14: (-0.18 * fw, -0.05 * fh), 15: (0.18 * fw, -0.05 * fh),
            16: (-0.5 * fw, 0.0), 17: (0.5 * fw, 0.0), 1: (0.0, 1.05 * fw),
        }
        nx, ny = pts[1]
        sh = 0.75 * fw
        pts[2], pts[5] = (nx - sh, ny + 0.1 * fw), (nx + sh, ny + 0.1 * fw)
        for side, (s, e, wr) in ((-1, (2, 3, 4)), (1, (5, 6, 7))):
            ang = rng.uniform(-0.5, 0.5) + (1.9 if pose == "waving" and side == 1 else 0.0)
            sx, sy = pts[s]
            ex, ey = sx + side * 0.8 * fw * np.sin(0.25 + ang * 0.5), sy + 0.8 * fw * np.cos(ang * 0.5)
            if pose == "waving" and side == 1:
                ex, ey = sx + 0.8 * fw, sy - 0.6 * fw
                pts[wr] = (ex + 0.2 * fw, ey - 0.9 * fw)
            else:
                pts[wr] = (ex + side * 0.2 * fw * rng.uniform(-1, 1), ey + 0.75 * fw)
            pts[e] = (ex, ey)
        hip_y = ny + 1.5 * fw
        pts[8], pts[11] = (nx - 0.45 * fw, hip_y), (nx + 0.45 * fw, hip_y)
        if pose == "seated":
            pts[9], pts[12] = (nx - 0.55 * fw, hip_y + 0.1 * fw), (nx + 0.55 * fw, hip_y + 0.1 * fw)
            pts[10], pts[13] = (nx - 0.6 * fw, hip_y + 1.2 * fw), (nx + 0.6 * fw, hip_y + 1.2 * fw)
        else:
            spread = rng.uniform(0.0, 0.25) * fw
            pts[9], pts[12] = (nx - 0.4 * fw - spread / 2, hip_y + 0.9 * fw), (nx + 0.4 * fw + spread / 2, hip_y + 0.9 * fw)
            pts[10], pts[13] = (nx - 0.4 * fw - spread, hip_y + 1.8 * fw), (nx + 0.4 * fw + spread, hip_y + 1.8 * fw)
        out = np.zeros((N_BODY, 3), np.float32)
        h, w = hw
        for j, (dx, dy) in pts.items():
            x, y = cx + dx, cy + dy
            if 0 <= x < w and 0 <= y < h:
                out[j] = (x, y, 1.0)
        return out

    def scene(self, n_people: int, hw: tuple[int, int] = (128, 128), split: str = "train", index: int = 0,
              identities: Sequence[int] | None = None) -> Scene:
        """A picture of ``n_people`` (1..10) distinct identities (random unless given), left to right."""
        n = int(n_people)
        if not 1 <= n <= MAX_PEOPLE:
            raise ValueError(f"n_people must be 1..{MAX_PEOPLE}, got {n_people}")
        if n > len(self.identities):
            raise ValueError(f"n_people={n} but the world has only {len(self.identities)} identities")
        h, w = int(hw[0]), int(hw[1])
        rng = self.rng(split, index)
        if identities is None:
            ids = [int(i) for i in rng.choice(len(self.identities), size=n, replace=False)]
        else:
            ids = [int(i) for i in identities]
            if len(ids) != n or len(set(ids)) != n or not all(0 <= i < len(self.identities) for i in ids):
                raise ValueError(f"identities must be {n} distinct indices in 0..{len(self.identities) - 1}, "
                                 f"got {list(identities)}")
        slot = w / n
        base = face_width(n, (h, w))
        if base < 8:
            raise ValueError(f"a {w}x{h} canvas is too small for {n} people (faces would be under 8 px); "
                             f"use at least {int(np.ceil(8 / FACE_FRACTION * n))} px width")
        img, bg_name = self._background((h, w), rng)
        pose_kind = str(rng.choice(["standing", "standing", "seated", "waving"]))
        body_colour = BODY_COLOURS[int(rng.integers(len(BODY_COLOURS)))]
        thickness = max(1, int(round(0.14 * base)))
        boxes, people_px = [], []
        for i in range(n):
            fw = max(8, int(round(base * rng.uniform(0.93, 1.07))))
            fh = int(round(fw * FACE_ASPECT))
            cx = (i + 0.5) * slot + rng.uniform(-0.04, 0.04) * slot
            cy = h * (rng.uniform(0.2, 0.34) if pose_kind != "seated" else rng.uniform(0.3, 0.45))
            x0 = int(np.clip(round(cx - fw / 2), 1, w - fw - 1))
            y0 = int(np.clip(round(cy - fh / 2), 1, h - fh - 1))
            boxes.append((x0, y0, x0 + fw, y0 + fh))
            people_px.append(self._person(x0 + fw / 2, y0 + fh / 2, fw, (h, w), rng, pose_kind))
        import cv2

        canvas = img.copy()
        for pts in people_px:   # bodies first, faces on top
            for a, b in LIMBS:
                if pts[a, 2] > 0 and pts[b, 2] > 0:
                    cv2.line(canvas, (int(round(pts[a, 0])), int(round(pts[a, 1]))),
                             (int(round(pts[b, 0])), int(round(pts[b, 1]))), body_colour, thickness, cv2.LINE_AA)
        canvas += rng.normal(0, 3.0, size=canvas.shape)
        canvas = np.clip(canvas, 0, SCENE_MAX_CHANNEL - 5)
        for (x0, y0, x1, y1), ident in zip(boxes, ids):
            canvas[y0:y1, x0:x1] = self.render_face(ident, x1 - x0, y1 - y0, rng)
        image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        people = []
        for pts in people_px:
            body = pts.copy()
            body[:, 0] /= w
            body[:, 1] /= h
            people.append(Person(body=body))
        box_arr = np.array(boxes, np.float32).reshape(-1, 4)
        noun = "person" if n == 1 else "people"
        verb = {"standing": "standing", "seated": "sitting", "waving": "waving"}[pose_kind]
        caption = f"a photo of {n} {noun} {verb} in front of a {bg_name} wall"
        return Scene(image=image, people=people, boxes=box_arr,
                     kps=np.stack([face_kps(b) for b in box_arr]), identities=ids, caption=caption,
                     split=split, index=int(index))

    def portrait(self, identity: int, hw: tuple[int, int] = (128, 128), split: str = "reference",
                 index: int = 0) -> Scene:
        """A one-person picture of ``identity``: the reference photo its features are taken from."""
        return self.scene(1, hw, split=split, index=index * 997 + int(identity), identities=[identity])

    def scenes(self, count: int, hw: tuple[int, int] = (128, 128), split: str = "train", start: int = 0,
               people: Sequence[int] = (1, 2, 3, 4, 5, 6, 7)) -> list[Scene]:
        """``count`` scenes with the number of people cycling through ``people``."""
        return [self.scene(people[(start + i) % len(people)], hw, split, start + i) for i in range(count)]
