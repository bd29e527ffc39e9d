"""Nodes that read a file by name rerun when the file changes under that name (ComfyUI caches a node
by its inputs, and the name stays the same). Through ComfyUI's real executor."""
from __future__ import annotations

import json

import torch

from instantfamily_nodes.demo.headless import _ServerStub
from instantfamily_nodes.models.id_stack import IDStack, load_id_stack, save_id_stack


def test_load_id_stack_reruns_when_the_stack_file_is_rewritten(comfyui, tmp_path, monkeypatch):
    import execution
    import folder_paths
    import nodes

    from instantfamily_nodes.nodes.instantfamily import LoadIDStack, SaveIDStack

    for cls in (LoadIDStack, SaveIDStack):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, cls.GET_SCHEMA().node_id, cls)
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "instantfamily", ([], set()))
    ids_dir = tmp_path / "instantfamily" / "ids"
    ids_dir.mkdir(parents=True)
    save_id_stack(ids_dir / "family.safetensors", IDStack(torch.zeros(2, 5, 8), "test"))
    prompt = {"1": {"class_type": "InstantFamilyLoadIDStack", "inputs": {"stack_name": "ids/family.safetensors"}},
              "2": {"class_type": "InstantFamilySaveIDStack", "inputs": {"ids": ["1", 0], "name": "copy"}}}
    ex = execution.PromptExecutor(_ServerStub())

    def run(pid: str) -> list:
        ex.execute(json.loads(json.dumps(prompt)), pid, {}, ["2"])
        assert ex.success, ex.status_messages
        return [m[1]["nodes"] for m in ex.status_messages if m[0] == "execution_cached"][0]

    assert run("a") == []
    assert "1" in run("b")                            # same file: the loader is served from the cache
    save_id_stack(ids_dir / "family.safetensors", IDStack(torch.ones(3, 5, 8), "test"))
    assert "1" not in run("c")                        # rewritten: loaded again
    assert torch.equal(load_id_stack(ids_dir / "copy.safetensors").tokens, torch.ones(3, 5, 8))
