"""``train export``: a real training checkpoint (train/checkpoint.py) -> the pack's weight file and a
ControlNet file, read back by the pack's loader, ComfyUI's ControlNet loader, the pack's ControlNet
loader, and a shipped workflow run in ComfyUI's executor with them (tiny SD1.5-shaped set, CPU)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the tiny set's synthetic face pack is exported/checked with onnx tooling")

R = 64
WEIGHTS_NAME = "exported_instantfamily.safetensors"
CONTROLNET_NAME = "exported_openpose.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny networks, one thread


@pytest.fixture(scope="module")
def headless(comfyui, tmp_path_factory):
    """ComfyUI in this process (its nodes + the pack via its own loader) over a tiny model folder."""
    from instantfamily_nodes.demo import headless, tiny

    tiny.register_tiny_model_type()
    models = tiny.build_tiny_models(tmp_path_factory.mktemp("tiny_export"))
    work = tmp_path_factory.mktemp("comfy_io_export")
    headless.setup_comfyui(comfyui, extra_model_paths=[models.extra_model_paths], cpu=True,
                           output_dir=work / "output", input_dir=work / "input", quiet=True)
    return headless, models


@pytest.fixture(scope="module")
def exported(headless, tmp_path_factory):
    """Build the trainer's model, give every trained tensor a non-initial value, save a checkpoint with
    train/checkpoint.py, and run the export command on it."""
    from instantfamily_nodes.train.__main__ import main
    from instantfamily_nodes.train.checkpoint import save_checkpoint
    from instantfamily_nodes.train.config import TrainConfig
    from instantfamily_nodes.train.model import TrainModel
    from instantfamily_nodes.train.shards import Manifest

    _, models = headless
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    Manifest(face_encoder="insightface/antelopev2", L=7, d_gf=64, d_lf=128, resolution=R).save(data)
    cfg = TrainConfig(data=str(data), out=str(root / "out"), checkpoint=str(models.root / "checkpoints" / models.checkpoint),
                      resolution=R, batch_size=1, attention_mode="paper", n_ids=4)
    model = TrainModel.build(cfg, Manifest.load(data), "cpu")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():   # "trained": away from the init, zero convs included
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    opt = torch.optim.AdamW([{"params": ps} for ps in model.param_groups().values()])
    ckdir = root / "out" / "checkpoints"
    save_checkpoint(ckdir, 7, model.trainable_state_dict(), opt, None, None, {}, {"samples": 0}, cfg.to_dict())
    out_w = root / "export" / WEIGHTS_NAME
    out_c = root / "export" / CONTROLNET_NAME
    rc = main(["export", "--checkpoint-dir", str(ckdir), "--out-weights", str(out_w), "--out-controlnet", str(out_c)])
    assert rc == 0
    return {"model": model, "cfg": cfg, "weights": out_w, "controlnet": out_c, "ckdir": ckdir, "root": root}


def test_weight_file_loads_with_metadata_and_the_trained_projection(exported):
    from safetensors import safe_open

    from instantfamily_nodes.models.weights import load_weights

    wf = load_weights(exported["weights"], expect={"d_k": 768, "face_encoder": "insightface/antelopev2"})
    m = wf.meta
    assert (m.L, m.d_gf, m.d_lf, m.d_k, m.attention_mode, m.train_n_ids) == (7, 64, 128, 768, "paper", 4)
    proj = wf.projection()
    for k, v in exported["model"].projection.state_dict().items():
        assert torch.equal(proj.state_dict()[k], v), k
    with safe_open(str(exported["weights"]), framework="pt") as f:
        md = f.metadata()
        assert not any(k.startswith("controlnet.") for k in f.keys())
    assert json.loads(md["train_config"]) == exported["cfg"].to_dict()
    assert md["train_step"] == "7"


def test_controlnet_file_loads_through_comfyui_and_the_packs_loader(exported):
    import comfy.controlnet

    from instantfamily_nodes.nodes import patching

    trained = exported["model"].controlnet.state_dict()
    control = comfy.controlnet.load_controlnet(str(exported["controlnet"]))
    assert type(control) is comfy.controlnet.ControlNet
    got = control.control_model.state_dict()
    assert got.keys() == trained.keys()
    for k, v in trained.items():   # fp16 file: the trained values rounded to fp16
        assert torch.equal(got[k].float(), v.half().float()), k
    wrapped = patching.load_controlnet(str(exported["controlnet"]))
    assert isinstance(wrapped, patching.InstantFamilyControlNet)


def test_a_shipped_workflow_runs_with_the_exported_files(exported, headless):
    import folder_paths

    from instantfamily_nodes.demo.__main__ import _prepare_inputs
    from instantfamily_nodes.demo import workflows

    runner, models = headless
    shutil.copy(exported["weights"], models.root / "instantfamily" / WEIGHTS_NAME)
    shutil.copy(exported["controlnet"], models.root / "controlnet" / CONTROLNET_NAME)
    choice = workflows.ModelChoice(checkpoint=models.checkpoint, controlnet=CONTROLNET_NAME, weights=WEIGHTS_NAME,
                                   face_pack=models.face_pack)
    prompt = workflows.bind(workflows.load_workflow("2_people_two_photos"), choice, max_side=192, steps=1)  # 192 x 128 keeps the 3:2 pose aspect
    assert {n["inputs"].get("control_net_name") for n in prompt.values()} >= {CONTROLNET_NAME}
    assert {n["inputs"].get("weights_name") for n in prompt.values()} >= {WEIGHTS_NAME}
    assert _prepare_inputs(prompt, Path(folder_paths.get_input_directory()), [], [], synthetic_ok=True) == []
    result = runner.run_prompt(prompt)
    for nid in workflows.save_image_nodes(prompt):
        files = result.image_files(nid)
        assert files and all(f.is_file() for f in files)


def test_export_refuses_what_it_cannot_write(exported, tmp_path):
    from instantfamily_nodes.train.checkpoint import load_checkpoint
    from instantfamily_nodes.train.export import ExportError, export_files

    ck = load_checkpoint(exported["ckdir"])
    with pytest.raises(ExportError, match="face encoder"):
        export_files(ck.model_state, {**ck.config, "data": str(tmp_path / "gone")}, tmp_path / "w.safetensors",
                     tmp_path / "c.safetensors")
    meta = export_files(ck.model_state, {**ck.config, "data": ""}, tmp_path / "w.safetensors",
                        tmp_path / "c.safetensors", dtype="fp32", face_encoder="insightface/antelopev2")
    assert meta.face_encoder == "insightface/antelopev2"
    with pytest.raises(ExportError, match="projection"):
        export_files({k: v for k, v in ck.model_state.items() if k.startswith("controlnet.")}, ck.config,
                     tmp_path / "w.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(ExportError, match=".safetensors"):
        export_files(ck.model_state, ck.config, tmp_path / "w.pt", tmp_path / "c.safetensors")
    assert not np.any([p.name.endswith(".tmp") for p in tmp_path.iterdir()])


def test_export_writes_the_ema_weights_unless_told_not_to(exported, tmp_path):
    """A checkpoint holding EMA tensors exports the EMA by default and the raw tensors with --no-ema
    (what `synthetic experiment --ema-decay` relies on)."""
    from instantfamily_nodes.models.weights import load_weights
    from instantfamily_nodes.train.__main__ import main
    from instantfamily_nodes.train.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(exported["ckdir"])
    ema = {k: v.float() * 0.5 + 0.25 for k, v in ck.model_state.items()}     # differs from the raw everywhere
    ckdir = tmp_path / "checkpoints"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    save_checkpoint(ckdir, 9, ck.model_state, opt, None, ema, {}, {"samples": 0}, ck.config)
    written = {}
    for flag in ([], ["--no-ema"]):
        w, c = tmp_path / f"w{len(flag)}.safetensors", tmp_path / f"c{len(flag)}.safetensors"
        assert main(["export", "--checkpoint-dir", str(ckdir), "--out-weights", str(w), "--out-controlnet",
                     str(c), "--dtype", "fp32"] + flag) == 0
        written[bool(flag)] = load_weights(w).projection().state_dict()
    keys = [k for k in ck.model_state if k.startswith("projection.")]
    assert keys and len(keys) == len(written[False])
    for k in keys:
        name = k[len("projection."):]
        assert torch.equal(written[False][name], ema[k]), k
        assert torch.equal(written[True][name], ck.model_state[k].float()), k
