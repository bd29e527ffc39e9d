"""The world base's UNet loss (synthetic/base.py), against a float64 hand computation."""
from __future__ import annotations

import pytest
import torch

from instantfamily_nodes.synthetic.base import noise_weighted_eps_mse


def _reference(eps, noise, alpha_bar, cap):
    out_num, out_den = 0.0, 0.0
    for i in range(eps.shape[0]):
        a = float(alpha_bar[i])
        w = min(max((1 - a) / a, 1.0), max(cap, 1.0))
        mse = float(((eps[i].double() - noise[i].double()) ** 2).mean())
        out_num += w * mse
        out_den += w
    return out_num / out_den


@pytest.mark.parametrize("cap", [1.0, 10.0, 1000.0])
def test_noise_weighted_eps_mse_matches_hand_computation(cap):
    g = torch.Generator().manual_seed(0)
    eps, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    # low noise (weight floored at 1), mid, high (1/SNR = 99: capped at 10, not at 1000)
    alpha_bar = torch.tensor([0.9, 0.5, 0.2, 0.01])
    got = float(noise_weighted_eps_mse(eps, noise, alpha_bar, cap))
    assert got == pytest.approx(_reference(eps, noise, alpha_bar, cap), rel=1e-5)


def test_cap_one_is_the_plain_mse_and_high_noise_weighs_more():
    g = torch.Generator().manual_seed(1)
    eps, noise = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    alpha_bar = torch.tensor([0.9, 0.01])
    plain = float(torch.nn.functional.mse_loss(eps, noise))
    assert float(noise_weighted_eps_mse(eps, noise, alpha_bar, 1.0)) == pytest.approx(plain, rel=1e-6)
    # an error only on the high-noise sample counts 10x more than the same error on the low-noise one
    e_hi, e_lo = noise.clone(), noise.clone()
    e_hi[1] += 1.0
    e_lo[0] += 1.0
    hi = float(noise_weighted_eps_mse(e_hi, noise, alpha_bar, 10.0))
    lo = float(noise_weighted_eps_mse(e_lo, noise, alpha_bar, 10.0))
    assert hi == pytest.approx(10 * lo, rel=1e-6)


def test_base_config_refuses_unknown_predictions_and_eps_weights_with_v():
    from instantfamily_nodes.synthetic.base import BaseConfig, _check_config

    _check_config(BaseConfig(prediction="v"))
    with pytest.raises(ValueError, match="prediction"):
        _check_config(BaseConfig(prediction="x0"))
    with pytest.raises(ValueError, match="unet_noise_weight_cap"):
        _check_config(BaseConfig(prediction="v", unet_noise_weight_cap=10.0))
    with pytest.raises(ValueError, match="mixed_precision = 'fp16'"):
        _check_config(BaseConfig(mixed_precision="fp16"))
    _check_config(BaseConfig(unet_channels=64))
    for bad in (0, 48, 100):                             # GroupNorm's 32 groups must divide every width
        with pytest.raises(ValueError, match=f"unet_channels = {bad}: must be a positive multiple of 32"):
            _check_config(BaseConfig(unet_channels=bad))


def test_an_experiment_refuses_a_base_built_with_other_settings(tmp_path):
    import json

    from instantfamily_nodes.synthetic.experiment import ExperimentConfig, check_existing_base

    cfg = ExperimentConfig(mixed_precision="bf16", base_unet_channels=32)   # "auto" resolved; built: 32
    built = {"size": cfg.size, "identities": cfg.identities, "seed": cfg.seed, "vae_steps": cfg.base_vae_steps,
             "unet_steps": cfg.base_unet_steps, "unet_scenes": cfg.base_unet_scenes, "prediction": cfg.base_prediction,
             "mixed_precision": "bf16"}
    path = tmp_path / "world_base.json"
    check_existing_base(path, cfg)                       # nothing built yet: nothing to check
    path.write_text(json.dumps({"config": built}))
    check_existing_base(path, cfg)
    path.write_text(json.dumps({"config": {**built, "unet_steps": 1500}}))
    with pytest.raises(ValueError, match="unet_steps: built 1500, asked 3500"):
        check_existing_base(path, cfg)
    # a base from before the prediction setting is eps: refused when v is asked
    old = {k: v for k, v in built.items() if k not in ("prediction", "mixed_precision")}
    path.write_text(json.dumps({"config": old}))
    with pytest.raises(ValueError, match="prediction: built 'eps', asked 'v'"):
        check_existing_base(path, ExperimentConfig(base_unet_channels=32, base_prediction="v", mixed_precision="no"))
    # ... and fp32: refused when bf16 is asked
    with pytest.raises(ValueError, match="mixed_precision: built 'no', asked 'bf16'"):
        check_existing_base(path, ExperimentConfig(base_unet_channels=32, base_prediction="eps", mixed_precision="bf16"))
    check_existing_base(path, ExperimentConfig(base_unet_channels=32, base_prediction="eps", mixed_precision="no"))


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from instantfamily_nodes.train.host import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16(info)                 # AVX-512 without its bf16 extension: emulated
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")  # unknown (not Linux): fp32


