"""The synthetic-world experiment at CI size, end to end through the pack's own commands (issue 11).

One run (module fixture, ~5.5 minutes on a 2-core VM with native bf16): the world's base model (VAE + UNet
trained here), the world's recogniser pack, `train prepare` with the base's latent and text caches, `train
fit` (masked attention in UNet and ControlNet, N = 4 slots), `train export`, `bench/synthetic.py` through
ComfyUI's executor (32 scenes of 2 people: 64 places), and the demo's world mode on the result.

What this size shows: the base learns (its loss falls, its VAE beats a flat picture), the files load as a
16-channel SD1.5-type model, every step runs through the real commands, and identity lands where it was
asked: with 2 people the masked model puts the right one in each place clearly above chance (0.5) and
clearly above the same model with its masks off, and each face is recognised among all 8 identities above
chance (1/8). Three settings make that possible at 64 px in minutes (README, CI-sized run): the VAE's L1
weighs face pixels 11x (vae_face_weight 10; plain L1 needed ~600 steps before faces survived the round
trip), 8 identities, and the recogniser's 4 x 4 map (17 tokens per ID).

The bounds come from the spread of the trained model, not of one lucky run: on the Intel VM (2026-12) this
config scored masked 0.89, masks off 0.55, among all 0.45 on these 64 places, and eleven perturbed runs
(fp32, other lr, steps, scenes, people, face weight, EMA, VAE/UNet steps) 0.70-0.86, 0.45-0.53 and 0.17-0.48
(README, CI-sized run). The among-all bound has the least room: one of the eleven (lr 2e-3, 0.17) would
miss it and fp32 (0.20) clears it by one place. With the 16 places measured before, the same default
scored 0.75 on its hardest 8 scenes: the old bound 0.75 was at the edge of noise.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instantfamily_nodes.synthetic.base import PROBE_TIMESTEPS, BaseConfig
from instantfamily_nodes.synthetic.experiment import ExperimentConfig, run_experiment

# Small enough for CI: 64 px scenes (8 x 8 latents), 8 identities, 2 people measured on 32 scenes (64 places).
CI = ExperimentConfig(base="world", scenes=200, people="1,2,3,4", size=64, steps=300, batch_size=8, lr=1e-3, ns="2",
                      bench_scenes=32, sample_steps=8, identities=8, seed=0, base_vae_steps=250,
                      base_vae_face_weight=10.0, base_unet_steps=150, base_unet_scenes=300, recognizer_steps=100,
                      recognizer_train_size=2000, recognizer_map_side=4, unmasked_baseline=False,
                      base_unet_channels=32)


@pytest.fixture(scope="module")
def experiment(comfyui, tmp_path_factory):
    out = tmp_path_factory.mktemp("world_experiment")
    results = run_experiment(out, CI, comfyui=str(comfyui))
    return out, json.loads(results.read_text())


def test_world_base_learned_to_encode_and_draw(experiment):
    out, data = experiment
    base = data["base"]
    # the UNet's loss (v-MSE by default) must fall well below its start (~1.0 for unit-variance latents):
    # its last 50 steps against its first 50 (150 steps here: the 100-step means in the results overlap)
    losses = json.loads((out / "base" / "world_base.json").read_text())["unet_losses"]
    assert len(losses) == CI.base_unet_steps
    assert np.mean(losses[-50:]) < 0.8 * np.mean(losses[:50]), (losses[:50], losses[-50:])
    # the x0 probe is recorded for every probed timestep, is smallest at the lowest noise, and (what the v
    # base is for) beats predicting the latent mean at every noise level, the highest included
    probe = base["unet"]["x0_error_vs_mean"]
    assert list(probe) == [str(t) for t in PROBE_TIMESTEPS], probe
    values = [probe[str(t)] for t in PROBE_TIMESTEPS]
    assert all(np.isfinite(v) and v > 0 for v in values) and values[0] == min(values), probe
    assert max(values) < 1.0, probe
    # the VAE reconstructs held-out scenes clearly better than each scene's own mean colour would
    assert base["vae"]["psnr"] > base["vae"]["flat_psnr"] + 2.0, base["vae"]
    assert (out / "base" / "world_base_samples.png").is_file()


def test_world_base_loads_through_comfyui_as_a_16_channel_sd15_type(experiment, comfyui):
    out, data = experiment
    code = f"""
