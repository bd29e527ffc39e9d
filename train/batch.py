"""One training step's batch from prepared samples (InstantFamily sec. 4.2).

Per sample: min(N, N') of its N' faces are chosen at random and put into random slots of the N ID
slots (every slot position is trained equally; the paper's fix for "only the embedding of the first
facial position might be primarily used"); unused slots stay empty (no features, no mask, strength 0).
The control image holds every person's OpenPose skeleton and an ID-coloured circle (palette colour of
the slot) for the chosen faces only, drawn by the pack's pose/render.py; the masks are the chosen
faces' boxes grown by ``cfg.mask_margin`` through pose/masks.py - the same code the nodes run.
Classifier-free dropout flags for the caption and for the IDs are drawn per sample.

Everything random comes from the ``rng`` argument in a fixed order, so a batch is a pure function of
(samples, config, rng state): a resumed run rebuilds exactly the batch it would have built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from ..pose.keypoints import Person
from ..pose.masks import box_mask, expand_box, id_masks
from ..pose.render import draw_id_circles, render_skeletons
from .shards import Sample, ShardError


@dataclass
class Batch:
    """Tensors for one step, on CPU (``to`` moves them). Exactly one of image/latent and one of
    caption/text_embedding is the model's input; the other may be None."""

    image: torch.Tensor | None            # (B, 3, R, R) float32 in [-1, 1]
    latent: torch.Tensor | None           # (B, 4, R/8, R/8) float32, VAE output before scaling
    caption: list[str]
    text_embedding: torch.Tensor | None   # (B, T, d_k) float32, when the shards cached it
    id_global: torch.Tensor               # (B, N, d_gf) float32, zeros in empty slots
    id_local: torch.Tensor                # (B, N, L, L, d_lf) float32, zeros in empty slots
    id_present: torch.Tensor              # (B, N) bool: slot holds a chosen face
    masks: torch.Tensor                   # (B, N, R, R) float32 in {0, 1}, zeros in empty slots
    control: torch.Tensor                 # (B, 3, R, R) float32 in [0, 1]
    drop_text: torch.Tensor               # (B,) bool: caption replaced by the empty prompt
    drop_ids: torch.Tensor                # (B,) bool: every ID replaced by the null identity
    keys: list[str]
    face_index: torch.Tensor              # (B, N) long: which face of the sample is in each slot, -1 if empty

    @property
    def size(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**out)

    def pin_memory(self) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return Batch(**out)


def _resized(sample: Sample, res: int) -> tuple[np.ndarray, float, float]:
    """The image at res x res and the x/y scale factors applied (prepare normally wrote it at res)."""
    h, w = sample.image.shape[:2]
    if (h, w) == (res, res):
        return sample.image, 1.0, 1.0
    from PIL import Image

    img = np.asarray(Image.fromarray(sample.image).resize((res, res), Image.BICUBIC))
    return img, res / w, res / h


def _usable_faces(boxes: np.ndarray, margin: float, res: int) -> list[int]:
    """Faces whose grown box has area and covers at least one pixel of the canvas (others cannot
    get a mask; prepare drops such faces, this keeps a stray one from stopping a run)."""
    ok = []
    for i, b in enumerate(boxes):
        if not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
            continue
        if box_mask(expand_box(b, margin), (res, res)).any():
            ok.append(i)
    return ok


def _people(pose: np.ndarray, sx: float, sy: float, res: int) -> list[Person]:
    """Pixel OpenPose-18 rows of the source image -> Person objects normalised to the canvas."""
    people = []
    for p in np.asarray(pose, np.float32).reshape(-1, 18, 3):
        body = p.copy()
        body[:, 0] = p[:, 0] * sx / res
        body[:, 1] = p[:, 1] * sy / res
        body[p[:, 2] <= 0] = 0.0
        people.append(Person(body=body))
    return people


