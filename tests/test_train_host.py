"""The trainer's commands get ComfyUI's model code the same way: found like the tests find it, and the
pack's tiny test checkpoints registered for prepare's caches and for fit alike (a fresh process each)."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from instantfamily_nodes.train.host import import_comfy
path = import_comfy(checkpoint=sys.argv[1] or None, cpu=True)
import comfy.cli_args, comfy.supported_models
print(path, comfy.cli_args.args.cpu, any(getattr(c, "instantfamily_tiny", False) for c in comfy.supported_models.models))
"""


def test_tiny_checkpoints_are_registered_and_others_are_not(comfyui, tmp_path):
    from instantfamily_nodes.demo.tiny import build_tiny_models

    tiny = build_tiny_models(tmp_path / "tiny")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(other))
    for ckpt, registered in ((tiny.root / "checkpoints" / tiny.checkpoint, "True"), (other, "False")):
        out = subprocess.run([sys.executable, "-c", CODE, str(ckpt)], capture_output=True, text=True, timeout=300,
                             env={"COMFYUI_PATH": str(comfyui), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        path, cpu, got = out.stdout.split()[-3:]
        assert path == str(comfyui) and cpu == "True" and got == registered, (ckpt, out.stdout)
