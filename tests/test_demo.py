"""The demo's tiny model set through ComfyUI's real loaders, and the headless runner (real executor, CPU)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="ComfyUI and the tiny models need torch")
pytest.importorskip("onnxruntime", reason="the synthetic face pack is exported/checked with onnx tooling")


@pytest.fixture(scope="session")
def tiny_models(comfyui, tmp_path_factory):
    from instantfamily_nodes.demo import tiny

    tiny.register_tiny_model_type()
    return tiny.build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def comfy_headless(comfyui, tiny_models, tmp_path_factory):
    """ComfyUI imported in this process with its nodes and the pack registered by ComfyUI's own loader."""
    from instantfamily_nodes.demo import headless

    work = tmp_path_factory.mktemp("comfy_io")
    headless.setup_comfyui(comfyui, extra_model_paths=[tiny_models.extra_model_paths], cpu=True,
                           output_dir=work / "output", input_dir=work / "input", quiet=True)
    return headless


def _tiny_choice(models):
    from instantfamily_nodes.demo.workflows import ModelChoice

    return ModelChoice(checkpoint=models.checkpoint, controlnet=models.controlnet, weights=models.weights,
                       face_pack=models.face_pack)


# ---------------------------------------------------------------- the tiny set

def test_tiny_set_layout_sizes_and_yaml(tiny_models):
    import yaml

    root = tiny_models.root
    files = {
        root / "checkpoints" / tiny_models.checkpoint: 40e6,
        root / "controlnet" / tiny_models.controlnet: 10e6,
        root / "instantfamily" / tiny_models.weights: 2e6,
    }
    for f, limit in files.items():
        assert f.is_file() and f.stat().st_size < limit, f
    assert sorted(p.suffix for p in (root / "insightface" / "models" / "antelopev2").iterdir()) == [".onnx", ".onnx"]
    conf = yaml.safe_load(tiny_models.extra_model_paths.read_text())["instantfamily_tiny"]
    assert Path(conf["base_path"]) == root
    assert conf["checkpoints"] == "checkpoints" and conf["instantfamily"] == "instantfamily"
    assert str(tiny_models.shim_dir) in conf["custom_nodes"]


def test_tiny_weights_fit_the_synthetic_face_pack(tiny_models):
    from instantfamily_nodes.models import load_weights
    from instantfamily_nodes.models.faces import synthetic

    wf = load_weights(tiny_models.root / "instantfamily" / tiny_models.weights,
                      expect={"face_encoder": "insightface/antelopev2", "d_k": 768, "L": 7})
    net = synthetic.arcface_like()  # the recognizer make_model_pack exports
    local = net.bn2.num_features
    assert (wf.meta.d_gf, wf.meta.d_lf, wf.meta.attention_mode) == (net.fc.out_features, local, "hard")
    proj = wf.projection()
    tokens = proj(torch.randn(2, wf.meta.d_gf), torch.randn(2, 7, 7, local))
    assert tokens.shape == (2, 50, 768) and torch.isfinite(tokens).all()


