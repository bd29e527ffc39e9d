"""Masked cross-attention over [text ; ID 1 ; ... ; ID N] contexts (pure torch, no ComfyUI)."""
