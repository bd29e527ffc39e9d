"""InstantFamily nodes: zero-shot multi-identity portraits for ComfyUI.

This file is both the package root of ``instantfamily_nodes`` (the ComfyUI-free core lives in
``attention/`` and ``models/``) and the ComfyUI custom-node entry point. Nothing here imports ComfyUI
at import time, so ``import instantfamily_nodes.attention`` works in a plain Python environment.
"""
from __future__ import annotations

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point; imports the node glue (and so ComfyUI) only when ComfyUI asks."""
    from .nodes import InstantFamilyExtension

    return InstantFamilyExtension()