def make_batch(samples: Sequence[Sample], cfg, rng: np.random.Generator) -> Batch:
    """Build one step's :class:`Batch` (see the module docstring); ``cfg`` is a TrainConfig (uses
    resolution, n_ids, mask_margin, text_dropout, id_dropout)."""
    if not samples:
        raise ValueError("make_batch: no samples given")
    res, n_slots, margin = int(cfg.resolution), int(cfg.n_ids), float(cfg.mask_margin)
    # Feature shapes from any sample that has them (a sample without faces may carry empty arrays).
    first = samples[0]
    with_local = [s for s in samples if s.face_local is not None]
    if not with_local:
        raise ShardError(f"samples {[s.key for s in samples][:3]} have no local face features (an encoder without a "
                         "2-D feature map, e.g. dlib); InstantFamily trains on global + local features: prepare the "
                         "data with the insightface backend")
    d_gf = int(with_local[0].face_embedding.shape[-1])
    local_shape = tuple(int(v) for v in with_local[0].face_local.shape[1:])
    cached_latent = first.latent is not None
    cached_text = first.text_embedding is not None

    images, latents, captions, texts, keys = [], [], [], [], []
    gl, lo, present, masks, controls, face_index = [], [], [], [], [], []
    drop_text, drop_ids = [], []
    for s in samples:
        if (s.latent is not None) != cached_latent or (s.text_embedding is not None) != cached_text:
            raise ShardError(f"sample {s.key!r}: some samples of the batch carry cached latents/text embeddings "
                             "and others do not; prepare all shards with the same options")
        if s.n_faces and (s.face_local is None or tuple(s.face_local.shape[1:]) != local_shape
                          or s.face_embedding.shape[-1] != d_gf):
            raise ShardError(f"sample {s.key!r}: face features of another shape than the batch's first sample "
                             f"(global {d_gf}, local {local_shape}); shards from different encoders are mixed")
        img, sx, sy = _resized(s, res)
        boxes = np.asarray(s.face_boxes, np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])

        # --- faces: which, in which slots (two draws per sample, always in this order)
        usable = _usable_faces(boxes, margin, res)
        k = min(n_slots, len(usable))
        chosen = [usable[i] for i in rng.permutation(len(usable))[:k]]
        slots = rng.permutation(n_slots)[:k]
        g = np.zeros((n_slots, d_gf), np.float32)
        loc = np.zeros((n_slots, *local_shape), np.float32)
        pres = np.zeros(n_slots, bool)
        fidx = np.full(n_slots, -1, np.int64)
        m = np.zeros((n_slots, res, res), np.float32)
        if k:
            m[slots] = id_masks([boxes[f] for f in chosen], (res, res), margin)
        for f, slot in zip(chosen, slots):
            g[slot] = s.face_embedding[f]
            loc[slot] = s.face_local[f]
            pres[slot] = True
            fidx[slot] = f

        # --- control: everyone's skeleton, circles for the chosen faces in their slot's colour
        canvas = render_skeletons(_people(s.pose, sx, sy, res), (res, res))
        canvas = draw_id_circles(canvas, [boxes[f].astype(np.float32) for f in chosen], [int(t) for t in slots])

        # --- classifier-free dropout (two draws per sample, always in this order)
        drop_text.append(bool(rng.random() < cfg.text_dropout))
        drop_ids.append(bool(rng.random() < cfg.id_dropout))

        keys.append(s.key)
        captions.append(s.caption)
        images.append(torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0)
        if cached_latent:
            lat = torch.from_numpy(np.asarray(s.latent, np.float32))
            if lat.ndim != 3 or tuple(lat.shape[1:]) != (res // 8, res // 8):
                raise ShardError(f"sample {s.key!r}: cached latent {tuple(lat.shape)} does not fit resolution {res} "
                                 f"(expected (C, {res // 8}, {res // 8})); re-run prepare at this resolution")
            latents.append(lat)
        if cached_text:
            texts.append(torch.from_numpy(np.asarray(s.text_embedding, np.float32)))
        gl.append(torch.from_numpy(g))
        lo.append(torch.from_numpy(loc))
        present.append(torch.from_numpy(pres))
        face_index.append(torch.from_numpy(fidx))
        masks.append(torch.from_numpy(m))
        controls.append(torch.from_numpy(canvas).permute(2, 0, 1).float() / 255.0)

    if cached_text:
        if len({t.shape[-1] for t in texts}) > 1:
            raise ShardError(f"cached text embeddings of different widths {sorted({t.shape[-1] for t in texts})} "
                             "in one batch; prepare all shards with one text encoder")
        # Long captions cache 154, 231, ... tokens: repeat each to a common multiple, as ComfyUI batches them.
        length = math.lcm(*(t.shape[0] for t in texts))
        texts = [t.repeat(length // t.shape[0], 1) for t in texts]
    return Batch(
        image=torch.stack(images), latent=torch.stack(latents) if cached_latent else None, caption=captions,
        text_embedding=torch.stack(texts) if cached_text else None, id_global=torch.stack(gl),
        id_local=torch.stack(lo), id_present=torch.stack(present), masks=torch.stack(masks),
        control=torch.stack(controls), drop_text=torch.tensor(drop_text, dtype=torch.bool),
        drop_ids=torch.tensor(drop_ids, dtype=torch.bool), keys=keys, face_index=torch.stack(face_index),
    )
