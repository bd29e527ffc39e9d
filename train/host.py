"""ComfyUI's model code as the trainer's library: found like the tests find it, no server, no nodes."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def import_comfy(comfyui: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                 cpu: bool | None = None) -> Path:
    """Put ComfyUI's folder on sys.path (``comfyui``, else $COMFYUI_PATH, two folders above the pack,
    /opt/ComfyUI) and return it. ``cpu`` (default: no CUDA device) selects ComfyUI's CPU mode; it only
    applies before ``comfy.model_management`` is first imported. The pack's tiny test checkpoints
    (demo/tiny.py, recognised by their metadata) get their model type registered, so every command that
    loads ``checkpoint`` (prepare's caches, fit) accepts them alike."""
    import torch

    from ..comfy_path import find_comfyui

    path = find_comfyui(comfyui)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    if checkpoint:
        from ..demo.tiny import is_tiny_checkpoint, register_tiny_model_type

        if is_tiny_checkpoint(checkpoint):
            register_tiny_model_type()
    return path


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX): there bf16 autocast made a world fit
    step take 0.63x the time (README); elsewhere it is emulated and slower than fp32. False where unknown."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
