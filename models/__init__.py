"""Face encoders, identity projections and the pack's weight file (pure torch/numpy, no ComfyUI)."""
