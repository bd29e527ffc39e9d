"""ComfyUI node glue: turns ComfyUI values into core calls and back. Imports ComfyUI."""
from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

# Each module lists its node classes in ``NODES``. Add new node modules here.
_NODE_MODULES: tuple[str, ...] = ("faces", "pose", "regions", "prompts", "instantfamily", "moa", "evaluate")


def node_classes() -> list[type[io.ComfyNode]]:
    classes: list[type[io.ComfyNode]] = []
    for name in _NODE_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        classes.extend(module.NODES)
    return classes


class InstantFamilyExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
