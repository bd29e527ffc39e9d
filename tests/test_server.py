"""A real ComfyUI server (subprocess on 127.0.0.1, CPU, in-memory database) with the pack and the tiny models:
/object_info lists every pack node with tooltips, POST /prompt of a shipped workflow completes."""
from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="ComfyUI and the tiny models need torch")
pytest.importorskip("onnxruntime", reason="the synthetic face pack is exported/checked with onnx tooling")


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    from instantfamily_nodes.demo import headless, tiny

    root = tmp_path_factory.mktemp("server_models")
    tiny.register_tiny_model_type()
    # custom_nodes: the tiny model type's shim (always) + a folder holding the pack under its own name
    models = tiny.build_tiny_models(root, custom_nodes=[headless.pack_custom_nodes_dir()])
    srv = headless.ComfyServer(models.extra_model_paths, comfyui=comfyui, workdir=tmp_path_factory.mktemp("server"))
    srv.start(timeout=240)
    srv.models = models
    yield srv
    srv.stop()


def _pack_node_ids() -> list[str]:
    from instantfamily_nodes.nodes import node_classes

    return sorted(c.GET_SCHEMA().node_id for c in node_classes())


def test_object_info_lists_every_pack_node_with_input_tooltips(server):
    info = server.get("/object_info", timeout=60)
    ids = _pack_node_ids()
    assert ids and not [i for i in ids if i not in info], f"missing from /object_info: {set(ids) - set(info)}"
    untipped = []
    for nid in ids:
        node = info[nid]
        assert node["python_module"].startswith("custom_nodes."), node["python_module"]
        assert node.get("description"), f"{nid} has no description"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    untipped.append(f"{nid}.{name}")
        tips = node.get("output_tooltips") or []
        untipped += [f"{nid} output {i}" for i in range(len(node["output"])) if i >= len(tips) or not tips[i]]
        # one naming scheme, so the pack's nodes sort together and are found by "InstantFamily"
        assert node["display_name"].startswith("InstantFamily "), node["display_name"]
    assert not untipped, f"inputs/outputs without a tooltip: {untipped}"


@pytest.mark.parametrize("name", ["4_people_pose_template"])
def test_post_prompt_of_a_shipped_workflow_completes(server, name):
    from instantfamily_nodes.demo import workflows
    from instantfamily_nodes.demo.__main__ import _prepare_inputs

    m = server.models
    choice = workflows.ModelChoice(checkpoint=m.checkpoint, controlnet=m.controlnet, weights=m.weights,
                                   face_pack=m.face_pack)
    prompt = workflows.bind(workflows.load_workflow(name), choice, max_side=256, steps=1)
    assert _prepare_inputs(prompt, server.workdir / "input", [], [], synthetic_ok=True) == []
    entry = server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    for nid in workflows.save_image_nodes(prompt):
        images = entry["outputs"][nid]["images"]
        assert images and all((server.workdir / "output" / i["subfolder"] / i["filename"]).is_file() for i in images)


def test_invalid_prompt_is_refused_with_the_node_named(server):
    from instantfamily_nodes.demo import headless

    bad = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
           "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}}}
    bad["3"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    bad["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    bad["5"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}
    with pytest.raises(headless.WorkflowError, match=r"node 1 \(CheckpointLoaderSimple\) input 'ckpt_name'"):
        server.run_prompt(bad, timeout=60)


def test_template_browser_lists_the_shipped_workflows(server):
    from urllib.parse import quote

    from instantfamily_nodes.demo import headless, workflow_files, workflows

    listed = server.get("/workflow_templates")
    titles = sorted(workflow_files.title(n) for n in workflows.list_workflows())
    assert sorted(listed.get(headless.PACK_NAME, [])) == titles
    for title in titles:
        ui = server.get(f"/api/workflow_templates/{headless.PACK_NAME}/{quote(title)}.json")
        assert ui["nodes"] and ui["links"] and ui["groups"]