def test_tiny_weights_are_seeded_and_fully_initialised(comfyui):
    from instantfamily_nodes.demo import tiny

    a, b, c = tiny.controlnet_state_dict(5), tiny.controlnet_state_dict(5), tiny.controlnet_state_dict(6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_register_tiny_model_type_is_idempotent_and_leaves_sd15_alone(comfyui):
    import comfy.model_detection
    import comfy.supported_models
    from instantfamily_nodes.demo import tiny

    cls = tiny.register_tiny_model_type()
    assert tiny.register_tiny_model_type() is cls
    models = comfy.supported_models.models
    # one tiny type and one world type (the synthetic world's 16-channel base), each registered once
    assert sum(getattr(m, "instantfamily_tiny", False) and not getattr(m, "instantfamily_world", False)
               for m in models) == 1
    assert sum(getattr(m, "instantfamily_world", False) for m in models) == 1
    real = dict(tiny.UNET_CONFIG, model_channels=320, channel_mult=[1, 2, 4, 4])
    assert type(comfy.model_detection.model_config_from_unet_config(real)) is comfy.supported_models.SD15
    assert type(comfy.model_detection.model_config_from_unet_config(dict(tiny.UNET_CONFIG))) is cls
    world = comfy.model_detection.model_config_from_unet_config(
        dict(tiny.UNET_CONFIG, in_channels=tiny.WORLD_LATENT_CHANNELS, out_channels=tiny.WORLD_LATENT_CHANNELS))
    assert getattr(world, "instantfamily_world", False) and world.latent_format.latent_channels == 16
    assert not world.inpaint_model()
    # wider world UNets (synthetic base --unet-channels) are the world type too, never the 32-channel tiny one
    for width in (64, 96):
        wide = comfy.model_detection.model_config_from_unet_config(
            dict(tiny.UNET_CONFIG, model_channels=width, in_channels=tiny.WORLD_LATENT_CHANNELS,
                 out_channels=tiny.WORLD_LATENT_CHANNELS))
        assert getattr(wide, "instantfamily_world", False)
    assert comfy.model_detection.model_config_from_unet_config(dict(tiny.UNET_CONFIG, model_channels=64)) is None


def test_tiny_checkpoint_and_controlnet_load_through_core_nodes_and_sample(comfy_headless, tiny_models):
    import comfy.controlnet
    import comfy.model_detection
    import comfy.utils
    import nodes
    from instantfamily_nodes.demo import tiny

    sd = comfy.utils.load_torch_file(str(tiny_models.root / "checkpoints" / tiny_models.checkpoint))
    assert comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.") == tiny.UNET_CONFIG

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.checkpoint)
    assert getattr(model.model.model_config, "instantfamily_tiny", False)
    assert type(vae.first_stage_model).__name__ == "TAESD"
    (control_net,) = nodes.ControlNetLoader().load_controlnet(tiny_models.controlnet)
    assert isinstance(control_net, comfy.controlnet.ControlNet)

    (pos,) = nodes.CLIPTextEncode().encode(clip, "two people in a park")
    (neg,) = nodes.CLIPTextEncode().encode(clip, "")
    assert pos[0][0].shape == (1, 77, 768)  # SD1.5's context shape
    hint = torch.rand(1, 256, 256, 3)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control_net, hint, 1.0, 0.0, 1.0)
    (latent,) = nodes.EmptyLatentImage().generate(256, 256, 1)
    (out,) = nodes.common_ksampler(model, 0, 1, 5.0, "euler", "normal", pos, neg, latent)
    assert out["samples"].shape == (1, 4, 32, 32) and torch.isfinite(out["samples"]).all()
    (img,) = nodes.VAEDecode().decode(vae, out)
    assert img.shape == (1, 256, 256, 3) and torch.isfinite(img).all()


# ---------------------------------------------------------------- headless runner

def test_every_shipped_workflow_validates_and_runs_headless(comfy_headless, tiny_models):
    from PIL import Image

    from instantfamily_nodes.demo import workflows

    import folder_paths

    from instantfamily_nodes.demo.__main__ import _prepare_inputs

    names = workflows.list_workflows()
    assert names, "no shipped API-format workflows"
    for name in names:
        prompt = workflows.bind(workflows.load_workflow(name), _tiny_choice(tiny_models), max_side=256, steps=1)
        # synthetic photos (one bright-square "face" each) for the Load Image nodes
        assert _prepare_inputs(prompt, Path(folder_paths.get_input_directory()), [], [], synthetic_ok=True) == []
        result = comfy_headless.run_prompt(prompt)
        saved = workflows.save_image_nodes(prompt)
        assert saved, f"{name}: no SaveImage node"
        for nid, prefix in saved.items():
            files = result.image_files(nid)
            assert files and all(f.is_file() for f in files), (name, nid, result.outputs)
            if prefix.endswith(("/image", "/pose_masks")):  # picture-sized outputs follow the bound size
                w, h = Image.open(files[0]).size
                assert (h, w) == workflows.picture_size(prompt) and max(w, h) <= 256


def test_kept_cache_reruns_only_what_changed_and_matches_a_fresh_run(comfy_headless, tiny_models):
    """run_prompt(keep_cache=True) keeps one executor, as ComfyUI's server does: a second run of the same
    graph re-executes nothing whose inputs are unchanged (the loaders), a new seed re-samples, and each
    picture equals the one a fresh executor draws for that prompt (no stale output)."""
    import numpy as np
    from PIL import Image

    from instantfamily_nodes.demo import workflows

    import folder_paths

    from instantfamily_nodes.demo.__main__ import _prepare_inputs

    prompt = workflows.bind(workflows.load_workflow("pose_controlnet_plumbing"), _tiny_choice(tiny_models),
                            max_side=128, steps=2)
    _prepare_inputs(prompt, Path(folder_paths.get_input_directory()), [], [], synthetic_ok=True)
    (sampler,) = [k for k, n in prompt.items() if n["class_type"] == "KSampler"]
    (saver,) = [k for k, v in workflows.save_image_nodes(prompt).items() if v.endswith("/image")]

    def picture(result):
        return np.asarray(Image.open(result.image_files(saver)[-1]))

    def cached(result):
        return set(sum((d["nodes"] for ev, d in result.messages if ev == "execution_cached"), []))

    comfy_headless.drop_kept_cache()
    try:
        first = comfy_headless.run_prompt(prompt, keep_cache=True)
        again = comfy_headless.run_prompt(prompt, keep_cache=True)
        assert not cached(first) and cached(again) == set(prompt)       # nothing changed: nothing re-ran
        assert np.array_equal(picture(again), picture(first))          # the cached SaveImage's file
        reseeded = {**prompt, sampler: {**prompt[sampler], "inputs": {**prompt[sampler]["inputs"], "seed": 12345}}}
        kept = comfy_headless.run_prompt(reseeded, keep_cache=True)
        loaders = {k for k, n in prompt.items() if "Loader" in n["class_type"]}
        assert loaders and loaders <= cached(kept) and sampler not in cached(kept)
        assert np.array_equal(picture(kept), picture(comfy_headless.run_prompt(reseeded)))
        assert not np.array_equal(picture(kept), picture(first))
    finally:
        comfy_headless.drop_kept_cache()