def test_experiment_mixed_precision_auto_follows_the_cpu_and_others_are_refused():
    from instantfamily_nodes.synthetic.experiment import ExperimentConfig, resolve_mixed_precision
    from instantfamily_nodes.train.host import cpu_has_native_bf16

    native = "bf16" if cpu_has_native_bf16() else "no"
    assert resolve_mixed_precision(ExperimentConfig()).mixed_precision == native
    for asked in ("no", "bf16"):
        assert resolve_mixed_precision(ExperimentConfig(mixed_precision=asked)).mixed_precision == asked
    with pytest.raises(ValueError, match="mixed_precision = 'fp16'"):
        resolve_mixed_precision(ExperimentConfig(mixed_precision="fp16"))


def test_vae_face_weighted_l1_matches_hand_computation():
    from instantfamily_nodes.synthetic.base import _vae_l1

    # 1 picture, 2 x 2 pixels: the top-left one is a face (a channel above the world's cut, 127.5/255)
    x = torch.tensor([[[[0.9, 0.1], [0.2, 0.3]], [[0.1, 0.1], [0.1, 0.1]], [[0.1, 0.2], [0.3, 0.4]]]])
    y = x + torch.tensor([0.5, -0.2, 0.1, 0.3]).reshape(1, 1, 2, 2)     # the same error in every channel
    # weights 1 + 4 on the face pixel, 1 elsewhere: (5 * 0.5 + 0.2 + 0.1 + 0.3) / (5 + 1 + 1 + 1)
    assert float(_vae_l1(y, x, 4.0)) == pytest.approx((5 * 0.5 + 0.6) / 8, rel=1e-6)
    assert float(_vae_l1(y, x, 0.0)) == pytest.approx(float(torch.nn.functional.l1_loss(y, x)), rel=1e-6)


def test_an_experiment_refuses_a_base_with_another_vae_face_weight(tmp_path):
    import json

    from instantfamily_nodes.synthetic.experiment import ExperimentConfig, check_existing_base

    cfg = ExperimentConfig(mixed_precision="no", base_vae_face_weight=10.0, base_unet_channels=32)
    built = {"size": cfg.size, "identities": cfg.identities, "seed": cfg.seed, "vae_steps": cfg.base_vae_steps,
             "unet_steps": cfg.base_unet_steps, "unet_scenes": cfg.base_unet_scenes, "prediction": cfg.base_prediction,
             "mixed_precision": "no"}                     # written before vae_face_weight existed: plain L1
    path = tmp_path / "world_base.json"
    path.write_text(json.dumps({"config": built}))
    with pytest.raises(ValueError, match="vae_face_weight: built 0.0, asked 10.0"):
        check_existing_base(path, cfg)
    path.write_text(json.dumps({"config": {**built, "vae_face_weight": 10.0}}))
    check_existing_base(path, cfg)


def test_an_experiment_refuses_a_recognizer_pack_built_with_other_settings(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from instantfamily_nodes.synthetic.experiment import ExperimentConfig, check_existing_pack

    cfg = ExperimentConfig(identities=8, seed=0, recognizer_map_side=4)
    check_existing_pack(tmp_path, cfg)                    # nothing built yet: nothing to check
    meta = {"identities": "8", "seed": "0", "map_side": "4"}
    save_file({"classes": np.zeros((8, 64), np.float32)}, str(tmp_path / "world.safetensors"), metadata=meta)
    check_existing_pack(tmp_path, cfg)
    with pytest.raises(ValueError, match="map_side: built 4, asked 7"):
        check_existing_pack(tmp_path, ExperimentConfig(identities=8, seed=0))
    # a pack from before map_side existed is 7 x 7
    save_file({"classes": np.zeros((8, 64), np.float32)}, str(tmp_path / "world.safetensors"),
              metadata={"identities": "8", "seed": "0"})
    with pytest.raises(ValueError, match="map_side: built 7, asked 4"):
        check_existing_pack(tmp_path, cfg)
    with pytest.raises(ValueError, match="identities: built 8, asked 24"):
        check_existing_pack(tmp_path, ExperimentConfig())


def test_an_experiment_refuses_a_base_of_another_width(tmp_path):
    import json

    from instantfamily_nodes.synthetic.experiment import ExperimentConfig, check_existing_base

    cfg = ExperimentConfig(mixed_precision="no", base_unet_channels=64)
    built = {"size": cfg.size, "identities": cfg.identities, "seed": cfg.seed, "vae_steps": cfg.base_vae_steps,
             "unet_steps": cfg.base_unet_steps, "unet_scenes": cfg.base_unet_scenes, "prediction": cfg.base_prediction,
             "mixed_precision": "no", "vae_face_weight": 0.0}   # written before unet_channels existed: 32
    path = tmp_path / "world_base.json"
    path.write_text(json.dumps({"config": built}))
    with pytest.raises(ValueError, match="unet_channels: built 32, asked 64"):
        check_existing_base(path, cfg)
    check_existing_base(path, ExperimentConfig(mixed_precision="no", base_unet_channels=32))
    path.write_text(json.dumps({"config": {**built, "unet_channels": 64}}))
    check_existing_base(path, cfg)
