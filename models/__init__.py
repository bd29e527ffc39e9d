"""Face encoders, identity projections and the pack's weight file (pure torch/numpy, no ComfyUI)."""
from .projection import IDProjection, ProjectionConfig, stack_context
from .weights import FORMAT_VERSION, WeightFile, WeightFileError, WeightMeta, load_weights, save_weights

__all__ = [
    "FORMAT_VERSION", "IDProjection", "ProjectionConfig", "WeightFile", "WeightFileError", "WeightMeta",
    "load_weights", "save_weights", "stack_context",
]
