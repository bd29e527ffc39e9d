"""Masked cross-attention over [text ; ID 1 ; ... ; ID N] contexts (pure torch, no ComfyUI)."""
from .layout import TEXT_CHUNK, TokenLayout
from .masked import KERNELS, masked_attention, merge_heads, split_heads
from .masks import DEFAULT_MODE, MODES, IDMasks, masked_value

__all__ = [
    "DEFAULT_MODE", "KERNELS", "MODES", "TEXT_CHUNK", "IDMasks", "TokenLayout",
    "masked_attention", "masked_value", "merge_heads", "split_heads",
]
