"""Cached VAE latents and CLIP text embeddings for ``train prepare``, from an SD1.5 checkpoint loaded
by ComfyUI's own loader (``comfy.sd``) used as a library: no server, no nodes, no folder_paths.

Why cache: a VAE encode is about a third of an uncached training step's FLOPs, and the text encoder is
frozen, so both are the same at every epoch.

What is stored (the fit reader relies on it):
- ``latent``: ``vae.encode(pixels)`` exactly as ComfyUI's VAE Encode node returns it, for pixels in 0..1:
  the distribution's mean, NOT multiplied by SD's 0.18215 (the model's ``process_latent_in`` does that).
- ``text_embedding``: ``clip.encode_from_tokens(clip.tokenize(caption))[0]``, (T, 768) with T = 77 per
  77-token chunk, as ComfyUI's CLIP Text Encode gives it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


from .host import import_comfy


class CheckpointError(ValueError):
    """The --checkpoint cannot serve (missing, not SD1.5); the message says what to do."""


def comfyui_version(path: Path) -> str:
    f = path / "comfyui_version.py"
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


class Encoders:
    """The VAE and/or text encoder of one SD1.5 checkpoint (the UNet is never loaded)."""

    def __init__(self, checkpoint: str | os.PathLike, latents: bool, text: bool,
                 comfyui: str | os.PathLike | None = None) -> None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path}: file not found; give an SD1.5 checkpoint "
                                  "(.safetensors, the file ComfyUI's Load Checkpoint reads)")
        self.comfyui = import_comfy(comfyui, checkpoint)
        import comfy.model_detection
        import comfy.sd
        import comfy.supported_models
        import comfy.utils

        try:
            sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
            raise CheckpointError(f"--checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from e
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
        config = comfy.model_detection.model_config_from_unet(sd, prefix, metadata=metadata)
        if not isinstance(config, comfy.supported_models.SD15):
            found = type(config).__name__ if config is not None else "no known model"
            raise CheckpointError(f"--checkpoint {path}: ComfyUI detects {found}, not SD1.5; InstantFamily trains "
                                  "on SD1.5 (the ID projection's width and the ControlNet are SD1.5's)")
        _, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
            sd, output_vae=latents, output_clip=text, output_model=False, metadata=metadata)
        del sd
        self.path, self.vae, self.clip = path, vae if latents else None, clip if text else None

    def latents(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, C, H/8, W/8) float32 (C = 4 for SD1.5)."""
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
        with torch.inference_mode():
            return self.vae.encode(pixels).float().cpu().numpy()

    def text(self, captions: list[str]) -> list[np.ndarray]:
        """Each caption -> (T, 768) float32 (T = 77 per chunk of 75 tokens)."""
        import torch

        out = []
        with torch.inference_mode():
            for c in captions:
                cond = self.clip.encode_from_tokens(self.clip.tokenize(c))
                out.append(cond[0].float().cpu().numpy())
        return out
