"""Shared test fixtures: where ComfyUI is, and how to import it for real (never mocked)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent


def find_comfyui() -> Path | None:
    """ComfyUI's folder: $COMFYUI_PATH, else two folders above the pack (custom_nodes), else /opt/ComfyUI."""
    candidates: list[Path] = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    candidates += [PACK_ROOT.parent.parent, Path("/opt/ComfyUI")]
    for c in candidates:
        if (c / "comfy" / "model_patcher.py").is_file():
            return c.resolve()
    return None


COMFYUI_PATH = find_comfyui()
NO_COMFYUI_REASON = (
    "ComfyUI not found (looked at $COMFYUI_PATH, two folders above the pack, /opt/ComfyUI); "
    "set COMFYUI_PATH to run the ComfyUI tests"
)


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """Puts the real ComfyUI on sys.path (CPU mode) or skips with the reason. Once found, import
    errors are failures, not skips: a broken ComfyUI environment must not pass as 'no ComfyUI'."""
    if COMFYUI_PATH is None:
        pytest.skip(NO_COMFYUI_REASON)
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return COMFYUI_PATH
