"""The pack's weight file: one safetensors file, tensors grouped by prefix, shapes in its metadata.

Groups: ``projection.*`` (the ID projection, always present), later ``controlnet.*`` and ``moa.*``.
Metadata (all strings, as safetensors requires): format, format_version, face_encoder, L, d_gf, d_lf,
d_k, attention_mode, train_n_ids. Loading checks every field and every projection tensor and says
which one is wrong and what was expected. Nothing is unpickled: safetensors only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..attention.masks import MODES
from .projection import IDProjection, ProjectionConfig

FORMAT = "instantfamily"
FORMAT_VERSION = 1
GROUPS = ("projection", "controlnet", "moa")


class WeightFileError(ValueError):
    """A weight file that is not what the pack expects; the message says what and what to do."""


@dataclass(frozen=True)
class WeightMeta:
    face_encoder: str        # e.g. "insightface/antelopev2"
    L: int                   # side of the encoder's local feature map
    d_gf: int
    d_lf: int
    d_k: int
    attention_mode: str      # the mode the weights were trained with
    train_n_ids: int         # N used in training (4 in the paper)
    format_version: int = FORMAT_VERSION

    @property
    def projection_config(self) -> ProjectionConfig:
        return ProjectionConfig(d_gf=self.d_gf, d_lf=self.d_lf, side=self.L, d_k=self.d_k)

    def to_metadata(self) -> dict[str, str]:
        md = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        md["format"] = FORMAT
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str] | None, source: str) -> "WeightMeta":
        if not md or md.get("format") != FORMAT:
            raise WeightFileError(
                f"{source}: not an InstantFamily weight file (metadata 'format' is "
                f"{(md or {}).get('format')!r}, expected {FORMAT!r}). Put the pack's own "
                "*.safetensors in models/instantfamily; ControlNets go through the ControlNet loader"
            )
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = md.get(f.name)
            if raw is None:
                raise WeightFileError(f"{source}: metadata field {f.name!r} is missing; expected "
                                      f"{_FIELD_HELP[f.name]}")
            if f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise WeightFileError(f"{source}: metadata field {f.name!r} is {raw!r}; expected "
                                          f"{_FIELD_HELP[f.name]}") from None
                if values[f.name] <= 0:
                    raise WeightFileError(f"{source}: metadata field {f.name!r} is {raw!r}; expected "
                                          f"{_FIELD_HELP[f.name]}")
            else:
                values[f.name] = raw
        meta = cls(**values)
        if meta.format_version > FORMAT_VERSION:
            raise WeightFileError(f"{source}: format_version {meta.format_version} is newer than this "
                                  f"pack reads ({FORMAT_VERSION}); update instantfamily_nodes")
        if meta.attention_mode not in MODES:
            raise WeightFileError(f"{source}: metadata field 'attention_mode' is "
                                  f"{meta.attention_mode!r}; expected one of {MODES}")
        return meta


_FIELD_HELP = {
    "face_encoder": "the face encoder's name, e.g. 'insightface/antelopev2'",
    "L": "a positive integer, the side of the local feature map (7 for antelopev2)",
    "d_gf": "a positive integer, the global embedding width (512 for antelopev2)",
    "d_lf": "a positive integer, the local feature channels (512 for antelopev2)",
    "d_k": "a positive integer, the cross-attention context width (768 for SD1.5)",
    "attention_mode": f"one of {MODES}",
    "train_n_ids": "a positive integer, the number of IDs used in training (4 in the paper)",
    "format_version": f"a positive integer <= {FORMAT_VERSION}",
}


@dataclass
class WeightFile:
    meta: WeightMeta
    tensors: dict[str, torch.Tensor]

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of one group with the group prefix removed."""
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def projection(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IDProjection:
        proj = IDProjection(self.meta.projection_config)
        proj.load_state_dict(self.group("projection"))
        return proj.to(device=device, dtype=dtype).eval()


def save_weights(path: str | Path, meta: WeightMeta, projection: IDProjection,
                 extra: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write the projection (and later groups given in ``extra`` with their prefixes). ``metadata``:
    extra string fields (e.g. the trainer's config JSON); they cannot override the format fields."""
    if projection.config != meta.projection_config:
        raise ValueError(f"projection {projection.config} does not match the metadata {meta.projection_config}")
    tensors = {f"projection.{k}": v.detach().contiguous().cpu() for k, v in projection.state_dict().items()}
    for k, v in (extra or {}).items():
        if k.split(".", 1)[0] not in GROUPS[1:]:
            raise ValueError(f"extra tensor {k!r} must start with one of {GROUPS[1:]}")
        tensors[k] = v.detach().contiguous().cpu()
    md = meta.to_metadata()
    clash = sorted(set(metadata or {}) & set(md))
    if clash:
        raise ValueError(f"metadata keys {clash} are the weight file's own fields; use other names")
    save_file(tensors, str(path), metadata={**{k: str(v) for k, v in (metadata or {}).items()}, **md})


def load_weights(path: str | Path, expect: Mapping[str, object] | None = None) -> WeightFile:
    """Read and validate a weight file. ``expect`` (metadata fields the caller's setup fixes, e.g.
    ``{"face_encoder": "insightface/antelopev2", "d_k": 768}``) makes a mismatch an error naming both."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightFileError(f"{source}: no such file; put InstantFamily weights in models/instantfamily")
    if path.suffix != ".safetensors":
        raise WeightFileError(f"{source}: only .safetensors weight files are loaded (pickled .pt/.ckpt "
                              "files can run code and are refused); convert it with safetensors")
    try:
        with safe_open(source, framework="pt") as f:
            meta = WeightMeta.from_metadata(f.metadata(), source)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise WeightFileError(f"{source}: not a readable safetensors file ({e})") from None
    _check_tensors(tensors, meta, source)
    if expect:
        check_compatible(meta, expect, source)
    return WeightFile(meta, tensors)


def _check_tensors(tensors: dict[str, torch.Tensor], meta: WeightMeta, source: str) -> None:
    unknown = sorted(k for k in tensors if k.split(".", 1)[0] not in GROUPS)
    if unknown:
        raise WeightFileError(f"{source}: unexpected tensors {unknown[:5]}; groups must be one of {GROUPS}")
    want = {f"projection.{k}": tuple(v.shape) for k, v in IDProjection(meta.projection_config).state_dict().items()}
    cfg = meta.projection_config
    for name, shape in want.items():
        if name not in tensors:
            raise WeightFileError(f"{source}: tensor {name!r} is missing; expected shape {shape} "
                                  f"for L={cfg.side}, d_gf={cfg.d_gf}, d_lf={cfg.d_lf}, d_k={cfg.d_k}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise WeightFileError(f"{source}: tensor {name!r} has shape {got}; expected {shape} "
                                  f"for L={cfg.side}, d_gf={cfg.d_gf}, d_lf={cfg.d_lf}, d_k={cfg.d_k}")
        if not tensors[name].is_floating_point():
            raise WeightFileError(f"{source}: tensor {name!r} has dtype {tensors[name].dtype}; expected a float type")
    stray = sorted(k for k in tensors if k.startswith("projection.") and k not in want)
    if stray:
        raise WeightFileError(f"{source}: unexpected projection tensors {stray[:5]}; the file was "
                              "written by another projection design")


def check_compatible(meta: WeightMeta, expect: Mapping[str, object], source: str) -> None:
    """Refuse weights built for another face encoder, feature shape or text width."""
    for name, want in expect.items():
        if name not in _FIELD_HELP:
            raise KeyError(f"unknown weight metadata field {name!r}")
        have = getattr(meta, name)
        if have != want:
            raise WeightFileError(f"{source}: built for {name}={have!r}, but this setup has {name}={want!r}; "
                                  "use weights trained for this face encoder and base model")
