"""TrainConfig: paper defaults, TOML/YAML files, --set overrides, strict keys and types."""
from __future__ import annotations

import tomllib

import pytest

from instantfamily_nodes.train.config import ConfigError, TrainConfig, load_config, save_config_toml


def test_defaults_are_the_papers():
    c = TrainConfig()
    # InstantFamily sec. 4.2-4.3: 512 px, N = 4, batch 8 per GPU, 400k steps, 25 % mask margin; ControlNet lr 1e-5
    assert (c.resolution, c.n_ids, c.batch_size, c.steps, c.mask_margin) == (512, 4, 8, 400_000, 0.25)
    assert c.lr_controlnet == c.lr_projection == 1e-5
    assert c.train_controlnet and c.train_projection and c.mixed_precision == "auto"
    assert c.validate() is c


def test_toml_file_then_overrides(tmp_path):
    f = tmp_path / "cfg.toml"
    f.write_text('data = "/d"\nout = "/o"\nsteps = 1000\nlr_controlnet = 2e-5\ntrain_projection = false\n')
    c = load_config(f, ["steps=50", "lr_projection=3e-4", "attention_mode=paper", "out=/elsewhere", "grad_clip=0"])
    assert (c.data, c.out, c.steps, c.lr_controlnet, c.lr_projection) == ("/d", "/elsewhere", 50, 2e-5, 3e-4)
    assert c.train_projection is False and c.attention_mode == "paper" and c.grad_clip == 0.0
    assert isinstance(c.grad_clip, float)  # an int literal for a float key is a float


def test_yaml_file_and_train_table(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text("batch_size: 4\nsteps: 4.0e+5\nmixed_precision: bf16\n")
    c = load_config(y)
    assert (c.batch_size, c.steps, c.mixed_precision) == (4, 400_000, "bf16")
    t = tmp_path / "cfg.toml"
    t.write_text("[train]\nbatch_size = 2\n")
    assert load_config(t).batch_size == 2


@pytest.mark.parametrize("overrides, words", [
    (["stepz=3"], ["unknown config key", "stepz"]),
    (["steps=abc"], ["'steps'", "expected int", "abc"]),
    (["steps=1.5"], ["'steps'", "expected int"]),
    (["train_controlnet=1"], ["'train_controlnet'", "expected bool"]),
    (["lr_controlnet=fast"], ["'lr_controlnet'", "expected float"]),
    (["resolution=500"], ["'resolution'", "multiple of 8"]),
    (["mixed_precision=fp8"], ["'mixed_precision'", "bf16"]),
    (["train_controlnet=false", "train_projection=false"], ["nothing to train"]),
    (["ema_decay=1.0"], ["'ema_decay'"]),
    (["novalue"], ["key=value"]),
])
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_round_trips():
    c = load_config(None, ["data=/x", "steps=7", "ema_decay=0.999", "lr_warmup=100"])
    c.extra = {"note": "run 3", "gpus": 8}
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig.from_dict(tomllib.loads(save_config_toml(c))) == c
    other = TrainConfig.from_dict({**c.to_dict(), "lr_controlnet": 3e-5, "seed": 4})
    assert c.diff(other) == {"lr_controlnet": (1e-5, 3e-5), "seed": (0, 4)}
    assert c.diff(other, ignore=("seed",)) == {"lr_controlnet": (1e-5, 3e-5)}
