"""The pack's demo: a tiny SD1.5-shaped model set (``tiny``), a headless runner through ComfyUI's real
executor and a server helper (``headless``), shipped workflows (``workflows``), and the command
``python -m instantfamily_nodes.demo``. Imports ComfyUI (lazily); not part of the ComfyUI-free core."""
