"""Face detection, alignment and identity features (ComfyUI-free)."""
from .types import Face, Faces

__all__ = ["Face", "Faces"]
