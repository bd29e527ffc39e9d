"""Where ComfyUI is: the one lookup the tests, the demo, the benches and the trainer share.

It only finds the folder (it never imports ComfyUI, so core code may use it). Looked at, in order:
an explicit path (when given, only that), $COMFYUI_PATH, two folders above the pack (the pack
installed as ``ComfyUI/custom_nodes/<pack>``), /opt/ComfyUI.
"""
from __future__ import annotations

import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent
DEFAULT_LOCATION = Path("/opt/ComfyUI")
WHERE = "$COMFYUI_PATH, two folders above the pack, /opt/ComfyUI"


def candidates(explicit: str | os.PathLike | None = None) -> list[Path]:
    """The folders looked at, in order."""
    if explicit:
        return [Path(explicit)]
    found = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    return found + [PACK_ROOT.parent.parent, DEFAULT_LOCATION]


def is_comfyui(folder: Path) -> bool:
    return (folder / "comfy" / "model_patcher.py").is_file() and (folder / "main.py").is_file()


def comfyui_or_none(explicit: str | os.PathLike | None = None) -> Path | None:
    """ComfyUI's folder, or None when none of the candidates holds it."""
    for c in candidates(explicit):
        if is_comfyui(c):
            return c.resolve()
    return None


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """ComfyUI's folder; raises FileNotFoundError naming every folder tried."""
    found = comfyui_or_none(explicit)
    if found is None:
        tried = ", ".join(str(c) for c in candidates(explicit))
        raise FileNotFoundError(f"ComfyUI not found (tried {tried}); pass its folder or set COMFYUI_PATH to the "
                                "folder holding ComfyUI's main.py")
    return found
