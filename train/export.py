"""``train export``: a training checkpoint -> the two files the ComfyUI workflows load.

- ``--out-weights``: the pack's weight file (models/instantfamily): the ID projection, metadata
  (face encoder, L, widths, attention mode, N used in training) and the training config as JSON
  under ``train_config``. Written by ``models.weights.save_weights``, read by the Weights Loader.
- ``--out-controlnet``: the trained ControlNet in SD1.5 cldm key layout without a prefix (as the
  common ``control_*.safetensors`` files), which ComfyUI's ControlNetLoader and the pack's
  InstantFamily ControlNet Loader read; fp16 by default (half the size, what inference runs).

The EMA weights are exported when the checkpoint has them (``--no-ema`` for the raw ones).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ..models.projection import IDProjection
from ..models.weights import WeightMeta, save_weights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONTROLNET_TAG = "instantfamily-controlnet"


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message says what to do."""


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(projection, controlnet) state dicts from a trainable state dict (``TrainModel.trainable_state_dict``)."""
    proj = {k[len("projection."):]: v for k, v in state.items() if k.startswith("projection.")}
    ctrl = {k[len("controlnet."):]: v for k, v in state.items() if k.startswith("controlnet.")}
    other = sorted(k for k in state if not k.startswith(("projection.", "controlnet.", "moa.")))
    if other:
        raise ExportError(f"checkpoint model state has keys outside projection./controlnet. (e.g. {other[0]!r}); "
                          "it was not written by train fit")
    if not proj:
        raise ExportError("checkpoint model state has no projection.* tensors")
    if not ctrl:
        raise ExportError("checkpoint model state has no controlnet.* tensors")
    return proj, ctrl


def weight_meta(proj: Mapping[str, torch.Tensor], config: Mapping[str, Any], face_encoder: str | None = None) -> WeightMeta:
    """The weight file's metadata: widths from the tensors, the rest from the training config (and the
    data manifest it names, for the face encoder, unless ``face_encoder`` is given)."""
    g, loc = proj["global_proj.weight"], proj["local_proj.weight"]
    if face_encoder is None:
        from .shards import Manifest, ShardError

        data = str(config.get("data", ""))
        try:
            face_encoder = Manifest.load(data).face_encoder
        except (ShardError, OSError, ValueError) as e:
            raise ExportError(f"cannot tell the face encoder: the training data manifest is not readable ({e}); "
                              "pass --face-encoder, e.g. insightface/antelopev2") from None
    return WeightMeta(face_encoder=face_encoder, L=int(proj["pos_row"].shape[0]), d_gf=int(g.shape[1]),
                      d_lf=int(loc.shape[1]), d_k=int(g.shape[0]), attention_mode=str(config.get("attention_mode", "hard")),
                      train_n_ids=int(config.get("n_ids", 4)))


def export_files(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], out_weights: str | Path,
                 out_controlnet: str | Path, dtype: str = "fp16", face_encoder: str | None = None,
                 step: int | None = None) -> WeightMeta:
    """Write both files from a trainable state dict and the training config (a dict)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    proj_sd, ctrl_sd = split_state(state)
    meta = weight_meta(proj_sd, config, face_encoder)
    projection = IDProjection(meta.projection_config)
    try:
        projection.load_state_dict({k: v.float() for k, v in proj_sd.items()})
    except RuntimeError as e:
        raise ExportError(f"checkpoint projection does not fit {meta.projection_config}: {e}") from None
    info = {"train_config": json.dumps(dict(config), sort_keys=True, default=str)}
    if step is not None:
        info["train_step"] = str(step)
    for out in (out_weights, out_controlnet):
        if Path(out).suffix != ".safetensors":
            raise ExportError(f"{out}: output files must end in .safetensors")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    moa = {k: v.float() for k, v in state.items() if k.startswith("moa.")}   # MoA experts + routers (train/moa.py)
    _atomic(out_weights, lambda tmp: save_weights(tmp, meta, projection, extra=moa or None, metadata=info))
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in ctrl_sd.items()}
    _atomic(out_controlnet, lambda tmp: save_file(tensors, tmp, metadata={"format": CONTROLNET_TAG, **info}))
    return meta


def _atomic(path: str | Path, write) -> None:
    """Write through a temp file in the same folder and rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-dir", required=True, help="the run's checkpoint folder (train fit's out/checkpoints)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out-weights", required=True, help="the pack's weight file, e.g. models/instantfamily/my.safetensors")
    parser.add_argument("--out-controlnet", required=True, help="the ControlNet, e.g. models/controlnet/my_openpose.safetensors")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="ControlNet tensor type (default fp16)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even when the checkpoint has EMA")
    parser.add_argument("--face-encoder", default=None,
                        help="face encoder name for the metadata when the training data manifest is gone")


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def run(args: argparse.Namespace) -> int:
    from . import checkpoint

    loaded = checkpoint.load_checkpoint(args.checkpoint_dir, args.step)
    state = _field(loaded, "model_state")
    ema = _field(loaded, "ema_state")
    config = _field(loaded, "config")
    step = _field(loaded, "step")
    if state is None or config is None:
        raise ExportError(f"{args.checkpoint_dir}: the checkpoint has no model state or config")
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    use = ema if (ema and not args.no_ema) else state
    meta = export_files(use, config, args.out_weights, args.out_controlnet, args.dtype, args.face_encoder, step)
    print(f"exported step {step}{' (EMA)' if use is ema else ''}: {args.out_weights} ({meta.face_encoder}, "
          f"L={meta.L}, mode {meta.attention_mode}) and {args.out_controlnet}")
    return 0
