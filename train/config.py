"""The training configuration: one TOML/YAML file plus ``--set key=value`` overrides, paper defaults.

Defaults follow InstantFamily sec. 4.2-4.3 (SD1.5, 512 px, N = 4 ID slots, batch 8 per GPU, 400k steps) and
ControlNet's defaults for the rest (AdamW, lr 1e-5). The config is flat on purpose: every key can be set
from the command line as ``--set lr_controlnet=2e-5`` and the checkpoint's ``config.json`` is one object
that a resumed run compares key by key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key and what is accepted."""


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ATTENTION_MODES = ("hard", "paper")


@dataclass
class TrainConfig:
    # --- paths
    data: str = ""                      # folder written by `train prepare` (manifest.json + shards)
    out: str = ""                       # run folder: checkpoints/, logs/, samples/
    checkpoint: str = ""                # SD1.5 checkpoint (.safetensors), loaded by ComfyUI's loader
    controlnet_init: str = ""           # "" = ControlNet copied from the UNet (zero convs at zero); else a file
    # --- what a step sees (sec. 4.2)
    resolution: int = 512
    n_ids: int = 4                      # N: ID slots per sample
    batch_size: int = 8                 # per process
    grad_accum: int = 1
    steps: int = 400_000                # optimizer steps (paper: 400k at 8 x 8 samples)
    text_dropout: float = 0.05          # classifier-free dropout of the caption
    id_dropout: float = 0.05            # ... and of the ID tokens (projection's null tokens)
    attention_mode: str = "hard"
    mask_margin: float = 0.25           # face box + 25 % (sec. 4.2)
    mask_ids: bool = True               # false: every ID's tokens visible everywhere (the unmasked-stacking
                                        # baseline of the paper's ablation, for comparisons only)
    face_loss_weight: float = 0.0       # MSE weight inside the ID masks is 1 + this (0 = the paper's
                                        # plain MSE; beyond the paper, train/loss.py)
    # --- optimisation
    lr_projection: float = 1e-5
    lr_controlnet: float = 1e-5
    train_projection: bool = True
    train_controlnet: bool = True
    weight_decay: float = 0.01          # AdamW
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # max global grad norm per step; 0 = off
    lr_warmup: int = 0                  # linear warm-up steps, then constant (ControlNet's default)
    lr_decay: float = 0.0               # last fraction of the steps over which the rate falls (cosine) to
                                        # a tenth; 0 = constant to the end (ControlNet's default)
    mixed_precision: str = "auto"       # auto: bf16 autocast on CUDA, fp32 on CPU; trainable params stay fp32
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0              # 0 = no EMA
    seed: int = 0
    # --- data loading
    num_workers: int = 2
    shuffle_buffer: int = 1000          # samples held for the in-shard shuffle
    # --- bookkeeping
    checkpoint_every: int = 2000
    keep_last: int = 3
    log_every: int = 10
    validate_every: int = 5000          # 0 = no validation
    validation_samples: int = 4         # fixed first samples of the data, sampled every validate_every
    validation_steps: int = 20          # sampler steps for the validation grid
    validation_cfg: float = 5.0
    face_encoder: str = ""              # "" = no identity scores at validation; else an evaluate/ encoder name
    models_root: str = ""               # where that encoder's weights live (ComfyUI models folder)
    # --- MoA (train/moa.py): prior + personalised experts and per-pixel routers in the UNet
    moa: bool = False
    moa_self_attention: bool = False    # also the self-attention layers (the paper replaces all)
    moa_router: str = "linear"          # linear | mlp
    lr_moa: float = 1e-5
    moa_router_weight: float = 1e-4     # router loss weight (paper)
    moa_masked_loss: bool = False       # reconstruction loss on the ID masks only
    moa_exclude_first: int = 2          # transformer blocks left out of the router loss
    moa_exclude_last: int = 3
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, carried into checkpoints

    # ------------------------------------------------------------------ checks
    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad key; returns self."""
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"config key {key!r} = {getattr(self, key)!r}: {what}")

        need(self.resolution > 0 and self.resolution % 8 == 0, "resolution", "must be a positive multiple of 8")
        need(self.n_ids >= 1, "n_ids", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.steps >= 1, "steps", "must be >= 1")
        for k in ("text_dropout", "id_dropout"):
            need(0.0 <= getattr(self, k) <= 1.0, k, "must be in [0, 1]")
        need(self.attention_mode in ATTENTION_MODES, "attention_mode", f"must be one of {ATTENTION_MODES}")
        need(self.mask_margin >= 0, "mask_margin", "must be >= 0")
        need(self.face_loss_weight >= 0, "face_loss_weight", "must be >= 0 (0 = plain MSE, the paper's loss)")
        for k in ("lr_projection", "lr_controlnet", "weight_decay", "grad_clip", "adam_eps"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        need(self.train_projection or self.train_controlnet or self.moa, "train_projection",
             "train_controlnet and moa are all false: nothing to train")
        need(self.lr_warmup >= 0, "lr_warmup", "must be >= 0")
        need(0.0 <= self.lr_decay <= 1.0, "lr_decay", "must be in [0, 1] (0 = constant rate after warm-up)")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {MIXED_PRECISION}")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 = off)")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        for k in ("checkpoint_every", "keep_last", "log_every"):
            need(getattr(self, k) >= 1, k, "must be >= 1")
        need(self.validate_every >= 0, "validate_every", "must be >= 0 (0 = off)")
        need(self.validation_samples >= 1, "validation_samples", "must be >= 1")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Strict: an unknown key or a value of the wrong type is a :class:`ConfigError` naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a table/mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()}).validate()

    def diff(self, other: TrainConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """Keys whose values differ: ``{key: (self's, other's)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against the field's type; ints are accepted for floats (TOML writes 1 for 1.0)."""
    bad = ConfigError(f"config key {key!r}: expected {getattr(hint, '__name__', hint)}, got "
                      f"{type(value).__name__} {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 4e5 from a YAML/CLI override
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, dict):  # extra
        return dict(value)
    raise bad


def _parse_override(item: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON/TOML scalar when it parses (1e-5, true, 8), else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. --set lr_controlnet=2e-5)")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    # numbers like 1e-5 that TOML rejects are valid JSON
    return key, value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml/.yml) file as a dict; a ``[train]`` table, if present, is used."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as e:  # parse errors of either format
        raise ConfigError(f"config file {path}: cannot parse ({e})") from e
    if isinstance(data, dict) and set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of key = value, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- config file <- ``key=value`` overrides, checked."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    for item in overrides or []:
        key, value = _parse_override(item)
        data[key] = value
    return TrainConfig.from_dict(data)


def save_config_toml(cfg: TrainConfig) -> str:
    """The config as TOML text (for humans; checkpoints store JSON)."""
    lines = []
    for k, v in cfg.to_dict().items():
        if k == "extra":
            continue
        lines.append(f"{k} = {json.dumps(v)}")
    if cfg.extra:
        lines.append("\n[extra]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in cfg.extra.items()]
    return "\n".join(lines) + "\n"
