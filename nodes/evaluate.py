"""Scoring node: generated IMAGE + reference FACES -> SingleSim / MultiSim / FastComposer (/ TextSim)
as text and JSON, and an annotated preview (references | image with ID-coloured boxes | matched crops).

Only turns ComfyUI values into core calls and back; the work is in ``evaluate``.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..evaluate.errors import EvaluationInputError
from ..evaluate.matching import DEFAULT_MIN_OVERLAP, mask_to_region
from ..evaluate.report import sheet_row, text_summary
from ..evaluate.run import Request, evaluate
from ..evaluate.score import MATCH_MODES
from ..models.faces.image import as_image_list
from .values import FACE_ENCODER, FACES, image_arrays, images_out

CATEGORY = "InstantFamily/evaluate"

# CLIP ViT-L/14 is 1.7 GB: load it once per (location, device), not on every queue.
_TEXTSIM_CACHE: dict[tuple[str, str], object] = {}


def _textsim(clip_model: str):
    from ..evaluate.textsim import load_textsim

    key = (clip_model.strip() or "none", "cpu")
    if key[0].lower() == "none":
        return None
    if key not in _TEXTSIM_CACHE:
        _TEXTSIM_CACHE[key] = load_textsim(None if key[0].lower() == "auto" else key[0])
    return _TEXTSIM_CACHE[key]


def split_masks(id_masks: torch.Tensor | None, n_images: int, n_ids: int) -> list[list[np.ndarray] | None]:
    """MASK [N, H, W] (shared by every image) or [B*N, H, W] (image-major) -> per image, per ID."""
    if id_masks is None:
        return [None] * n_images
    m = id_masks.detach().cpu().float().numpy()
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] == n_ids:
        return [list(m)] * n_images
    if m.shape[0] == n_images * n_ids:
        return [list(m[k * n_ids:(k + 1) * n_ids]) for k in range(n_images)]
    raise EvaluationInputError(
        f"id_masks: got {m.shape[0]} masks for {n_ids} IDs and {n_images} images; give one mask per ID "
        f"({n_ids}, shared by all images) or one per ID per image ({n_images * n_ids}, image by image)")


def split_prompts(prompt: str, n_images: int) -> list[str | None]:
    lines = [ln.strip() for ln in (prompt or "").splitlines() if ln.strip()]
    if not lines:
        return [None] * n_images
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise EvaluationInputError(f"prompt: {len(lines)} lines for {n_images} images; write one prompt per line "
                                   "per image, or a single line for all")
    return lines


class ScoreIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyScoreIdentities",
            display_name="InstantFamily Score Identities",
            category=CATEGORY,
            description="Scores generated images against the reference faces: SingleSim per ID (InstantFamily "
            "eq. 10), MultiSim (eq. 11, any number of IDs), FastComposer's greedy-min score, missing faces, "
            "and TextSim (eq. 9) when CLIP weights are available. Numbers depend on the face encoder: "
            "compare only scores made with the same one.",
            inputs=[
                FACE_ENCODER.Input("face_encoder", tooltip="The same encoder that made the references "
                                   "(embeddings of different encoders cannot be compared)."),
                FACES.Input("references", tooltip="One face per ID, in ID order (from Encode Faces)."),
                io.Image.Input("images", tooltip="Generated images; each is scored against every reference."),
                io.Combo.Input("match", options=list(MATCH_MODES), default="auto",
                               tooltip="How generated faces are given to IDs. regions: by id_masks (the face must "
                               "be where the ID was placed). greedy: by similarity (FastComposer). auto: "
                               "regions when id_masks are connected."),
                io.Mask.Input("id_masks", optional=True,
                              tooltip="The ID masks used for generation: [N, H, W] for all images, or [B*N, H, W] "
                              "image by image."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="For TextSim: one line for all images or one line per image."),
                io.String.Input("clip_model", default="none",
                                tooltip="TextSim's CLIP: 'none' (off), 'auto' (openai/clip-vit-large-patch14 from "
                                "the Hugging Face cache; never downloaded) or a local CLIP folder."),
                io.Float.Input("min_overlap", default=DEFAULT_MIN_OVERLAP, min=0.01, max=1.0, step=0.01,
                               tooltip="Least overlap of a face box with its ID mask for the face to count as "
                               "that ID's."),
            ],
            outputs=[io.String.Output(display_name="scores", tooltip="Per image and mean scores, as text."),
                     io.String.Output(display_name="scores_json", tooltip="Everything, as JSON."),
                     io.Image.Output(display_name="preview",
                                     tooltip="Per image: references | boxes in ID colours | matched crops.")],
        )

    @classmethod
    def execute(cls, face_encoder, references, images: torch.Tensor, match: str, prompt: str = "",
                clip_model: str = "none", min_overlap: float = DEFAULT_MIN_OVERLAP,
                id_masks: torch.Tensor | None = None) -> io.NodeOutput:
        import comfy.utils

        if references is None or len(references) == 0:
            raise EvaluationInputError("references: no faces; connect Encode Faces with one face per ID")
        rgb = as_image_list(image_arrays(images))
        n = len(references)
        masks = split_masks(id_masks, len(rgb), n)
        prompts = split_prompts(prompt, len(rgb))
        names = [f"ID {k}" for k in range(n)]
        requests = [Request(name=f"image {k}", image=im, ids=list(range(n)), prompt=p,
                            regions=None if ms is None else
                            (lambda size, ms=ms: [mask_to_region(x, size) for x in ms]))
                    for k, (im, ms, p) in enumerate(zip(rgb, masks, prompts))]
        ts = _textsim(clip_model) if any(prompts) else None
        bar = comfy.utils.ProgressBar(len(rgb))
        result = evaluate(face_encoder, references, names, requests, match=match, min_overlap=min_overlap,
                          textsim=ts, progress=lambda done: bar.update_absolute(done, len(rgb)))
        rows = [np.asarray(sheet_row(result, sc, im)) for sc, im in zip(result.scores, rgb)]
        preview = images_out(rows)
        return io.NodeOutput(text_summary(result), json.dumps(result.to_dict()), preview,
                             ui=ui.PreviewImage(preview, cls=cls))


NODES = [ScoreIdentities]
