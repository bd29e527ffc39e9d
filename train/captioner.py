"""Captions for photos that have none, from a local transformers image-to-text model folder (BLIP, BLIP-2,
GIT, ... saved with ``save_pretrained``). Never downloads: ``local_files_only=True``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class CaptionerError(ValueError):
    """The --captioner folder cannot be used; the message says what to do."""


class Captioner:
    def __init__(self, folder: str | os.PathLike, device: str | None = None, max_new_tokens: int = 40) -> None:
        path = Path(folder)
        if not path.is_dir():
            raise CaptionerError(f"--captioner {path}: folder not found; give a local transformers image-to-text "
                                 "model folder (e.g. a BLIP-2 download saved with save_pretrained)")
        if not (path / "config.json").is_file():
            raise CaptionerError(f"--captioner {path}: no config.json, so not a transformers model folder; "
                                 "give the folder that holds config.json, the weights and the processor files")
        try:
            import torch
            import transformers
        except ImportError as e:
            raise CaptionerError(f"--captioner needs transformers (pip install transformers): {e}") from e
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
            raise CaptionerError(f"--captioner {path}: transformers cannot load an image-to-text model from it "
                                 f"({type(e).__name__}: {e})") from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_new_tokens = int(max_new_tokens)

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        import torch
        from PIL import Image

        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
