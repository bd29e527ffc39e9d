"""TextSim (InstantFamily eq. 9): cos(E_ct(prompt), E_ci(image)) with CLIP, ViT-L/14 as FastComposer.

The weights are used only when they are already on disk: a folder given by the user, or the Hugging
Face cache entry of openai/clip-vit-large-patch14. When they are absent TextSim is skipped, never
downloaded, and the message says how to get them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import EvaluationInputError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HOW_TO_GET = (f"to compute it, pip install transformers and download the weights once "
              f"(`hf download {DEFAULT_CLIP}`, or huggingface-cli download), or pass --clip /path/to/clip-folder")


@dataclass
class TextSimStatus:
    """What happened to TextSim: the scorer (or None) and a message for the report."""

    scorer: TextSim | None
    message: str


class TextSim:
    """CLIP text-image cosine for (image, prompt) pairs, in batches."""

    def __init__(self, location: str | os.PathLike, device: str = "cpu", cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 8) -> None:
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch = torch
        kw = {"local_files_only": True, "cache_dir": cache_dir}
        self.model = CLIPModel.from_pretrained(str(location), **kw).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(str(location), **kw)
        self.device = device
        self.batch_size = int(batch_size)
        self.location = str(location)
        v = self.model.config.vision_config
        self.arch = f"ViT-{_size_name(v.hidden_size)}/{v.patch_size}"
        self.is_paper_model = (v.hidden_size, v.patch_size, v.image_size) == (1024, 14, 224)

    def describe(self) -> str:
        note = "" if self.is_paper_model else " - not ViT-L/14: not comparable with published TextSim numbers"
        return f"CLIP {self.arch} from {self.location}{note}"

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise EvaluationInputError(f"TextSim: {len(images)} images but {len(prompts)} prompts; give one prompt per image")
        out: list[float] = []
        for s in range(0, len(images), self.batch_size):
            imgs = [np.array(im) for im in images[s: s + self.batch_size]]  # a writable copy for torch
            txt = [str(p) for p in prompts[s: s + self.batch_size]]
            # CLIP's text encoder sees at most 77 tokens (FastComposer truncates the same way).
            inp = self.processor(text=txt, images=imgs, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings)
            with self.torch.no_grad():
                res = self.model(**{k: v.to(self.device) for k, v in inp.items()})
            t = res.text_embeds / res.text_embeds.norm(dim=-1, keepdim=True)
            i = res.image_embeds / res.image_embeds.norm(dim=-1, keepdim=True)
            out += [float(x) for x in (t * i).sum(-1).cpu()]
        return out


def _size_name(hidden: int) -> str:
    return {768: "B", 1024: "L", 1280: "H", 1664: "g"}.get(int(hidden), f"{hidden}d")


def load_textsim(clip: str | os.PathLike | None = None, device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None) -> TextSimStatus:
    """``clip``: a local CLIP folder, 'none' to switch TextSim off, or None for the cached ViT-L/14.

    A folder the user named but that is missing or broken is an error (they asked for it); a missing
    cache entry is a skip with a message."""
    if clip is not None and str(clip).lower() == "none":
        return TextSimStatus(None, "TextSim off (--clip none)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        return TextSimStatus(None, f"TextSim skipped: transformers is not installed; {HOW_TO_GET}")
    if clip is not None:
        path = os.path.expanduser(str(clip))
        if not os.path.isdir(path):
            raise EvaluationInputError(f"--clip {clip}: no such folder; give a folder with a CLIP model "
                                       f"(config.json, model weights, tokenizer) or leave it out")
        try:
            return TextSimStatus(ts := TextSim(path, device=device), f"TextSim: {ts.describe()}")
        except (OSError, ValueError) as exc:
            raise EvaluationInputError(f"--clip {clip}: not a usable CLIP folder ({str(exc)[:300]})") from exc
    try:
        ts = TextSim(DEFAULT_CLIP, device=device, cache_dir=cache_dir)
    except OSError:
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        return TextSimStatus(None, f"TextSim skipped: CLIP ViT-L/14 weights ({DEFAULT_CLIP}) are not in the "
                                   f"Hugging Face cache ({where}); {HOW_TO_GET}")
    return TextSimStatus(ts, f"TextSim: {ts.describe()}")
