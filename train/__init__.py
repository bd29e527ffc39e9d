"""The trainer: ``python -m instantfamily_nodes.train prepare|fit|export`` (ComfyUI's model code as a
library, never its nodes or server)."""
