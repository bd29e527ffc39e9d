"""Projected identities: encode a family once, save the tokens, reuse them in any prompt."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .faces.encode import require_local
from .faces.types import Faces
from .projection import IDProjection

STACK_FORMAT = "instantfamily-ids"


@dataclass
class IDStack:
    """(N, L*L + 1, d_K) ID tokens in stack order, and the face encoder they came from."""

    tokens: torch.Tensor
    face_encoder: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"ID tokens must be (N, tokens, width), got {tuple(self.tokens.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def tokens_per_id(self) -> int:
        return self.tokens.shape[1]


def project_faces(faces: Faces, projection: IDProjection, face_encoder: str) -> IDStack:
    """Project every face of ``faces`` (global + local features) into ID tokens."""
    if len(faces) == 0:
        raise ValueError("faces: no identities given; encode at least one face")
    require_local(faces, "faces: the ID projection")
    if faces.encoder and faces.encoder != face_encoder:
        raise ValueError(f"faces were encoded with {faces.encoder!r}, but the weights were trained on "
                         f"{face_encoder!r}; encode the faces with the same model")
    p = projection.global_proj.weight
    g = torch.from_numpy(np.stack([f.embedding for f in faces])).to(p)
    loc = torch.from_numpy(np.stack([f.local for f in faces])).to(p)
    with torch.no_grad():
        tokens = projection(g, loc)
    return IDStack(tokens.float().cpu(), face_encoder)


def save_id_stack(path: str | Path, stack: IDStack) -> None:
    save_file({"tokens": stack.tokens.contiguous()}, str(path),
              metadata={"format": STACK_FORMAT, "face_encoder": stack.face_encoder})


def load_id_stack(path: str | Path) -> IDStack:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: ID stacks are .safetensors files")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != STACK_FORMAT or "tokens" not in f.keys():
                raise ValueError(f"{path}: not an InstantFamily ID stack (format {md.get('format')!r}); "
                                 "save one with the Save ID Stack node")
            return IDStack(f.get_tensor("tokens").float(), md.get("face_encoder", ""))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