import sys, json
sys.path.insert(0, {str(comfyui)!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import torch, comfy.sd, comfy.supported_models
from instantfamily_nodes.demo.tiny import register_tiny_model_type
register_tiny_model_type()
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config({data['experiment']['base_checkpoint']!r}, output_vae=True,
                                                           output_clip=True)
cfg = model.model.model_config
z = vae.encode(torch.rand(1, 64, 64, 3))
from instantfamily_nodes.synthetic.world import World, world_fits
people = [n for n in {list(BaseConfig.people)!r} if world_fits(n, 64)]
scenes = World({CI.identities}, 0).scenes(16, (64, 64), "test", people=people)
px = torch.stack([torch.from_numpy(s.image) for s in scenes]).float() / 255.0
zs = model.model.latent_format.process_in(vae.encode(px))
print(json.dumps({{"sd15": isinstance(cfg, comfy.supported_models.SD15), "world": getattr(cfg, "instantfamily_world", False),
                  "model_type": model.model.model_type.name,
                  "inpaint": cfg.inpaint_model(), "channels": model.model.latent_format.latent_channels,
                  "latent": list(z.shape), "latent_std": float(zs.std())}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # the VAE's scale/shift give world scenes latents of std BaseConfig.latent_std, measured on other scenes
    assert 0.75 * BaseConfig.latent_std < got.pop("latent_std") < 1.25 * BaseConfig.latent_std
    # the base is v-prediction (CI's default) and ComfyUI reads it so from the checkpoint's v_pred mark
    assert CI.base_prediction == "v"
    assert got == {"sd15": True, "world": True, "model_type": "V_PREDICTION", "inpaint": False, "channels": 16,
                   "latent": [1, 16, 8, 8]}


def test_bench_scored_every_asked_place_for_every_variant(experiment):
    _, data = experiment
    s = data["summary"]
    assert data["untrained_base"] is False
    for key in ("accuracy_masked", "accuracy_unmasked", "accuracy_vae_roundtrip", "accuracy_masked_among_all"):
        assert set(s[key]) == {"2"}, key
    for variant, per_n in data["per_position"].items():
        # 32 scenes of 2 people, every place scored (found is an identity index, never missing)
        assert len(sum(per_n["2"]["asked"], [])) == 64, variant
        assert all(len(a) == len(f) for a, f in zip(per_n["2"]["asked"], per_n["2"]["found"])), variant
        assert all(set(f) <= set(a) for a, f in zip(per_n["2"]["asked"], per_n["2"]["found"])), variant
    assert data["experiment"]["seconds"].keys() >= {"base", "recognizer", "prepare", "fit_masked", "bench"}
    # mixed_precision "auto" ran as this CPU allows, base and fit alike, and the results say which
    from instantfamily_nodes.train.host import cpu_has_native_bf16

    ran = "bf16" if cpu_has_native_bf16() else "no"
    assert data["experiment"]["mixed_precision"] == data["base"]["config"]["mixed_precision"] == ran


def test_identity_lands_where_it_was_asked_well_above_chance(experiment):
    """The method, at CI size: the trained masked model puts the right identity in each place far more
    often than chance and than the same model with its masks off (every ID visible everywhere)."""
    _, data = experiment
    s = data["summary"]
    assert s["chance"]["2"] == 0.5
    # 2 people, 64 places: the right one of the two in at least 42 (chance expects 32; P(>= 42 | chance) = 0.008)
    assert s["accuracy_masked"]["2"] >= 0.65, s
    # the masks are what does it: the same weights with every ID visible everywhere lose >= 8 of 64 places
    # (with its masks off the model draws one face in both places: exactly one of the two right)
    assert s["masked_minus_unmasked"]["2"] >= 0.125, s
    # each face recognised among all 8 identities in at least 12 of 64 places (chance expects 8; P = 0.10):
    # the weakest of the three checks, as identity at 8 x 8 latents is coarse at this size (README)
    assert s["accuracy_masked_among_all"]["2"] >= 0.1875, s
    # the ID tokens came from the 4 x 4 map: 17 per face, as the exported weights say
    from safetensors import safe_open

    with safe_open(str(Path(data["experiment"]["base_checkpoint"]).parents[2] / "world.safetensors"), "pt") as f:
        assert f.get_slice("projection.pos_row").get_shape()[0] == 4


def test_demo_world_mode_places_the_four_people(experiment, comfyui, tmp_path):
    out, _ = experiment
    res = subprocess.run([sys.executable, "-m", "instantfamily_nodes.demo", "--world", str(out), "--out",
                          str(tmp_path), "--comfyui", str(comfyui), "--steps", "8"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Synthetic world, not SD1.5" in res.stdout
    for name in ("world.png", "world_pose_masks.png", "world_overlay.png", "world_sheet.png", "world_workflow_api.json"):
        assert (tmp_path / name).is_file(), name
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "world.png"))
    assert img.shape == (64, 64, 3) and img.std() > 5      # a picture, not a flat field
    prompt = json.loads((tmp_path / "world_workflow_api.json").read_text())
    assert {n["class_type"] for n in prompt.values()} >= {"InstantFamilyEncodeFaces", "InstantFamilyApply",
                                                          "InstantFamilyPoseControl", "KSampler"}


def test_demo_world_mode_without_a_trained_world_says_how_to_train_it(comfyui, tmp_path):
    res = subprocess.run([sys.executable, "-m", "instantfamily_nodes.demo", "--world", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out"), "--comfyui", str(comfyui)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert f"python -m instantfamily_nodes.synthetic experiment --out {tmp_path / 'none'} --no-unmasked" in res.stderr


def test_experiment_refuses_more_people_than_the_scene_holds(tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"people='1,7'.*\[7\].*64 px"):
        run_experiment(tmp_path, replace(CI, people="1,7"))
    assert not any(tmp_path.iterdir())      # refused before anything was written
    # the bench's N too: 10 people need 10 of the CI world's 8 identities (found before training, not after)
    with pytest.raises(ValueError, match=r"ns='2,10'.*10 distinct identities"):
        run_experiment(tmp_path, replace(CI, ns="2,10"))
    assert not any(tmp_path.iterdir())


def test_unmasked_training_option_shows_every_id_everywhere():
    from instantfamily_nodes.attention.layout import TokenLayout
    from instantfamily_nodes.train.config import TrainConfig
    from instantfamily_nodes.train.model import TrainModel

    masks = torch.zeros(1, 4, 8, 8)
    masks[0, 0, :4, :4] = 1.0
    batch = SimpleNamespace(masks=masks, id_present=torch.tensor([[True, False, False, False]]))
    layout = TokenLayout(text_len=77, n_ids=4, tokens_per_id=50)
    for mask_ids, expected in ((True, masks), (False, torch.ones_like(masks))):
        host = SimpleNamespace(cfg=TrainConfig(mask_ids=mask_ids), device=torch.device("cpu"))
        binding = TrainModel.binding(host, batch, layout)
        assert torch.equal(binding.masks.masks, expected)
        assert torch.equal(binding.masks.strength, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_experiment_options_reach_train_fit(monkeypatch, tmp_path):
    """--ema-decay (and the other fit options) go to `train fit` as --set keys the trainer's config has, so
    the exported files are the EMA's; the commands are recorded, not run (train fit itself is tested in
    tests/test_train_fit.py, EMA export in tests/test_train_export.py)."""
    from dataclasses import replace

    from instantfamily_nodes.synthetic import experiment as E
    from instantfamily_nodes.synthetic.__main__ import build_parser
    from instantfamily_nodes.train.config import TrainConfig

    args = build_parser().parse_args(["experiment", "--out", str(tmp_path), "--ema-decay", "0.997"])
    assert args.ema_decay == 0.997 and E.ExperimentConfig().ema_decay == 0.0
    ran: list[list[str]] = []
    monkeypatch.setattr(E, "_run", lambda cmd, env=None: ran.append(cmd))
    cfg = replace(CI, ema_decay=args.ema_decay, face_loss_weight=5.0)
    E._fit_and_export("python", {}, cfg, "base.safetensors", tmp_path / "shards", tmp_path / "run",
                      tmp_path / "w.safetensors", tmp_path / "c.safetensors", force=False)
    fit, export = ran
    sets = dict(fit[i + 1].split("=", 1) for i, a in enumerate(fit) if a == "--set")
    assert sets["ema_decay"] == "0.997" and sets["face_loss_weight"] == "5.0" and sets["steps"] == str(CI.steps)
    assert set(sets) <= set(TrainConfig().to_dict()), set(sets) - set(TrainConfig().to_dict())
    assert export[3] == "export" and "--no-ema" not in export


def test_experiment_base_width_reaches_synthetic_base(monkeypatch, tmp_path):
    """--base-unet-channels goes to `synthetic base --unet-channels`, whose parser makes it the BaseConfig
    width (the command is recorded and the run stopped there; a wide base's ComfyUI type is checked in
    tests/test_demo.py, a whole 64-channel experiment's results in README)."""
    from dataclasses import replace

    from instantfamily_nodes.synthetic import experiment as E
    from instantfamily_nodes.synthetic.__main__ import build_parser

    class Stop(Exception):
        pass

    ran: list[list[str]] = []

    def record(cmd, env=None):
        ran.append(cmd)
        raise Stop

    args = build_parser().parse_args(["experiment", "--out", str(tmp_path), "--base-unet-channels", "96"])
    assert args.base_unet_channels == 96 and E.ExperimentConfig().base_unet_channels == 64
    monkeypatch.setattr(E, "_run", record)
    with pytest.raises(Stop):
        E.run_experiment(tmp_path, replace(CI, base_unet_channels=args.base_unet_channels))
    (cmd,) = ran
    assert cmd[1:4] == ["-m", "instantfamily_nodes.synthetic", "base"]
    assert build_parser().parse_args(cmd[3:]).unet_channels == 96


def test_experiment_rerun_with_more_steps_keeps_the_fits_schedule(monkeypatch, tmp_path):
    """A rerun with more --steps resumes the fit: under 1,000 steps the warm-up (a tenth of the steps) would
    change with them and the trainer's own resume check would refuse; the resumed fit keeps its checkpoint's.
    The commands are recorded, not run; the check is the trainer's (`check_resume_config`)."""
    from dataclasses import replace

    from instantfamily_nodes.synthetic import experiment as E
    from instantfamily_nodes.train.checkpoint import save_checkpoint
    from instantfamily_nodes.train.config import load_config
    from instantfamily_nodes.train.fit import ResumeError, check_resume_config

    ran: list[list[str]] = []
    monkeypatch.setattr(E, "_run", lambda cmd, env=None: ran.append(cmd))
    run = tmp_path / "run"

    def fit_config(steps: int):
        ran.clear()
        E._fit_and_export("python", {}, replace(CI, steps=steps), "base.safetensors", tmp_path / "shards", run,
                          tmp_path / "w.safetensors", tmp_path / "c.safetensors", force=False)
        fit = ran[0]
        return load_config(None, [fit[i + 1] for i, a in enumerate(fit) if a == "--set"]), "--resume" in fit

    first, resumed = fit_config(300)
    assert first.lr_warmup == 30 and not resumed
    # that fit's checkpoint at step 300, written by the trainer's own writer (one stand-in weight)
    w = torch.nn.Parameter(torch.zeros(1))
    ckpt = save_checkpoint(run / "checkpoints", 300, {"w": w.detach()}, torch.optim.AdamW([w]), None, None, {}, {},
                           first.to_dict())
    assert E._trained_steps(run) == 300
    more, resumed = fit_config(450)
    assert resumed and more.steps == 450 and more.lr_warmup == 30
    check_resume_config(first.to_dict(), more, ckpt)      # accepted: only the step count changed
    # what a tenth of 450 would have asked, refused by the same check
    with pytest.raises(ResumeError, match="lr_warmup"):
        check_resume_config(first.to_dict(), replace(more, lr_warmup=45), ckpt)