def test_validation_errors_name_the_node_and_input(comfy_headless, tiny_models):
    from instantfamily_nodes.demo import workflows

    prompt = workflows.bind(workflows.load_workflow("pose_controlnet_plumbing"), _tiny_choice(tiny_models))
    prompt["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(comfy_headless.WorkflowError) as e:
        comfy_headless.run_prompt(prompt)
    msg = str(e.value)
    assert "node 1 (CheckpointLoaderSimple)" in msg and "'ckpt_name'" in msg and "no_such_model" in msg


def test_workflow_binding_scales_sizes_and_swaps_models():
    from instantfamily_nodes.demo import workflows

    prompt = workflows.load_workflow("pose_controlnet_plumbing")
    bound = workflows.bind(prompt, workflows.ModelChoice(checkpoint="a.safetensors", controlnet="b.safetensors"),
                           max_side=384, steps=2)
    kinds = {n["class_type"]: n["inputs"] for n in bound.values()}
    assert kinds["CheckpointLoaderSimple"]["ckpt_name"] == "a.safetensors"
    assert kinds["ControlNetLoader"]["control_net_name"] == "b.safetensors"
    # one picture size: EmptyLatentImage and Pose Control both take it from the PrimitiveInt pair
    assert kinds["EmptyLatentImage"]["width"] == kinds["InstantFamilyPoseControl"]["width"]
    assert workflows.picture_size(bound) == (256, 384)
    assert sorted(n["inputs"]["value"] for n in bound.values() if n["class_type"] == "PrimitiveInt") == [256, 384]
    assert kinds["KSampler"]["steps"] == 2
    assert workflows.picture_size(prompt) == (512, 768)  # the shipped file is untouched
    # shrinking keeps the aspect exactly where multiples of 8 allow (hand-computed)
    assert workflows.scaled_size(768, 512, 256) == (240, 160)
    assert workflows.scaled_size(512, 768, 384) == (256, 384)
    assert workflows.scaled_size(1000, 600, 256) == (240, 144)   # 5:3, unit 40 x 24
    assert workflows.scaled_size(1000, 608, 256) == (256, 152)   # 125:76 has no exact fit: nearest multiples of 8
    with pytest.raises(ValueError, match="unknown workflow 'nope'; shipped: "):
        workflows.load_workflow("nope")


def test_demo_command_with_tiny_models(comfy_headless, tiny_models, tmp_path, capsys):
    from PIL import Image

    from instantfamily_nodes.demo.__main__ import main

    out = tmp_path / "out"
    rc = main(["--tiny", "--cache", str(tiny_models.root), "--out", str(out), "--steps", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "UNTRAINED TINY models" in text
    name = "4_people_pose_template"  # the default: the pack's main nodes end to end
    files = {p.name for p in out.iterdir()}
    assert {f"{name}.png", f"{name}_overlay.png", f"{name}_pose_masks.png"} <= files
    assert sum(f.startswith(f"{name}_faces") for f in files) == 4  # one preview per photo
    sizes = {Image.open(out / f).size for f in (f"{name}.png", f"{name}_overlay.png", f"{name}_pose_masks.png")}
    assert sizes == {(384, 256)}


def test_demo_command_real_mode_asks_for_photos(comfy_headless, tiny_models, tmp_path, capsys):
    """Real mode never invents photos: with models 'found' but no photos it says what to pass."""
    from instantfamily_nodes.demo import __main__ as demo

    prompt = demo.workflows.load_workflow("4_people_pose_template")
    missing = demo._prepare_inputs(prompt, tmp_path, [], [], synthetic_ok=False)
    assert len(missing) == 4 and "person_1.png" in missing[0]
    with pytest.raises(FileNotFoundError, match="--photos: .*nope.png does not exist"):
        demo._prepare_inputs(prompt, tmp_path, [str(tmp_path / "nope.png")], [], synthetic_ok=False)


def test_mask_files_for_the_custom_masks_workflow(tmp_path, capsys):
    """LoadImageMask files: example masks (one per person, picture size, over the template's people, left to
    right) unless given; photos stay photos."""
    import numpy as np
    from PIL import Image

    from instantfamily_nodes.demo import __main__ as demo

    prompt = demo.workflows.bind(demo.workflows.load_workflow("custom_masks"), demo.workflows.ModelChoice(),
                                 max_side=256)
    assert demo._prepare_inputs(prompt, tmp_path, [], [], synthetic_ok=True) == []
    assert "example masks" in capsys.readouterr().out
    masks = [np.asarray(Image.open(tmp_path / f"mask_person_{k}.png")) for k in (1, 2)]
    assert all(m.shape == (160, 240) and m.max() == 255 for m in masks)
    centre_x = [np.nonzero(m)[1].mean() for m in masks]
    assert centre_x[0] < 120 < centre_x[1]  # ID 0 = left person
    assert not ((masks[0] > 0) & (masks[1] > 0)).any()
    mine = tmp_path / "mine.png"
    Image.fromarray(np.full((160, 240), 255, np.uint8)).save(mine)
    out = tmp_path / "given"
    assert demo._prepare_inputs(prompt, out, [], [], synthetic_ok=True, masks=[str(mine)]) == []
    assert (out / "mask_person_1.png").read_bytes() == mine.read_bytes()
    with pytest.raises(FileNotFoundError, match="--masks: .*nope.png does not exist"):
        demo._prepare_inputs(prompt, out, [], [], synthetic_ok=True, masks=[str(tmp_path / "nope.png")])


def test_tiny_build_is_reused_when_present(tiny_models):
    from instantfamily_nodes.demo import tiny

    ckpt = tiny_models.root / "checkpoints" / tiny_models.checkpoint
    before = (ckpt.stat().st_mtime_ns, hashlib.sha256(ckpt.read_bytes()).hexdigest())
    tiny.build_tiny_models(tiny_models.root)
    assert (ckpt.stat().st_mtime_ns, hashlib.sha256(ckpt.read_bytes()).hexdigest()) == before
    assert tiny.is_tiny_checkpoint(ckpt)


def test_shipped_ui_workflows_are_the_api_files_and_up_to_date(comfy_headless, tmp_path):
    """workflows/<name>.json (UI format, for the template browser) converts back to workflows/api/<name>.json,
    and regenerating them changes nothing; each has a thumbnail."""
    import json

    from instantfamily_nodes.demo import ui_format, workflow_files, workflows

    written = workflow_files.export_all(out_dir=tmp_path)
    shipped = sorted(p.name for p in workflows.WORKFLOW_DIR.glob("*.json"))
    assert shipped == sorted(p.name for p in written if p.suffix == ".json"), "stale or extra UI files"
    for name in workflows.list_workflows():
        shipped_ui = workflow_files.ui_path(name)
        assert shipped_ui.is_file() and shipped_ui.with_suffix(".jpg").is_file(), name
        ui = json.loads(shipped_ui.read_text())
        assert ui == json.loads(workflow_files.ui_path(name, tmp_path).read_text()), \
            f"{name}: run python -m instantfamily_nodes.demo.workflow_files to refresh the UI file"
        assert ui_format.ui_to_api(ui) == workflows.load_workflow(name)
        assert workflows.load_workflow(shipped_ui) == workflows.load_workflow(name)  # UI files run too
    assert {p.suffix for p in written} == {".json", ".jpg"}


def test_ui_conversion_handles_seeds_uploads_notes_and_reroutes(comfy_headless):
    from instantfamily_nodes.demo import ui_format

    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["3", 1], "negative": ["3", 1],
                                                    "latent_image": ["2", 0], "seed": 7, "steps": 3, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    ui = ui_format.api_to_ui(prompt)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[1]["widgets_values"] == ["a.png", "image"]
    # the upload button's value comes after ALL widgets (the frontend adds it last): channel stays 2nd
    mask_ui = ui_format.api_to_ui({"1": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}}})
    assert mask_ui["nodes"][0]["widgets_values"] == ["m.png", "red", "image"]
    assert ui_format.ui_to_api(mask_ui)["1"]["inputs"] == {"image": "m.png", "channel": "red"}
    assert nodes[4]["widgets_values"][:2] == [7, "fixed"]
    # a note and a reroute between the latent and the sampler
    ui["nodes"].append({"id": 9, "type": "Note", "widgets_values": ["hello"], "inputs": [], "outputs": []})
    lk = next(lk for lk in ui["links"] if lk[1] == 2)
    ui["nodes"].append({"id": 10, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 99}],
                        "outputs": [{"links": [lk[0]]}]})
    ui["links"].append([99, 2, 0, 10, 0, "LATENT"])
    lk[1], lk[2] = 10, 0
    assert ui_format.ui_to_api(ui) == prompt
    nodes[4]["mode"] = 4
    with pytest.raises(ValueError, match="node 4 \\(KSampler\\) is bypassed"):
        ui_format.ui_to_api(ui)
