"""The folder is a plain Python package without ComfyUI and a custom node inside ComfyUI."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from conftest import PACK_ROOT

CORE = ["attention", "models", "pose", "palette.py", "train", "evaluate", "synthetic", "comfy_path.py"]
HOST = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "node_helpers", "execution", "server"}
# The trainers use ComfyUI's model code (comfy.*) as a library, never its nodes, server or node API:
# the pack's trainer and the synthetic world's base-model trainer (the world's stand-in for SD1.5).
TRAINER_MAY_IMPORT = {"comfy"}
TRAINERS = ("train/", "synthetic/base.py")


def test_core_imports_without_comfyui(tmp_path):
    code = ("import sys, instantfamily_nodes.attention, instantfamily_nodes.models; "
            "print(any(m == 'comfy' or m.startswith('comfy.') or m.startswith('comfy_api') for m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_core_sources_never_import_comfy():
    offenders = []
    for entry in CORE:
        path = PACK_ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
        for f in files:
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").split(".")[0] == "nodes":
                    names = ["instantfamily_nodes.nodes"]      # the pack's own ComfyUI glue
                rel = f.relative_to(PACK_ROOT).as_posix()
                allowed = TRAINER_MAY_IMPORT if rel.startswith(TRAINERS) else set()
                for name in names:
                    top = name.split(".")[0]
                    if (top in HOST and top not in allowed) or name.startswith("instantfamily_nodes.nodes"):
                        offenders.append(f"{f.relative_to(PACK_ROOT)} imports {name}")
    assert not offenders, offenders


def test_loads_as_a_comfyui_custom_node(comfyui, tmp_path):
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    (custom / "instantfamily_nodes").symlink_to(PACK_ROOT, target_is_directory=True)
    code = f"""
import asyncio, json, sys
sys.path.insert(0, {str(comfyui)!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
before = set(nodes.NODE_CLASS_MAPPINGS)
ok = asyncio.run(nodes.load_custom_node({str(custom / 'instantfamily_nodes')!r}))
mod = sys.modules[[m for m in sys.modules if m.endswith('instantfamily_nodes') and 'custom_nodes' in m][0]]
expected = sorted(c.GET_SCHEMA().node_id for c in __import__(mod.__name__ + '.nodes', fromlist=['x']).node_classes())
added = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
print(json.dumps({{"ok": ok, "added": added, "expected": expected, "web": list(nodes.EXTENSION_WEB_DIRS)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, out.stderr[-3000:]
    assert result["added"] == result["expected"]
    assert "instantfamily_nodes" in result["web"]


def test_requirements_txt_matches_pyproject():
    import tomllib

    deps = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (PACK_ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(reqs) == sorted(deps)
    assert not any(r.split("=")[0].split(">")[0].strip() in {"torch", "torchvision"} for r in reqs)
